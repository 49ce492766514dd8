"""Runs the engine loop on its own thread and fans outputs out to asyncio callers.

One thread owns the scheduler, the KV cache and the model. Callers talk to it
through a thread-safe inbox (add / abort) and receive outputs on per-request
asyncio queues, delivered once per step per event loop. No caller ever blocks
the loop, and the loop never blocks a caller.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from flashserve.engine.llm_engine import EngineStats, LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import SequenceOutput

logger = logging.getLogger(__name__)


class EngineOverloadedError(Exception):
    """The waiting queue is full; the caller should retry later (HTTP 503)."""


class EngineDeadError(Exception):
    """The engine loop failed; in-flight and new requests cannot be served."""


class RequestTimeoutError(Exception):
    """The request passed its deadline; it was aborted and its KV blocks freed."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Engine thread only: output held back until `stream_interval` tokens gather.
    held: SequenceOutput | None = None
    delivered_any: bool = False


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_queue_size: int = 1024,
        stall_timeout_s: float | None = None,
        stream_interval: int | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue_size = max_queue_size
        if stream_interval is None:
            stream_interval = getattr(engine.config, "stream_interval", 1)
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {stream_interval}")
        self.stream_interval = stream_interval
        # A loop turn (one step, or an idle wait of at most 1 s) longer than this
        # means the engine is wedged: `healthy` turns false so the replica restarts.
        if stall_timeout_s is None:
            stall_timeout_s = getattr(engine.config, "engine_stall_timeout_s", None)
        self.stall_timeout_s = stall_timeout_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self.error: BaseException | None = None
        self.last_beat = time.monotonic()  # every loop turn, idle or not
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="flashserve-engine", daemon=True)

    # -- caller side (any thread / event loop) ------------------------------

    def start(self) -> None:
        self._thread.start()
        if getattr(self.engine, "ranks", None) is not None and self.stall_timeout_s:
            threading.Thread(
                target=self._watch_stall, name="flashserve-stall-watch", daemon=True
            ).start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        close = getattr(self.engine, "close", None)
        if close is not None and not self._thread.is_alive():
            close()  # the tensor-parallel worker ranks, once no step can run

    @property
    def healthy(self) -> bool:
        return (
            self.error is None
            and self._thread.is_alive()
            and not self.stalled
            and getattr(self.engine, "failure", None) is None
        )

    def _watch_stall(self) -> None:
        """Tensor parallel: a step stuck past the stall timeout means a rank hangs. Killing
        the ranks makes rank 0's collective fail, so the loop ends every request with an
        error (at size 1 nothing can interrupt a step; health reports it)."""
        while not self._stopping and self.error is None:
            if self.stalled:
                logger.error(
                    "engine step stuck for over %.0f s: stopping the tensor-parallel ranks",
                    self.stall_timeout_s,
                )
                self.engine.abandon()
                return
            time.sleep(min(1.0, self.stall_timeout_s / 4))

    @property
    def stalled(self) -> bool:
        if not self.stall_timeout_s or not self._thread.is_alive():
            return False
        return time.monotonic() - self.last_beat > self.stall_timeout_s

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        deadline: float | None = None,
    ) -> AsyncIterator[SequenceOutput]:
        """Submit a request and iterate over its outputs until it finishes.

        Closing the iterator early (a stop string matched, the client left)
        aborts the request and frees its KV blocks on the next loop turn.
        `deadline` (time.monotonic()): past it the iterator raises
        RequestTimeoutError and the request is aborted the same way.
        """
        with self._lock:
            # Checked under the lock: _fail_all snapshots the streams under it after
            # setting `error`, so a request is either refused here or failed there.
            if self.error is not None:
                raise EngineDeadError(f"engine loop failed: {self.error}")
            queued = len(self._streams) - self._stats.num_running
            if queued >= self.max_queue_size:
                raise EngineOverloadedError(f"{queued} requests are already waiting")
            stream = _Stream(loop=asyncio.get_running_loop())
            self._streams[request_id] = stream
        timer = None
        if deadline is not None:
            # One timer per request, not a timeout per token: it drops the error into
            # the request's own queue, behind any outputs already delivered.
            timer = stream.loop.call_later(
                max(0.0, deadline - time.monotonic()),
                stream.queue.put_nowait,
                RequestTimeoutError("the request passed its deadline"),
            )
        self._inbox.put(("add", request_id, prompt_token_ids, params))
        self._wake.set()
        finished = False
        waiting: object | None = None  # taken from the queue while merging, not yet handled
        try:
            while True:
                item, waiting = waiting if waiting is not None else await stream.queue.get(), None
                if isinstance(item, BaseException):
                    # The engine is done with a request it refused or died under; one
                    # that timed out is still running and is aborted below.
                    finished = not isinstance(item, RequestTimeoutError)
                    raise item
                # A consumer that fell behind takes everything already waiting as one
                # output: fewer, larger chunks exactly when the host is short of time.
                while not item.finished and not stream.queue.empty():
                    later = stream.queue.get_nowait()
                    if not isinstance(later, SequenceOutput):
                        waiting = later  # an error: raised after what came before it
                        break
                    item.absorb(later)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # -- engine thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self.last_beat = time.monotonic()
                failure = getattr(self.engine, "failure", None)
                if failure is not None:  # a tensor-parallel rank died
                    raise RuntimeError(failure)
                self._drain_inbox()
                if not self.engine.has_work():
                    self._stats = self.engine.stats()
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.stats()
                self._deliver(outputs)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the callers
            logger.exception("engine loop failed")
            self.error = exc
            self._fail_all(exc)
            abandon = getattr(self.engine, "abandon", None)
            if abandon is not None:
                abandon()  # no worker rank outlives the loop that drives it

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params = command
                if request_id not in self._streams:
                    continue  # the caller left before the request was admitted
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as exc:
                    self._deliver_one(request_id, exc)
            else:
                self.engine.abort(command[1])

    def _deliver(self, outputs: list[SequenceOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.held is not None:
                stream.held.absorb(out)
                out, stream.held = stream.held, None
            # The first token goes at once (time to first token); later ones wait
            # until `stream_interval` of them gather, or the request ends.
            if (
                stream.delivered_any
                and not out.finished
                and len(out.new_token_ids) < self.stream_interval
            ):
                stream.held = out
                continue
            stream.delivered_any = True
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            _call_soon(loop, items)

    def _deliver_one(self, request_id: str, item: object) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            _call_soon(stream.loop, [(stream.queue, item)])

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.items())
        for request_id, _ in streams:
            self._deliver_one(request_id, EngineDeadError(f"engine loop failed: {exc}"))


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:
        # That caller's event loop is closed (it left without closing its iterator);
        # nobody is listening, and the engine thread must not die of it.
        logger.debug("dropping outputs for a closed event loop")
