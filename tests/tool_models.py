"""Tiny random models that speak each tool-call format, for tool and reasoning tests.

Each one is a folder holding a tokenizer (a real one from tests.tokenizer_fixtures, plus
the added tokens its model family has) with a chat template from tests/chat_templates/,
and a tiny random Llama whose vocabulary matches that tokenizer exactly:

* "hermes": + ChatML specials and Qwen's plain <tool_call>/<think> tokens (Qwen3-style);
* "llama3": + Llama 3 header tokens and <|python_tag|> (Llama 3.1-style template);
* "mistral": as it is, its [TOOL_CALLS] etc. are special already (Mistral v0.3-style);
* "glm45": + GLM's role tokens (special) and its plain tool/think tags (GLM-4.5/4.6);
* "deepseek_v31": + DeepSeek's sentence tokens (special) and its plain role, tool and
  think tokens (DeepSeek-V3.1).

All but DeepSeek start from the 32k Mistral SentencePiece tokenizer: the formats are
text, and the 131k byte-level BPE one would make every step of the 100-request tests ~4x
dearer. DeepSeek's tokens hold "▁", which SentencePiece's decoder turns into spaces.

`make_service(folder)` starts a ChatEndpoint over one of them on the CPU; the fixture
`services` (tests/tool_fixtures.py) builds and shares them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.frontend.params import ModelDefaults
from flashserve.config import EngineConfig
from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.llm_engine import LLMEngine
from tests.tiny_models import save_tiny_llama

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"


@dataclass(frozen=True)
class Family:
    template: str
    special: tuple[str, ...] = ()  # added special tokens
    plain: tuple[str, ...] = ()  # added ordinary tokens (Qwen's tags are not special)
    bos: str | None = None
    eos: str | None = None
    more_eos: tuple[str, ...] = ()  # further end-of-turn tokens (generation_config)
    # The tokenizer built on: "sp" (32k SentencePiece) or "bpe" (131k byte-level BPE,
    # for tokens whose text SentencePiece's decoder would change: DeepSeek's "▁").
    base: str = "sp"


FAMILIES = {
    "hermes": Family(
        "hermes.jinja",
        special=("<|im_start|>", "<|im_end|>"),
        plain=("<tool_call>", "</tool_call>", "<think>", "</think>"),
        eos="<|im_end|>",
    ),
    "llama3": Family(
        "llama3.jinja",
        special=(
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
    ),
    "mistral": Family("mistral.jinja"),
    "glm45": Family(
        "glm45.jinja",
        special=(
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<|endoftext|>",
        ),
        plain=(
            "<tool_call>",
            "</tool_call>",
            "<arg_key>",
            "</arg_key>",
            "<arg_value>",
            "</arg_value>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        ),
        eos="<|endoftext|>",
        more_eos=("<|user|>", "<|observation|>"),
    ),
    "deepseek_v31": Family(
        "deepseek_v31.jinja",
        special=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        plain=(
            "<｜User｜>",
            "<｜Assistant｜>",
            "<｜tool▁calls▁begin｜>",
            "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>",
            "<｜tool▁sep｜>",
            "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>",
            "<think>",
            "</think>",
        ),
        bos="<｜begin▁of▁sentence｜>",
        eos="<｜end▁of▁sentence｜>",
        base="bpe",
    ),
}


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def family_tokenizer(name: str, base_dir: Path) -> Any:
    """The tokenizer of family `name`, built on the tokenizer in `base_dir`."""
    from transformers import AddedToken, AutoTokenizer

    family = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if family.special:
        tokens = [AddedToken(t, special=True, normalized=False) for t in family.special]
        tokenizer.add_tokens(tokens, special_tokens=True)
    if family.plain:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain])
    if family.bos:
        tokenizer.bos_token = family.bos
    if family.eos:
        tokenizer.eos_token = family.eos
    tokenizer.chat_template = template(family.template)
    return tokenizer


def build_family(
    name: str,
    base_dir: Path,
    out_dir: Path,
    seed: int = 0,
    save_model: Callable[..., Path] = save_tiny_llama,
) -> Path:
    """Write tokenizer + tiny model of family `name` to `out_dir`; returns it.

    `save_model(out_dir, vocab_size=, seed=)` writes the model (a tiny Llama by default).
    """
    family = FAMILIES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = family_tokenizer(name, base_dir)
    tokenizer.save_pretrained(str(out_dir))
    save_model(out_dir, vocab_size=len(tokenizer), seed=seed)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in (tokenizer.eos_token, *family.more_eos)]
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos[0] if len(eos) == 1 else eos})
    )
    return out_dir


def make_service(model_dir: Path, **engine_overrides: Any) -> ChatEndpoint:
    from transformers import AutoTokenizer

    settings: dict[str, Any] = dict(
        device="cpu", dtype="float32", kv_cache_memory_gb=0.25, max_model_len=2048
    )
    settings.update(engine_overrides)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    engine = LLMEngine(EngineConfig(**settings), model_dir, eos_token_ids=eos_ids)
    async_engine = AsyncEngine(engine)
    async_engine.start()
    return ChatEndpoint(ModelFrontend(async_engine, tokenizer, "m", ModelDefaults()))


async def answer(service: ChatEndpoint, body: dict[str, Any]) -> Any:
    """The JSON body, or for a stream its events (parsed JSON, then "[DONE]")."""
    response = await service.create(body)
    if isinstance(response, dict):
        return response
    events = []
    async for raw in response.body_iterator:
        payload = (raw.decode() if isinstance(raw, bytes) else raw).removeprefix("data: ").strip()
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def answer_all(service: ChatEndpoint, bodies: list[dict[str, Any]]) -> list[Any]:
    """Send all bodies at once (the engine batches them); answers in order."""

    async def run() -> list[Any]:
        return await asyncio.gather(*(answer(service, body) for body in bodies))

    return asyncio.run(run())
