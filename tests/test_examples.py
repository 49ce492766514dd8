"""The example deployments (examples/*/config.yaml) and the default config.yaml: each
loads as truss push would load it (the repository root as the truss, the example as
--config), takes its weights from a `weights` mount the engine reads, carries its
memory arithmetic in a comment, and sets health checks within truss's limits."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from truss.base.truss_config import TrussConfig
from truss.truss_handle.build import load

from flashserve.config import EngineConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*/config.yaml"))
CONFIGS = [REPO_ROOT / "config.yaml", *EXAMPLES]
# Engine settings an example may name before the engine has them (none now).
PENDING_ENGINE_KEYS: set[str] = set()
# truss 0.18.36 / Baseten: start-up may be extended to at most 50 minutes.
MAX_STARTUP_SECONDS = 3000


def config_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


@pytest.fixture(scope="module", params=CONFIGS, ids=config_id)
def example(request) -> tuple[Path, TrussConfig]:
    path = request.param
    # What `truss push --config <path>` does from the repository root.
    handle = load(REPO_ROOT, config_path=path)
    return path, handle.spec.config


def test_there_are_examples_for_one_gpu_a_moe_and_tensor_parallel() -> None:
    names = {p.parent.name for p in EXAMPLES}
    assert {"qwen3-30b-a3b-h100", "llama-3.3-70b-h100x4"} <= names


def test_example_loads_with_truss_and_names_the_package(example) -> None:
    path, config = example
    assert TrussConfig.from_yaml(path).model_name == config.model_name
    assert config.model_module_dir == "model" and config.bundled_packages_dir == "packages"
    assert (REPO_ROOT / config.requirements_file).is_file()
    assert config.resources.accelerator.accelerator.value in ("H100", "H200")


def test_example_engine_reads_its_weights_mount(example) -> None:
    _, config = example
    engine = config.model_metadata["engine"]
    assert not config.model_cache.models, "model_cache is deprecated: use weights"
    (source,) = config.weights.sources
    assert source.is_huggingface and source.auth_secret_name == "hf_access_token"
    assert engine["model"] == source.mount_location
    repo = source.source.removeprefix("hf://").partition("@")[0]
    assert engine["served_model_name"] == repo
    assert config.secrets == {"hf_access_token": None}, "never commit a token"


def test_example_engine_settings_are_engine_settings(example) -> None:
    _, config = example
    engine = dict(config.model_metadata["engine"])
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(engine) - known <= PENDING_ENGINE_KEYS
    for key in set(engine) - known:
        engine.pop(key)
    EngineConfig.from_dict(engine)
    gpus = config.resources.accelerator.count
    assert config.model_metadata["engine"].get("tensor_parallel_size", 1) == gpus
    assert config.runtime.predict_concurrency >= engine.get("max_num_seqs", 256)


def test_example_states_its_memory_arithmetic(example) -> None:
    path, _ = example
    comments = "\n".join(
        line for line in path.read_text().splitlines() if line.lstrip().startswith("#")
    )
    for term in ("weights", "KV cache", "headroom", "params x 2 B", "KiB"):
        assert term in comments, f"{config_id(path)}: no {term!r} in its memory comment"


def test_example_health_checks_wait_for_start_up_and_act_on_faults(example) -> None:
    _, config = example
    checks = config.runtime.health_checks
    assert checks.startup_threshold_seconds is not None
    assert 600 <= checks.startup_threshold_seconds <= MAX_STARTUP_SECONDS
    assert 0 < checks.stop_traffic_threshold_seconds < checks.restart_threshold_seconds
    assert checks.restart_threshold_seconds < checks.startup_threshold_seconds


def test_the_deepseek_v3_class_is_answered_in_the_examples_readme() -> None:
    text = (REPO_ROOT / "examples" / "README.md").read_text()
    assert re.search(r"DeepSeek-V3 class.*the full model does not fit", text)
    assert "8x H200" in text and "FP8" in text
    # What the note says the engine implements, it does.
    from flashserve.models.registry import supported_architectures

    assert "DeepseekV3ForCausalLM" in text and "DeepseekV3ForCausalLM" in supported_architectures()
