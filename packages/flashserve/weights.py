"""Find the checkpoint folder a config names: a local folder, Truss's model cache, or the hub."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_CACHE_ROOT = Path("/app/model_cache")
WEIGHT_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


def resolve_model_dir(
    model: str,
    data_dir: Path | None,
    revision: str | None = None,
    hf_token: str | None = None,
    model_cache: list[dict[str, Any]] | None = None,
    lazy_data_resolver: Any = None,
) -> Path:
    if lazy_data_resolver is not None:
        # Truss streams model_cache weights in the background and will not finish
        # loading the model until we have waited for them.
        lazy_data_resolver.block_until_download_complete()
    candidates = [Path(model)]
    if data_dir is not None:
        candidates.append(Path(data_dir) / model)
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    for entry in model_cache or []:
        if entry.get("repo_id") == model and entry.get("volume_folder"):
            path = MODEL_CACHE_ROOT / entry["volume_folder"]
            if (path / "config.json").is_file():
                logger.info("weights from Truss model_cache: %s", path)
                return path
    from huggingface_hub import snapshot_download

    logger.info("downloading %s (revision %s) from the Hugging Face hub", model, revision or "main")
    return Path(
        snapshot_download(model, revision=revision, token=hf_token, allow_patterns=WEIGHT_PATTERNS)
    )
