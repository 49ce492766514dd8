"""Serve this truss with the real Truss server on localhost, without Docker.

    python -m flashserve.serve [--model PATH_OR_ID] [--port 8080] [--device cpu]
        [--dtype float32] [--max-model-len 2048] [--build-dir build/serve]
        [--set key=value ...]

This does what the serving image does: `truss image build-context` writes the
image's files (Baseten's inference server, model/, data/, packages/, a
normalized config.yaml); we lay them out like /app in the image (server files at
the app root), apply engine overrides to config.yaml, put packages/ on
PYTHONPATH (the image copies it to /packages and adds it to sys.path) and run
`python main.py` with INFERENCE_SERVER_PORT. By default the engine serves the
embedded test model (data/embedded_model) on the CPU in float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

# Engine settings for local runs: the tiny embedded checkpoint, on the CPU, in
# float32 (faster than bf16 on these CPUs), with a short context so the KV cache
# budget stays small.
DEFAULT_OVERRIDES: dict[str, Any] = {
    "model": "embedded_model",
    "served_model_name": "flashserve-embedded-tiny-llama",
    "device": "cpu",
    "dtype": "float32",
    "max_model_len": 2048,
}

# The `truss` console script of this interpreter's environment (truss has no __main__).
_TRUSS_CLI = "import sys; from truss.cli.cli import truss_cli; sys.argv[0] = 'truss'; truss_cli()"


def build_context(repo_root: Path, out_dir: Path) -> Path:
    """`truss image build-context out_dir repo_root`, truss's own CLI.

    It works offline: config.yaml's `weights` are mounted by Baseten at run time,
    so building the context asks no hub for anything (the deprecated
    `model_cache: use_volume: true` asked the HF API for a file manifest).
    """
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", _TRUSS_CLI, "image", "build-context", "--non-interactive"]
        + [str(out_dir), str(repo_root)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"truss image build-context failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return out_dir


def _engine_setting_names() -> set[str]:
    """Settings the engine accepts beyond those config.yaml lists (test-only knobs)."""
    try:
        from flashserve.config import EngineConfig
    except ImportError:  # the engine's config module is optional for laying out the app
        return set()
    return {f.name for f in dataclasses.fields(EngineConfig)}


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a truss config with `overrides` set under model_metadata.engine."""
    config = dict(config)
    metadata = dict(config.get("model_metadata") or {})
    engine = dict(metadata.get("engine") or {})
    known = set(engine) | _engine_setting_names()
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown engine setting(s) {unknown}; known: {sorted(known)}")
    engine.update(overrides)
    metadata["engine"] = engine
    config["model_metadata"] = metadata
    # Local weights come from data/ or a folder: no Baseten weights mount here.
    config["weights"] = []
    config.pop("model_cache", None)
    return config


def prepare_app(repo_root: Path, build_dir: Path, overrides: dict[str, Any]) -> Path:
    """Build the image context into build_dir/context and lay out build_dir/app like /app."""
    context = build_context(repo_root, build_dir / "context")
    app = build_dir / "app"
    if app.exists():
        shutil.rmtree(app)
    shutil.copytree(context / "server", app)
    shutil.copytree(context / "model", app / "model")
    shutil.copytree(context / "data", app / "data")
    config = yaml.safe_load((context / "config.yaml").read_text())
    config = apply_overrides(config, overrides)
    (app / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return app


def server_env(build_dir: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    packages = str(build_dir / "context" / "packages")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (packages, env.get("PYTHONPATH")) if p)
    env["INFERENCE_SERVER_PORT"] = str(port)
    # Nothing local may reach the HF hub; the embedded model is on disk.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_local_server(
    repo_root: Path,
    port: int,
    overrides: dict[str, Any] | None = None,
    log_path: Path | None = None,
    build_dir: Path | None = None,
) -> subprocess.Popen:
    """Start the Truss server in its own process group; output goes to log_path.

    overrides are merged over DEFAULT_OVERRIDES. The caller stops the server by
    killing the process group (os.killpg(proc.pid, ...)).
    """
    repo_root = Path(repo_root).resolve()
    build_dir = Path(build_dir or repo_root / "build" / "serve").resolve()
    app = prepare_app(repo_root, build_dir, {**DEFAULT_OVERRIDES, **(overrides or {})})
    log_path = Path(log_path or build_dir / "server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "main.py"],
            cwd=app,
            env=server_env(build_dir, port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until_ready(
    port: int, timeout: float = 120.0, proc: subprocess.Popen | None = None
) -> None:
    """Poll GET /v1/models/model until 200; raise if proc exits or timeout passes."""
    url = f"http://127.0.0.1:{port}/v1/models/model"
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"server on port {port} not ready after {timeout:.0f}s")
        time.sleep(0.25)


def port_in_use(port: int) -> bool:
    """Whether a server already listens on `port` (on any address, as the Truss server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn does: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set key=value pairs; values are YAML scalars (2048 -> int, true -> bool, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashserve.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="HF repo id or local folder (default: embedded_model)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--device", help="auto | cuda | cpu (default: cpu)")
    parser.add_argument("--dtype", help="auto | bfloat16 | float16 | float32 (default: float32)")
    parser.add_argument("--max-model-len", type=int, help="default: 2048")
    parser.add_argument("--build-dir", type=Path, default=REPO_ROOT / "build" / "serve")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other model_metadata.engine setting; repeatable",
    )
    args = parser.parse_args(argv)

    overrides = parse_set(args.sets)
    for key, value in (
        ("model", args.model),
        ("device", args.device),
        ("dtype", args.dtype),
        ("max_model_len", args.max_model_len),
    ):
        if value is not None:
            overrides[key] = value
    overrides = {**DEFAULT_OVERRIDES, **overrides}
    if isinstance(overrides["model"], str) and Path(overrides["model"]).exists():
        # A folder named on the command line is relative to where we stand, not data/.
        overrides["model"] = str(Path(overrides["model"]).resolve())

    # Checked first: laying out the app would replace the files of a server still running
    # from this build folder, and the Truss server would load the model before failing.
    if port_in_use(args.port):
        print(
            f"port {args.port} is already in use (a server still running?): stop it, or "
            "serve on another port (make serve PORT=8081, or --port 8081)",
            file=sys.stderr,
        )
        return 1
    build_dir = args.build_dir.resolve()
    started = time.monotonic()
    app = prepare_app(REPO_ROOT, build_dir, overrides)
    print(
        f"app laid out in {app} ({time.monotonic() - started:.1f}s); engine: {overrides}",
        flush=True,
    )
    env = server_env(build_dir, args.port)
    os.chdir(app)
    # exec: Ctrl-C and signals reach the server itself, as in the image.
    os.execve(sys.executable, [sys.executable, "main.py"], env)


if __name__ == "__main__":
    sys.exit(main())
