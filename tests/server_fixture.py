"""The real Truss server on the embedded model, started once per test session.

Use it from a test module or conftest.py:

    pytest_plugins = ["tests.server_fixture"]

    def test_something(truss_server: str) -> None:
        httpx.get(f"{truss_server}/v1/models/model")

The server runs in its own process group, built into a temporary folder by
flashserve.serve (the same path `make serve` takes). Its log is printed when it
fails to start and, at the end of the session, when any test failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flashserve.serve import start_local_server, wait_until_ready

REPO_ROOT = Path(__file__).resolve().parents[1]
# Loading the engine on two busy CPU cores can take a while; a hung start must
# still end the session.
STARTUP_TIMEOUT_S = float(os.environ.get("FLASHSERVE_STARTUP_TIMEOUT", "240"))


_SERVER_LOG = pytest.StashKey[Path]()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stray children of the server
    except ProcessLookupError:
        pass
    proc.wait()


def dump_log(config: pytest.Config, log_path: Path, why: str) -> None:
    text = log_path.read_text(errors="replace") if log_path.exists() else "(no log)"
    banner = f" truss server log ({why}): {log_path} "
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(banner, text, sep="\n", file=sys.__stderr__)
        return
    # Past pytest's output capture: at session teardown the captured output would
    # only be shown if this teardown itself failed.
    with capture.global_and_fixture_disabled():
        reporter.write_sep("=", banner)
        reporter.write_line(text)


@pytest.fixture(scope="session")
def truss_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Base URL (http://127.0.0.1:<port>) of the Truss server on the embedded model."""
    build_dir = tmp_path_factory.mktemp("truss_server")
    log_path = build_dir / "server.log"
    request.config.stash[_SERVER_LOG] = log_path
    port = free_port()
    # One torch thread: the test process shares the two cores, and an oversubscribed
    # engine step is many times slower than a single-threaded one.
    proc = start_local_server(REPO_ROOT, port, {"cpu_threads": 1}, log_path, build_dir=build_dir)
    try:
        wait_until_ready(port, STARTUP_TIMEOUT_S, proc=proc)
    except Exception:
        stop_process_group(proc)
        dump_log(request.config, log_path, "failed to start")
        raise
    failed_before = request.session.testsfailed
    yield f"http://127.0.0.1:{port}"
    stop_process_group(proc)
    if request.session.testsfailed > failed_before:
        dump_log(request.config, log_path, "tests failed")


@pytest.fixture(scope="session")
def truss_server_log(truss_server: str, request: pytest.FixtureRequest) -> Path:
    """The session server's log file, for tests that check what it logged."""
    return request.config.stash[_SERVER_LOG]
