"""A tensor-parallel worker that dies mid-stream, and servers stopped by signal.

The embedded model at tensor_parallel_size 2 behind the real Truss server.
Killing rank 1 (or stopping it: a hang) while requests stream ends them with
errors within engine_stall_timeout_s (not a hang), turns health false,
refuses new requests with 503 and leaves no worker behind. SIGINT to a healthy tp=2 server, or SIGKILL, leaves no process either.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.ops_client import CHAT, sample, scrape, seeded, stream_chat, wait_until
from tests.private_server import private_server
from tests.tensor_parallel_support import free_port, spawned_workers

pytest_plugins = ["tests.server_fixture"]

HELLO = [{"role": "user", "content": "Say something about the sea."}]
ENDLESS = seeded(HELLO, 2000)
STALL_TIMEOUT_S = 8


def tp2_server(request, tmp_path_factory, name: str):
    overrides = {
        "tensor_parallel_size": 2,
        "tensor_parallel_port": free_port(),
        "engine_stall_timeout_s": STALL_TIMEOUT_S,
    }
    return private_server(request, tmp_path_factory, overrides, name)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_worker_that_dies_or_hangs_mid_stream_fails_requests_and_health(
    request, tmp_path_factory, fault: str
) -> None:
    with tp2_server(request, tmp_path_factory, f"tp_{fault}_server") as server:
        url = server.url
        workers = spawned_workers(server.proc.pid)
        assert len(workers) == 1
        assert httpx.get(f"{url}/v1/models/model", timeout=10).status_code == 200

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                streams = [asyncio.create_task(stream_chat(http, ENDLESS)) for _ in range(3)]
                plain = asyncio.create_task(http.post(CHAT, json=ENDLESS))
                await asyncio.sleep(2.0)  # every request is generating by now
                if fault == "killed":
                    workers[0].kill()
                else:
                    workers[0].suspend()  # SIGSTOP: alive, never answers
                return await asyncio.gather(*streams), await plain

        started = time.monotonic()
        streams, plain = asyncio.run(run())
        assert time.monotonic() - started < 2.0 + STALL_TIMEOUT_S + 5
        for result in streams:
            assert not result.done and result.error is not None, result
            assert result.text  # it was streaming when the worker died
        assert plain.status_code in (500, 503), plain.text
        assert wait_until(
            lambda: httpx.get(f"{url}/v1/models/model", timeout=10).status_code != 200, 10
        )
        assert sample(scrape(url), "flashserve_engine_healthy") == 0
        reply = httpx.post(f"{url}{CHAT}", json=seeded(HELLO, 2), timeout=10)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_dead"
        assert wait_until(lambda: not spawned_workers(server.proc.pid), 10)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_a_stopped_or_killed_server_leaves_no_process(request, tmp_path_factory, sig) -> None:
    """SIGINT: a normal exit terminates the daemonic workers; SIGKILL: the workers see
    their parent gone and exit on their own."""
    with tp2_server(request, tmp_path_factory, f"tp_{sig.name.lower()}_server") as server:
        reply = httpx.post(f"{server.url}{CHAT}", json=seeded(HELLO, 4), timeout=60)
        assert reply.status_code == 200
        assert len(spawned_workers(server.proc.pid)) == 1
        # Everything the server started (workers, multiprocessing's helpers).
        descendants = psutil.Process(server.proc.pid).children(recursive=True)
        os.kill(server.proc.pid, sig)  # the server alone, not its process group
        server.proc.wait(timeout=30)
        _, alive = psutil.wait_procs(descendants, timeout=15)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
