"""Assemble the serving stack (weights, tokenizer, engine thread, endpoints) from a Truss config."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.endpoints.completions import CompletionsEndpoint
from flashserve.api.endpoints.messages import MessagesEndpoint
from flashserve.api.endpoints.request_schema import RequestValidator
from flashserve.api.endpoints.responses import ResponsesEndpoint
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.frontend.params import ModelDefaults
from flashserve.config import EngineConfig, declared_gpu_count
from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.llm_engine import LLMEngine
from flashserve.metrics import register_engine
from flashserve.weights import resolve_model_dir

logger = logging.getLogger(__name__)


@dataclass
class Service:
    """The served model's frontend and the endpoints over it (one per API)."""

    frontend: ModelFrontend
    chat: ChatEndpoint
    completions: CompletionsEndpoint
    responses: ResponsesEndpoint
    messages: MessagesEndpoint

    @property
    def engine(self) -> AsyncEngine:
        return self.frontend.engine


def build_service(
    truss_config: dict[str, Any],
    data_dir: Path | None,
    secrets: Any = None,
    lazy_data_resolver: Any = None,
) -> Service:
    from transformers import AutoTokenizer

    started = time.monotonic()
    metadata = truss_config.get("model_metadata") or {}
    config = EngineConfig.from_dict(metadata.get("engine"))
    config = with_tensor_parallel_default(config, truss_config.get("resources"))
    hf_token = _secret(secrets, "hf_access_token")
    model_dir = resolve_model_dir(
        config.model,
        data_dir,
        revision=config.revision,
        hf_token=hf_token,
        weights=truss_config.get("weights"),
        lazy_data_resolver=lazy_data_resolver,
    )
    located = time.monotonic() - started
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generation = _read_json(model_dir / "generation_config.json")
    engine = LLMEngine(config, model_dir, eos_token_ids=_eos_ids(generation, tokenizer))
    async_engine = AsyncEngine(
        engine,
        max_queue_size=config.max_queue_size,
        stream_interval=config.stream_interval,
    )
    async_engine.start()
    register_engine(async_engine)
    schema_path = Path(data_dir) / "ChatCompletionRequest.schema.json" if data_dir else None
    validator = RequestValidator(schema_path if schema_path and schema_path.is_file() else None)
    frontend = ModelFrontend(
        async_engine,
        tokenizer,
        served_model_name=config.served_model_name or config.model,
        defaults=ModelDefaults.from_generation_config(generation),
    )
    service = Service(
        frontend=frontend,
        chat=ChatEndpoint(frontend, validator),
        completions=CompletionsEndpoint(frontend),
        responses=ResponsesEndpoint(frontend, data_dir),
        messages=MessagesEndpoint(frontend),
    )
    phases = {"weights located": located, **engine.startup_seconds}
    logger.info(
        "startup: ready in %.1f s (%s)",
        time.monotonic() - started,
        ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()),
    )
    return service


def with_tensor_parallel_default(config: EngineConfig, resources: Any) -> EngineConfig:
    """tensor_parallel_size unset: the GPUs `resources.accelerator` declares on CUDA, else 1."""
    if config.tensor_parallel_size is not None:
        return config
    import torch

    on_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    gpus = declared_gpu_count(resources) if on_cuda else None
    return config.replace(tensor_parallel_size=gpus or 1)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _eos_ids(generation: dict[str, Any], tokenizer: Any) -> tuple[int, ...]:
    # generation_config may list several end tokens (Llama 3: <|eot_id|> and <|end_of_text|>).
    raw = generation.get("eos_token_id")
    ids = set(raw if isinstance(raw, list) else [raw] if raw is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def _secret(secrets: Any, name: str) -> str | None:
    try:
        return secrets.get(name) if secrets is not None else None
    except Exception:  # noqa: BLE001 - Truss raises for secrets that are declared but unset
        return None
