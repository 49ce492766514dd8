"""Faults: dropped clients, deadlines, a full queue and an engine loop that dies.

Dropped streams and deadlines run on the session's server. The queue and the
engine fault need a server of their own: two sequences at a time, four
waiting at most, and an engine loop that raises after FAULT_AFTER_STEPS steps
(`fault_after_steps`, a test-only setting). Its tests run in file order: the
queue test uses a few dozen steps, the fault test then runs the engine into
the fault.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from flashserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    RequestTimeoutError,
)
from flashserve.engine.llm_engine import EngineStats
from flashserve.engine.sequence import SequenceOutput
from tests.ops_client import (
    CHAT,
    engine_idle,
    sample,
    scrape,
    seeded,
    stream_chat,
    wait_until,
)
from tests.private_server import PrivateServer, private_server_fixture

pytest_plugins = ["tests.server_fixture"]
slow = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say something about the sea."}]
# Long enough that nothing finishes before the test is done with it.
# Longer than any deadline below can let run: the 2048-token context allows ~2000.
ENDLESS = seeded(HELLO, 2000)
QUEUE = 4
FAULT_AFTER_STEPS = 300
STREAM_INTERVAL = 3
FAULT_OVERRIDES = {
    "max_num_seqs": 2,
    "max_queue_size": QUEUE,
    "fault_after_steps": FAULT_AFTER_STEPS,
    # Also this server's chunking, so config.yaml's key is checked through a real server.
    "stream_interval": STREAM_INTERVAL,
}

fault_server = private_server_fixture(FAULT_OVERRIDES, "fault_server")


def client(url: str, timeout: float = 120) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=300)
    )


# -- cancellation ----------------------------------------------------------------


@slow
def test_100_streams_dropped_at_random_points_free_all_their_blocks(truss_server: str) -> None:
    before = scrape(truss_server)
    drop_points = random.Random(7).choices(range(0, 25), k=100)

    async def run() -> list:
        async with client(truss_server) as http:
            return await asyncio.gather(
                *(stream_chat(http, ENDLESS, stop_after_events=n) for n in drop_points)
            )

    results = asyncio.run(run())
    assert all(r.status == 200 for r in results), [r.status for r in results]
    assert not any(r.done for r in results)
    # Each abort reaches the engine within one step of the server noticing the drop.
    assert wait_until(lambda: engine_idle(truss_server), 15), scrape(truss_server)
    aborted = sample(scrape(truss_server), "flashserve_requests_total", outcome="aborted")
    assert aborted - sample(before, "flashserve_requests_total", outcome="aborted") == 100
    reply = httpx.post(f"{truss_server}{CHAT}", json=seeded(HELLO, 2), timeout=60)
    assert reply.status_code == 200


@slow
def test_non_streaming_client_that_leaves_is_aborted(
    truss_server: str, truss_server_log: Path
) -> None:
    log = truss_server_log
    logged_before = log.read_text(errors="replace")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{truss_server}{CHAT}", json=ENDLESS, timeout=1.0)
    # The server polls for the disconnect every 0.25 s, then aborts within a step.
    assert wait_until(lambda: engine_idle(truss_server), 10), scrape(truss_server)
    # A client leaving is not a crash: the handler ends without an ASGI error logged.
    logged = log.read_text(errors="replace")[len(logged_before) :]
    assert "Exception in ASGI application" not in logged and "Traceback" not in logged


@slow
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_request_past_its_deadline_is_aborted(truss_server: str, stream: bool) -> None:
    before = sample(scrape(truss_server), "flashserve_requests_total", outcome="timeout")
    headers = {"x-request-timeout": "0.4"}
    started = time.monotonic()

    async def run():
        async with client(truss_server) as http:
            if stream:
                return await stream_chat(http, ENDLESS, headers=headers)
            response = await http.post(CHAT, json=ENDLESS, headers=headers)
            return response.status_code, response.json()

    result = asyncio.run(run())
    took = time.monotonic() - started
    if stream:
        # Past its first token a stream cannot change its status: an error event ends it.
        assert result.status == 200 and not result.done
        error = result.error
    else:
        status, body = result
        assert status == 504
        error = body["error"]
    assert error["code"] == "timeout" and error["type"] == "timeout_error"
    assert took < 0.4 + 5, f"the deadline of 0.4 s ended the request after {took:.1f} s"
    assert wait_until(lambda: engine_idle(truss_server), 10), scrape(truss_server)
    after = sample(scrape(truss_server), "flashserve_requests_total", outcome="timeout")
    assert after == before + 1


@slow
def test_bad_timeout_header_is_a_400(truss_server: str) -> None:
    for value in ("soon", "-1", "0", "nan", "inf"):
        reply = httpx.post(
            f"{truss_server}{CHAT}",
            json=seeded(HELLO, 2),
            headers={"x-request-timeout": value},
            timeout=30,
        )
        assert reply.status_code == 400, (value, reply.text)
        assert reply.json()["error"]["code"] == "invalid_timeout"


# -- overload and engine faults (own server, in this order) ------------------------


@slow
def test_full_queue_answers_503_with_retry_after_and_drops_nothing(
    fault_server: PrivateServer,
) -> None:
    bodies = [seeded([{"role": "user", "content": f"queue {i}"}], 8) for i in range(16)]

    async def run() -> list[httpx.Response]:
        async with client(fault_server.url) as http:
            return await asyncio.gather(*(http.post(CHAT, json=body) for body in bodies))

    replies = asyncio.run(run())
    refused = [r for r in replies if r.status_code == 503]
    served = [r for r in replies if r.status_code == 200]
    assert len(refused) + len(served) == len(bodies), [r.status_code for r in replies]
    # At least QUEUE get in (two more once the engine has admitted the first ones, and
    # others whenever earlier ones finish); the rest are turned away at once.
    assert len(served) >= QUEUE and refused, [r.status_code for r in replies]
    for reply in refused:
        assert reply.headers.get("retry-after") == "1", reply.headers
        error = reply.json()["error"]
        assert error["code"] == "overloaded" and error["type"] == "service_unavailable_error"
    for reply in served:  # accepted requests are served in full
        body = reply.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 8
    samples = scrape(fault_server.url)
    assert sample(samples, "flashserve_requests_total", outcome="overloaded") == len(refused)
    assert wait_until(lambda: engine_idle(fault_server.url), 10)


def test_stream_interval_from_the_config_gathers_tokens_per_chunk(
    fault_server: PrivateServer,
) -> None:
    body = seeded(HELLO, 13)
    options = {"include_usage": True, "continuous_usage_stats": True}
    done_after_each: list[int] = []
    text = ""
    with httpx.stream(
        "POST",
        f"{fault_server.url}{CHAT}",
        json={**body, "stream": True, "stream_options": options},
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            payload = line.removeprefix("data: ")
            if not line or payload == "[DONE]":
                continue
            event = json.loads(payload)
            if event.get("choices"):  # the role chunk first (0 tokens), then the tokens
                text += event["choices"][0]["delta"].get("content") or ""
                done_after_each.append(event["usage"]["completion_tokens"])
    sizes = [b - a for a, b in zip(done_after_each, done_after_each[1:])]
    # The first token at once (a busy event loop may merge it with one later delivery);
    # then at least STREAM_INTERVAL a chunk; the rest with the end.
    assert 1 <= sizes[0] <= 1 + STREAM_INTERVAL and sum(sizes) == 13, sizes
    assert all(n >= STREAM_INTERVAL for n in sizes[1:-1]), sizes
    whole = httpx.post(f"{fault_server.url}{CHAT}", json=body, timeout=60).json()
    assert text == whole["choices"][0]["message"]["content"]


@slow
def test_engine_fault_ends_every_request_with_an_error_and_flips_health(
    fault_server: PrivateServer,
) -> None:
    url = fault_server.url
    assert httpx.get(f"{url}/v1/models/model", timeout=10).status_code == 200

    async def run() -> tuple[list, list[httpx.Response]]:
        async with client(url, timeout=60) as http:
            # Two streams and two plain requests: two run, two wait, all until the fault.
            streams = [asyncio.create_task(stream_chat(http, ENDLESS)) for _ in range(2)]
            plain = [asyncio.create_task(http.post(CHAT, json=ENDLESS)) for _ in range(2)]
            return await asyncio.gather(*streams), await asyncio.gather(*plain)

    started = time.monotonic()
    streams, plain = asyncio.run(run())
    took = time.monotonic() - started
    assert took < 60
    for result in streams:
        # Refused outright if the fault came before its first token, else an error event.
        assert not result.done, result
        assert result.error is not None and result.error["type"] in (
            "internal_server_error",
            "service_unavailable_error",
        ), result
    for reply in plain:
        assert reply.status_code in (500, 503), reply.text
        assert reply.json()["error"]["code"] in ("engine_error", "engine_dead")

    # Readiness fails so that Baseten restarts the replica; new requests are refused.
    assert wait_until(
        lambda: httpx.get(f"{url}/v1/models/model", timeout=10).status_code != 200, 10
    )
    assert sample(scrape(url), "flashserve_engine_healthy") == 0
    reply = httpx.post(f"{url}{CHAT}", json=seeded(HELLO, 2), timeout=10)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_dead"


# -- the engine thread on its own, with a stand-in engine --------------------------------


class StubEngine:
    """Emits one token per step for every request; `gate` holds steps, `fail` raises in one."""

    def __init__(self) -> None:
        self.config = type("Config", (), {"engine_stall_timeout_s": 0.5})()
        self.requests: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def add_request(self, request_id: str, prompt: list[int], params: object) -> None:
        self.requests.add(request_id)

    def abort(self, request_id: str) -> bool:
        self.requests.discard(request_id)
        return True

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[SequenceOutput]:
        self.gate.wait()
        if self.fail:
            raise RuntimeError("boom")
        time.sleep(0.01)
        return [SequenceOutput(rid, [1], finished=False) for rid in self.requests]

    def stats(self) -> EngineStats:
        return EngineStats(0, len(self.requests), 10, len(self.requests), 0, 0, 0)


async def read_all(engine: AsyncEngine, request_id: str, deadline: float | None = None) -> int:
    count = 0
    async for _ in engine.generate(request_id, [1, 2], object(), deadline=deadline):
        count += 1
    return count


def test_deadline_ends_the_stream_and_aborts_the_request() -> None:
    stub = StubEngine()
    engine = AsyncEngine(stub)
    engine.start()
    try:
        with pytest.raises(RequestTimeoutError):
            asyncio.run(read_all(engine, "r1", deadline=time.monotonic() + 0.2))
        assert wait_until(lambda: not stub.requests, 2), "the engine still runs the request"
        assert engine.num_in_flight == 0 and engine.healthy
    finally:
        engine.shutdown()


def test_engine_that_stops_turning_is_unhealthy() -> None:
    stub = StubEngine()
    engine = AsyncEngine(stub)  # stall timeout 0.5 s, from the stub's config
    engine.start()
    try:
        assert engine.healthy
        stub.gate.clear()  # the next step hangs, as a wedged device call would
        stub.requests.add("stuck")
        engine._wake.set()
        assert wait_until(lambda: not engine.healthy, 3)
        stub.gate.set()
        assert wait_until(lambda: engine.healthy, 3)  # it turns again
    finally:
        stub.requests.clear()
        engine.shutdown()


def test_engine_failure_reaches_every_stream_and_every_later_caller() -> None:
    stub = StubEngine()
    engine = AsyncEngine(stub)
    engine.start()

    async def run() -> list:
        tasks = [asyncio.create_task(read_all(engine, f"r{i}")) for i in range(5)]
        await asyncio.sleep(0.1)
        stub.fail = True
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(run())
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert not engine.healthy
        with pytest.raises(EngineDeadError):
            asyncio.run(read_all(engine, "late"))
    finally:
        engine.shutdown()
