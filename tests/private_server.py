"""A Truss server of a test module's own, with engine overrides (small KV cache, faults).

The session's `truss_server` (tests/server_fixture.py) runs the production
settings; tests that need others (a KV cache too small for their load, a short
queue, an injected engine fault) start one of these instead, once per module:

    small_server = private_server_fixture({"max_queue_size": 4}, "small_server")

    def test_queue(small_server: PrivateServer) -> None: ...
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flashserve.serve import start_local_server, wait_until_ready

# One torch thread: on two cores the engine, the HTTP event loop and the test's
# clients share the machine, and OpenMP threads that spin-wait for a busy core
# turn a 20 ms step into 600 ms.
QUIET_CPU = {"cpu_threads": 1}


@dataclass
class PrivateServer:
    url: str
    proc: subprocess.Popen
    log_path: Path


@contextmanager
def private_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    overrides: dict[str, Any],
    name: str = "private_server",
) -> Iterator[PrivateServer]:
    # Imported here: a test module that lists tests.server_fixture in pytest_plugins
    # must let pytest import it first (for assertion rewriting).
    from tests.server_fixture import (
        REPO_ROOT,
        STARTUP_TIMEOUT_S,
        dump_log,
        free_port,
        stop_process_group,
    )

    build_dir = tmp_path_factory.mktemp(name)
    log_path = build_dir / "server.log"
    port = free_port()
    proc = start_local_server(REPO_ROOT, port, {**QUIET_CPU, **overrides}, log_path, build_dir)
    try:
        wait_until_ready(port, STARTUP_TIMEOUT_S, proc=proc)
    except Exception:
        stop_process_group(proc)
        dump_log(request.config, log_path, f"{name} failed to start")
        raise
    failed_before = request.session.testsfailed
    try:
        yield PrivateServer(f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        stop_process_group(proc)
        if request.session.testsfailed > failed_before:
            dump_log(request.config, log_path, f"{name}: tests failed")


def private_server_fixture(
    overrides: dict[str, Any], name: str
) -> Callable[..., Iterator[PrivateServer]]:
    """A module-scoped fixture called `name` that runs a private server with `overrides`;
    assign it to that name in the test module."""

    @pytest.fixture(scope="module", name=name)
    def fixture(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[PrivateServer]:
        with private_server(request, tmp_path_factory, overrides, name) as server:
            yield server

    return fixture
