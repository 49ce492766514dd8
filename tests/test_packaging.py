"""The Truss package shell: config.yaml, the image build context, requirement pins,
and local serving with the real Truss server (flashserve.serve / flashserve.predict)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from truss.base.truss_config import Accelerator, TrussConfig

from flashserve import serve
from tests.server_fixture import free_port, stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[1]

ENGINE_KEYS = {
    "model",
    "served_model_name",
    "revision",
    "dtype",
    "device",
    "attention_backend",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_memory_fraction",
    "kv_cache_memory_gb",
    "block_size",
    "cuda_graphs",
    "cuda_graph_max_batch",
    "async_scheduling",
    "warmup",
    "stream_interval",
    "enable_prefix_caching",
    "max_queue_size",
    "request_timeout_s",
    "engine_stall_timeout_s",
    "tool_call_parser",
    "reasoning_parser",
}

# CUDA version of the default (PyPI) Linux x86_64 wheel of each torch release, from
# PyTorch's release notes / install matrix. Extend it when requirements.txt moves on.
TORCH_DEFAULT_CUDA = {
    "2.4": "12.1",
    "2.5": "12.4",
    "2.6": "12.4",
    "2.7": "12.6",
    "2.8": "12.8",
    "2.9": "12.8",
}

FLASH_ATTN_WHEEL = re.compile(
    r"https://github\.com/Dao-AILab/flash-attention/releases/download/v(?P<tag>[\d.]+)/"
    r"flash_attn-(?P<version>[\d.]+)\+cu(?P<cuda>\d+)torch(?P<torch>\d+\.\d+)"
    r"cxx11abi(?P<abi>TRUE|FALSE)-(?P<py>cp\d+)-(?P=py)-linux_x86_64\.whl"
)


def read_requirements(path: Path) -> dict[str, Requirement]:
    reqs: dict[str, Requirement] = {}
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        req = Requirement(line)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name not in reqs, f"{path.name} lists {name} twice"
        reqs[name] = req
    return reqs


@pytest.fixture(scope="module")
def config() -> TrussConfig:
    return TrussConfig.from_yaml(REPO_ROOT / "config.yaml")


@pytest.fixture(scope="module")
def gpu_reqs() -> dict[str, Requirement]:
    return read_requirements(REPO_ROOT / "requirements.txt")


@pytest.fixture(scope="module")
def local_reqs() -> dict[str, Requirement]:
    return read_requirements(REPO_ROOT / "requirements-local.txt")


@pytest.fixture(scope="module")
def build_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serve.build_context(REPO_ROOT, tmp_path_factory.mktemp("ctx") / "context")


# ----------------------------------------------------------------------------- config.yaml


def test_config_resources_and_runtime(config: TrussConfig) -> None:
    assert config.python_version == "py311"
    assert config.resources.accelerator.accelerator == Accelerator.H100
    assert config.resources.use_gpu
    assert float(config.resources.cpu) >= 4
    assert config.resources.memory_in_bytes >= 32 * 1024**3
    assert config.runtime.predict_concurrency >= 128
    assert config.runtime.streaming_read_timeout >= 300
    assert config.requirements_file and (REPO_ROOT / config.requirements_file).is_file()


def test_config_engine_settings(config: TrussConfig) -> None:
    engine = config.model_metadata["engine"]
    assert set(engine) == ENGINE_KEYS
    assert engine["served_model_name"] == "Qwen/Qwen3-8B"
    assert engine["dtype"] == engine["device"] == engine["attention_backend"] == "auto"
    assert engine["max_num_batched_tokens"] <= engine["max_model_len"]
    assert 0 < engine["kv_cache_memory_fraction"] < 1
    assert engine["warmup"] is True  # the product warms up at load (EngineConfig default: off)
    assert config.runtime.predict_concurrency >= engine["max_num_seqs"]


def test_engine_config_accepts_config_yaml(config: TrussConfig) -> None:
    """The engine's own settings class takes config.yaml's section as it is."""
    engine_config = pytest.importorskip("flashserve.config")
    names = {f.name for f in dataclasses.fields(engine_config.EngineConfig)}
    assert ENGINE_KEYS <= names
    engine_config.EngineConfig.from_dict(config.model_metadata["engine"])


def test_weights_come_from_a_truss_weights_mount(config: TrussConfig) -> None:
    """truss 0.18.36's `weights` API, not the deprecated `model_cache`."""
    assert not config.model_cache.models
    (source,) = config.weights.sources
    assert source.is_huggingface
    repo, _, revision = source.source.removeprefix("hf://").partition("@")
    assert repo == config.model_metadata["engine"]["served_model_name"]
    assert re.fullmatch(r"[0-9a-f]{40}", revision), "pin a commit sha"
    assert source.auth_secret_name == "hf_access_token"
    assert "hf_access_token" in config.secrets
    assert config.secrets["hf_access_token"] is None, "never commit the token"
    # The engine loads exactly the folder the weights are mounted at.
    assert config.model_metadata["engine"]["model"] == source.mount_location
    assert any(p.endswith(".safetensors") for p in source.allow_patterns or [])


def test_config_yaml_uses_no_deprecated_key() -> None:
    raw = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    assert "model_cache" not in raw and "hf_cache" not in raw


# ----------------------------------------------------------------------------- build context


def test_build_context_has_the_image_layout(build_context: Path) -> None:
    for path in (
        "server/main.py",
        "server/truss_server.py",
        "server/model_wrapper.py",
        "server/requirements.txt",
        "model",
        "data/embedded_model/config.json",
        "data/embedded_model/model.safetensors",
        "packages/flashserve/serve.py",
        "config.yaml",
        "Dockerfile",
    ):
        assert (build_context / path).exists(), path
    # The normalized config the image ships still loads.
    shipped = TrussConfig.from_yaml(build_context / "config.yaml")
    assert shipped.model_metadata["engine"]["served_model_name"] == "Qwen/Qwen3-8B"
    dockerfile = (build_context / "Dockerfile").read_text()
    assert "truss-server-base:3.11" in dockerfile
    # Weights are mounted at run time: the image carries no model_cache download step.
    assert "bptr" not in dockerfile and "truss-transfer" not in dockerfile
    # The GPU requirements are what the image installs beside the server's own.
    assert "flash_attn-" in (build_context / "user_requirements.txt").read_text()


def test_local_requirements_cover_the_truss_server(
    build_context: Path, local_reqs: dict[str, Requirement]
) -> None:
    server_reqs = read_requirements(build_context / "server" / "requirements.txt")
    for name, req in server_reqs.items():
        assert name in local_reqs, f"requirements-local.txt lacks the server's {name}"
        (pin,) = local_reqs[name].specifier
        assert req.specifier.contains(pin.version, prereleases=True), (
            f"{name}{pin} does not satisfy the server's {req.specifier}"
        )


# ----------------------------------------------------------------------------- pins


def test_flash_attn_wheel_matches_torch_cuda_and_python(
    config: TrussConfig, gpu_reqs: dict[str, Requirement]
) -> None:
    torch_pin = str(gpu_reqs["torch"].specifier)
    assert torch_pin.startswith("=="), "pin torch exactly in requirements.txt"
    torch_mm = ".".join(torch_pin[2:].split(".")[:2])
    wheel = FLASH_ATTN_WHEEL.fullmatch(gpu_reqs["flash-attn"].url or "")
    assert wheel, f"not a flash-attention release wheel URL: {gpu_reqs['flash-attn'].url}"
    assert wheel["tag"] == wheel["version"] == "2.8.3"
    assert wheel["torch"] == torch_mm
    assert wheel["py"] == "cp" + config.python_version.removeprefix("py")
    assert torch_mm in TORCH_DEFAULT_CUDA, f"add torch {torch_mm} to TORCH_DEFAULT_CUDA"
    assert wheel["cuda"] == TORCH_DEFAULT_CUDA[torch_mm].split(".")[0]
    assert wheel["abi"] == "TRUE"  # PyPI's torch is built with the C++11 ABI


def test_gpu_requirements_are_pinned(gpu_reqs: dict[str, Requirement]) -> None:
    for name in ("torch", "transformers", "safetensors", "tokenizers", "sentencepiece"):
        assert name in gpu_reqs, name
    for name in ("protobuf", "jsonschema", "xgrammar", "huggingface-hub", "prometheus-client"):
        assert name in gpu_reqs, name
    assert str(gpu_reqs["xgrammar"].specifier) == "==0.2.8"
    for name, req in gpu_reqs.items():
        if req.url is None:
            assert str(req.specifier).startswith("=="), f"{name} is not pinned"


def test_local_requirements_are_cpu_only_and_pinned(local_reqs: dict[str, Requirement]) -> None:
    assert "flash-attn" not in local_reqs
    assert str(local_reqs["torch"].specifier) == "==2.13.0"
    assert str(local_reqs["truss"].specifier) == "==0.18.36"
    for name in ("openai", "pytest", "hypothesis", "ruff", "mistral-common", "httpx"):
        assert name in local_reqs, name
    for name, req in local_reqs.items():
        assert req.url is None and str(req.specifier).startswith("=="), f"{name} is not pinned"


def test_shared_packages_pinned_alike(
    gpu_reqs: dict[str, Requirement], local_reqs: dict[str, Requirement]
) -> None:
    shared = (set(gpu_reqs) & set(local_reqs)) - {"torch"}  # CUDA vs CPU build, on purpose
    assert {"transformers", "xgrammar", "jsonschema", "safetensors", "tokenizers"} <= shared
    for name in sorted(shared):
        assert gpu_reqs[name].specifier == local_reqs[name].specifier, name


# ----------------------------------------------------------------------------- serve.py


def test_apply_overrides_sets_engine_and_drops_the_weights_mount() -> None:
    raw = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    out = serve.apply_overrides(raw, {**serve.DEFAULT_OVERRIDES, "max_num_seqs": 4})
    engine = out["model_metadata"]["engine"]
    assert engine["model"] == "embedded_model"
    assert (engine["device"], engine["dtype"], engine["max_model_len"]) == ("cpu", "float32", 2048)
    assert engine["max_num_seqs"] == 4
    for key, value in serve.DEFAULT_OVERRIDES.items():
        assert engine[key] == value, key
    assert (
        engine["max_num_batched_tokens"]
        == raw["model_metadata"]["engine"]["max_num_batched_tokens"]
    )
    assert out["weights"] == [] and "model_cache" not in out
    assert raw["weights"], "the input config is left alone"
    with pytest.raises(ValueError, match="unknown engine setting"):
        serve.apply_overrides(raw, {"max_num_seq": 4})


def test_parse_set_reads_yaml_scalars() -> None:
    assert serve.parse_set(["max_num_seqs=8", "enable_prefix_caching=false", "revision=null"]) == {
        "max_num_seqs": 8,
        "enable_prefix_caching": False,
        "revision": None,
    }


def test_serve_refuses_a_port_in_use_before_touching_the_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second `make serve` must not lay out the app over a running server's files."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        build_dir = tmp_path / "build"
        assert serve.main(["--port", str(port), "--build-dir", str(build_dir)]) == 1
    assert f"port {port} is already in use" in capsys.readouterr().err
    assert not build_dir.exists()
    assert not serve.port_in_use(port)


STUB_MODEL = """
import json
from pathlib import Path

import fastapi


class Model:
    def __init__(self, **kwargs):
        self._config = kwargs["config"]
        self._data_dir = Path(kwargs["data_dir"])

    def load(self):
        self._engine = self._config["model_metadata"]["engine"]
        assert (self._data_dir / self._engine["model"] / "config.json").is_file()

    async def predict(self, inputs, request: fastapi.Request):
        import flashserve

        return {"engine": self._engine, "flashserve": flashserve.__file__, "echo": inputs}

    async def chat_completions(self, inputs, request: fastapi.Request):
        async def chunks():
            for word in ("hello", " world"):
                delta = {"choices": [{"index": 0, "delta": {"content": word}}]}
                yield "data: " + json.dumps(delta) + "\\n\\n"
            yield "data: " + json.dumps({"error": {"message": "boom"}}) + "\\n\\n"
            yield "data: [DONE]\\n\\n"

        if inputs.get("stream"):
            return chunks()
        return {"choices": [{"index": 0, "message": {"content": "hello world"}}]}
"""


@pytest.mark.slow
def test_serve_runs_the_truss_server_on_a_stub_model(tmp_path: Path) -> None:
    """serve.py and predict.py against the real server, with a stand-in model.py."""
    truss_dir = tmp_path / "truss"
    truss_dir.mkdir()
    for name in ("config.yaml", "requirements.txt"):
        shutil.copy(REPO_ROOT / name, truss_dir / name)
    shutil.copytree(REPO_ROOT / "data", truss_dir / "data")
    shutil.copytree(
        REPO_ROOT / "packages", truss_dir / "packages", ignore=shutil.ignore_patterns("__pycache__")
    )
    (truss_dir / "model").mkdir()
    (truss_dir / "model" / "model.py").write_text(textwrap.dedent(STUB_MODEL))

    port = free_port()
    build_dir = tmp_path / "build"
    log_path = tmp_path / "server.log"
    proc = serve.start_local_server(truss_dir, port, {"max_num_seqs": 4}, log_path, build_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        serve.wait_until_ready(port, 120, proc=proc)
        answer = httpx.post(f"{base}/v1/models/model:predict", json={"x": 1}, timeout=30).json()
        assert answer["echo"] == {"x": 1}
        assert answer["engine"]["model"] == "embedded_model"
        assert answer["engine"]["max_num_seqs"] == 4
        assert answer["engine"]["device"] == "cpu"
        assert answer["flashserve"].startswith(str(build_dir))  # the image's copy of packages/

        cli = [sys.executable, "-m", "flashserve.predict", "--url", base, "-d"]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "packages")}
        done = subprocess.run(
            [*cli, '{"messages": [], "stream": true}'], capture_output=True, text=True, env=env
        )
        assert done.stdout == "hello world\n"
        assert "boom" in done.stderr and done.returncode == 1
        done = subprocess.run([*cli, '{"messages": []}'], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["choices"][0]["message"]["content"] == "hello world"
        done = subprocess.run(
            [*cli, '{"y": 2}', "--endpoint", "predict"], capture_output=True, text=True, env=env
        )
        assert json.loads(done.stdout)["echo"] == {"y": 2}
    except BaseException:
        print(log_path.read_text(errors="replace"))
        raise
    finally:
        stop_process_group(proc)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of the server's group is left
