"""Shared pieces of the benchmarks: prompts, the engine, and a contention meter.

The benchmark machines are shared: other processes (test runs, builds) can take
CPU time in the middle of a measurement and quietly halve a number. Every
measurement therefore records `others_cpu`, the share of the machine's CPU time
that processes outside this benchmark's process tree used while it ran; a
result with others_cpu above a few percent is not comparable to a quiet one.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "packages") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "packages"))

DEFAULT_MODEL = REPO_ROOT / "build" / "bench_model"
# Mistral v3's first ids are control tokens; random prompts avoid them.
FIRST_ORDINARY_TOKEN = 1000


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(length)]
        for _ in range(count)
    ]


def make_engine(model: Path, **settings: Any):  # -> LLMEngine (imported lazily: torch is slow)
    from flashserve.config import EngineConfig
    from flashserve.engine.llm_engine import LLMEngine

    config = dict(device="cpu", max_model_len=2048, kv_cache_memory_gb=2.0)
    config.update({k: v for k, v in settings.items() if v is not None})
    return LLMEngine(EngineConfig(**config), model)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / (1 << 30)
    return f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB, {platform.system()} {platform.release()}"


def today() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live descendants."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
            if proc is me:
                total += t.children_user + t.children_system  # reaped subprocesses
        except psutil.Error:
            pass
    return total


@dataclass
class ContentionMeter:
    """Share of all CPUs that other processes used between start() and stop()."""

    _busy0: float = 0.0
    _mine0: float = 0.0
    _wall0: float = 0.0
    others: float = 0.0

    def start(self) -> None:
        self._busy0, self._mine0, self._wall0 = _busy(), _tree_cpu_seconds(), time.monotonic()

    def stop(self) -> float:
        wall = time.monotonic() - self._wall0
        busy = _busy() - self._busy0
        mine = _tree_cpu_seconds() - self._mine0
        self.others = max(0.0, busy - mine) / (wall * (os.cpu_count() or 1))
        return self.others


def _busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def wait_until_quiet(max_wait_s: float, threshold: float = 0.10) -> float:
    """Wait (up to max_wait_s) for a second in which the machine is under threshold busy.

    Returns the busy share of the last second sampled; 0 max_wait_s just samples once.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = psutil.cpu_percent(interval=1.0) / 100
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        time.sleep(2.0)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
