"""Start-up a user can follow: where the weights come from (a folder, a truss `weights`
mount) and one log line per load phase with its duration, through build_service
on the embedded model, as model.py's load() runs it."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml

from flashserve.service import build_service
from flashserve.weights import HubSource, resolve_model_dir
from tests.chat_harness import EMBEDDED_MODEL

REPO_ROOT = Path(__file__).resolve().parents[1]
SECONDS = r"\d+\.\d s"


def test_a_weights_entry_parses_repo_revision_and_mount() -> None:
    source = HubSource.parse(
        {"source": "hf://Qwen/Qwen3-8B@abc123", "mount_location": "/app/model_cache/q"}
    )
    assert source == HubSource("Qwen/Qwen3-8B", "abc123", Path("/app/model_cache/q"))
    assert HubSource.parse({"source": "hf://org/m", "mount_location": "/m"}).revision is None
    assert HubSource.parse({"source": "s3://bucket/m", "mount_location": "/m"}) is None


def test_a_repo_id_resolves_to_its_weights_mount(tmp_path, caplog) -> None:
    mount = tmp_path / "mount"
    shutil.copytree(EMBEDDED_MODEL, mount)
    weights = [{"source": "hf://org/tiny@0123", "mount_location": str(mount)}]
    with caplog.at_level(logging.INFO, logger="flashserve.weights"):
        assert resolve_model_dir("org/tiny", None, weights=weights) == mount
    (line,) = [r.getMessage() for r in caplog.records if "weights located" in r.getMessage()]
    assert "truss weights mount" in line and str(mount) in line
    assert re.search(r"1 safetensors shards, \d+\.\d\d GB", line)


def test_an_empty_weights_mount_is_a_clear_error(tmp_path) -> None:
    mount = tmp_path / "not-mounted"
    weights = [{"source": "hf://org/tiny", "mount_location": str(mount)}]
    with pytest.raises(FileNotFoundError, match="weights mount is missing or incomplete"):
        resolve_model_dir(str(mount), None, weights=weights)


def test_load_logs_every_phase_with_its_duration(caplog) -> None:
    config = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    engine = dict(config["model_metadata"]["engine"])
    # config.yaml's own settings, on the CPU with the embedded model (as `make serve`).
    engine.update(model=str(EMBEDDED_MODEL), device="cpu", dtype="float32", max_model_len=512)
    engine.update(max_num_seqs=4, max_num_batched_tokens=256, kv_cache_memory_gb=0.02)
    config["model_metadata"]["engine"] = engine
    with caplog.at_level(logging.INFO):
        service = build_service(config, REPO_ROOT / "data")
    try:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("startup:")]
        expected = [
            rf"startup: weights located \(folder\) in {SECONDS}: .*embedded_model, 1 safetensors",
            rf"startup: weights placed in {SECONDS}: \d+\.\d\d GB of torch.float32 weights on cpu",
            rf"startup: KV cache sized in {SECONDS}: \d+ blocks x 16 tokens = \d+ tokens",
            r"startup: warm-up: prefill step of 256 tokens .* in \d+\.\d\d s",
            rf"startup: ready in {SECONDS} \(weights located {SECONDS}, weights placed "
            rf"{SECONDS}, KV cache sized {SECONDS}, warm-up {SECONDS}\)",
        ]
        assert len(lines) == len(expected), lines
        for pattern, line in zip(expected, lines):
            assert re.match(pattern, line), (pattern, line)
        # No CUDA here: the graph phase is not claimed.
        assert "CUDA graphs captured" not in service.frontend.engine.engine.startup_seconds
    finally:
        service.frontend.engine.shutdown()
