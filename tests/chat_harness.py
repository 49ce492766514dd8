"""An in-process ChatEndpoint over data/embedded_model (tiny Llama, 32k Mistral tokenizer).

No server, no HTTP: `call` hands a request body to ChatEndpoint.create on a
fresh event loop and returns the JSON body, or the parsed SSE events of a
stream. A refused request raises fastapi's HTTPException, as the route would
answer it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.frontend.params import ModelDefaults
from flashserve.config import EngineConfig
from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.llm_engine import LLMEngine

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "data" / "embedded_model"
EOS = 2
USER = [{"role": "user", "content": "Tell me a story."}]


def make_service(**engine_overrides: Any) -> ChatEndpoint:
    from transformers import AutoTokenizer

    settings: dict[str, Any] = dict(
        device="cpu", dtype="float32", kv_cache_memory_gb=0.05, max_model_len=1024
    )
    settings.update(engine_overrides)
    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL))
    engine = LLMEngine(EngineConfig(**settings), EMBEDDED_MODEL, eos_token_ids=(EOS,))
    async_engine = AsyncEngine(engine)
    async_engine.start()
    return ChatEndpoint(ModelFrontend(async_engine, tokenizer, "m", ModelDefaults()))


def body(**fields: Any) -> dict[str, Any]:
    """A greedy request for the standard prompt, with `fields` on top."""
    return {"model": "m", "messages": USER, "max_tokens": 16, "temperature": 0, **fields}


def call(service: ChatEndpoint, request: dict[str, Any]) -> Any:
    async def run() -> Any:
        response = await service.create(request)
        if isinstance(response, dict):
            return response
        events = []
        async for raw in response.body_iterator:
            text = raw.decode() if isinstance(raw, bytes) else raw
            payload = text.removeprefix("data: ").strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        return events

    return asyncio.run(run())


def content(response: dict[str, Any]) -> str:
    return response["choices"][0]["message"]["content"]


def streamed_content(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


@contextmanager
def recorded_tokens(service: ChatEndpoint) -> Iterator[dict[str, list[int]]]:
    """Token ids the engine produces while the block runs, by request id (= response id)."""
    engine = service.frontend.engine.engine
    produced: dict[str, list[int]] = {}
    step = engine.step

    def recording_step():
        outputs = step()
        for out in outputs:
            produced.setdefault(out.request_id, []).extend(out.new_token_ids)
        return outputs

    engine.step = recording_step
    try:
        yield produced
    finally:
        del engine.step  # back to the class's method
