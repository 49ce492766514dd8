"""Find the checkpoint folder a config names: a local folder, a Truss `weights` mount, or the hub.

Every way logs where the weights came from, how many bytes in how many shards,
and how long it took (docs/operations.md lists the lines), so that a replica's
start-up can be followed from its logs.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
HF_SCHEME = "hf://"


@dataclass(frozen=True)
class HubSource:
    """One `weights` entry of a truss config whose source is a Hugging Face repo."""

    repo_id: str
    revision: str | None
    mount_location: Path

    @classmethod
    def parse(cls, entry: dict[str, Any]) -> HubSource | None:
        source = str(entry.get("source") or "")
        if not source.startswith(HF_SCHEME) or not entry.get("mount_location"):
            return None
        repo, _, revision = source[len(HF_SCHEME) :].partition("@")
        return cls(repo, revision or None, Path(entry["mount_location"]))


def folder_summary(folder: Path) -> tuple[int, int]:
    """(number of *.safetensors shards, bytes of all files) under folder."""
    shards = 0
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            total += path.stat().st_size
            shards += path.suffix == ".safetensors"
    return shards, total


def _log_located(how: str, folder: Path, seconds: float) -> None:
    shards, total = folder_summary(folder)
    logger.info(
        "startup: weights located (%s) in %.1f s: %s, %d safetensors shards, %.2f GB",
        how,
        seconds,
        folder,
        shards,
        total / 1e9,
    )


def resolve_model_dir(
    model: str,
    data_dir: Path | None,
    revision: str | None = None,
    hf_token: str | None = None,
    weights: list[dict[str, Any]] | None = None,
    lazy_data_resolver: Any = None,
) -> Path:
    """The folder to load `model` from.

    `model` is a folder (absolute, or relative to data_dir), the mount_location
    of one of the truss config's `weights` entries, or an HF repo id: a `weights`
    entry with source hf://<model> gives its mount, else the hub is asked.
    """
    started = time.monotonic()
    if lazy_data_resolver is not None:
        # Truss may still be fetching weights in a background thread; it refuses to
        # finish loading unless we wait for them (this returns at once otherwise).
        lazy_data_resolver.block_until_download_complete()
    waited = time.monotonic() - started
    sources = [s for s in (HubSource.parse(e) for e in weights or []) if s is not None]
    candidates = [Path(model)]
    if data_dir is not None:
        candidates.append(Path(data_dir) / model)
    candidates += [s.mount_location for s in sources if s.repo_id == model]
    for path in candidates:
        if (path / "config.json").is_file():
            how = (
                "truss weights mount"
                if any(path == s.mount_location for s in sources)
                else "folder"
            )
            if waited >= 0.1:
                how += f", {waited:.1f} s waiting for truss's download"
            _log_located(how, path, time.monotonic() - started)
            return path
    if any(Path(model) == s.mount_location for s in sources):
        raise FileNotFoundError(
            f"model {model!r} is a weights mount_location but holds no config.json: "
            "the weights mount is missing or incomplete"
        )
    folder = download_from_hub(model, revision, hf_token)
    _log_located("downloaded from the Hugging Face hub", folder, time.monotonic() - started)
    return folder


def download_from_hub(repo_id: str, revision: str | None, token: str | None) -> Path:
    """snapshot of repo_id's weight files, one file at a time, logging each with its rate."""
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=True)
    files = [
        s
        for s in info.siblings or []
        if any(fnmatch.fnmatch(s.rfilename, p) for p in WEIGHT_PATTERNS)
    ]
    total = sum(s.size or 0 for s in files)
    logger.info(
        "startup: downloading %s@%s from the Hugging Face hub: %d files, %.2f GB",
        repo_id,
        info.sha,
        len(files),
        total / 1e9,
    )
    started = time.monotonic()
    done = 0
    folder: Path | None = None
    # Largest last, so that the small files (config, tokenizer) fail fast on a bad token.
    for i, sibling in enumerate(sorted(files, key=lambda s: s.size or 0), 1):
        path = Path(hf_hub_download(repo_id, sibling.rfilename, revision=info.sha, token=token))
        folder = path.parents[len(Path(sibling.rfilename).parts) - 1]
        if sibling.rfilename == "config.json":
            # An architecture the engine cannot run fails here, before the shards download.
            from flashserve.models.model_config import ModelConfig

            ModelConfig.from_pretrained(folder)
        done += sibling.size or 0
        elapsed = max(time.monotonic() - started, 1e-6)
        if sibling.rfilename.endswith(".safetensors") or i == len(files):
            logger.info(
                "startup: downloaded %d/%d %s: %.2f/%.2f GB in %.0f s (%.2f GB/s)",
                i,
                len(files),
                sibling.rfilename,
                done / 1e9,
                total / 1e9,
                elapsed,
                done / 1e9 / elapsed,
            )
    if folder is None:
        raise FileNotFoundError(f"{repo_id}@{revision or 'main'} has no weight files")
    return folder
