"""Shared pieces of the benchmarks: prompts, the engine, and a contention meter.

The benchmark machines are shared: other processes (test runs, builds) can take
CPU time in the middle of a measurement and quietly halve a number. Every
measurement therefore records `others_cpu`, the share of the machine's CPU time
that processes outside this benchmark's process tree used while it ran; a
result with others_cpu above a few percent is not comparable to a quiet one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "packages") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "packages"))

T = TypeVar("T")
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


def time_ms(fn: Callable[[], Any], reps: int) -> float:
    """Mean wall milliseconds of fn over reps calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps * 1e3


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


@dataclass
class Gate:
    """When to trust a measurement: before each try wait (up to wait_s) for an idle
    machine; a try counts when others took at most max_others of the CPUs; stop after
    `repeat` counted tries or `attempts` tries in all."""

    wait_s: float = 0.0
    max_others: float = 1.0
    attempts: int = 1
    repeat: int = 1


def measured(
    run: Callable[[], T], gate: Gate, seconds: Callable[[T], float] | None = None
) -> tuple[T, float]:
    """(value, others_cpu) of one try: the median by `seconds` of the counted tries,
    or, when none counted, the least disturbed try."""
    tries: list[tuple[T, float]] = []
    for _ in range(max(gate.attempts, gate.repeat)):
        if gate.wait_s:
            wait_until_quiet(gate.wait_s)
        meter = ContentionMeter()
        meter.start()
        value = run()
        tries.append((value, meter.stop()))
        counted = [t for t in tries if t[1] <= gate.max_others]
        if len(counted) >= gate.repeat:
            break
        if tries[-1][1] > gate.max_others:
            print(f"  (other processes took {tries[-1][1]:.0%} of the CPUs)", flush=True)
    counted = [t for t in tries if t[1] <= gate.max_others]
    if not counted:
        return min(tries, key=lambda t: t[1])
    if seconds is not None:
        counted.sort(key=lambda t: seconds(t[0]))
    return counted[(len(counted) - 1) // 2]


_BUSY_LOOP = """
import sys, time
busy = 0.004 * float(sys.argv[1]) / (1 - float(sys.argv[1]))
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
    time.sleep(0.004)
"""


@contextlib.contextmanager
def neighbour(share: float) -> Iterator[None]:
    """A process that keeps `share` (0..1) of one core busy while the block runs: the
    stand-in for load generators and other tenants on the same cores."""
    if share <= 0:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(min(share, 0.95))])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def parse_args_with_gate(parser: Any, argv: list[str] | None, repeat: bool = False) -> Any:
    """Parse argv with an argparse parser, adding the options of a Gate first (--wait-quiet,
    --max-others, --attempts and, with `repeat`, --repeat); the Gate they set is args.gate."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each measurement, wait up to this many s for an idle machine",
    )
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.05,
        help="measure again when other processes took more than this share of the CPUs",
    )
    parser.add_argument("--attempts", type=int, default=1, help="tries per measurement")
    if repeat:
        parser.add_argument(
            "--repeat",
            type=int,
            default=1,
            help="counted tries per measurement; the median is kept",
        )
    args = parser.parse_args(argv)
    args.gate = Gate(args.wait_quiet, args.max_others, args.attempts, getattr(args, "repeat", 1))
    return args


def kernel_build_at(kernels: Any, revision: str | None, into: Path) -> Any:
    """A C kernel's source at a git revision (or a .c file; None: the working tree), built
    with native.py's flags and today's headers into `into`: `kernels` (a NativeLibrary)
    bound to that build, for A/B of two versions of one kernel in one process."""
    import ctypes
    import shutil

    from flashserve.layers import native

    relative = kernels.source.relative_to(REPO_ROOT)
    source = into / f"{kernels.source.stem}_{len(list(into.iterdir()))}.c"
    if revision is None or Path(revision).is_file():
        shutil.copy(revision or kernels.source, source)
    else:
        shown = subprocess.run(
            ["git", "show", f"{revision}:{relative}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        source.write_text(shown.stdout)
    library = source.with_suffix(".so")
    compiler = shutil.which("cc") or "cc"
    command = [compiler, *native.FLAGS, "-I", str(native.CSRC), str(source), "-o", str(library)]
    subprocess.run([*command, "-lm"], check=True)
    native.thread_pool()  # loaded globally: the kernel links against it
    return kernels._bind(ctypes.CDLL(str(library)))
