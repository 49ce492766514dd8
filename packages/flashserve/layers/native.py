"""C kernels compiled on first use with the system's C compiler and called through ctypes.

A kernel source under layers/csrc/ is built with `cc -O3 -march=native -fopenmp
-ffp-contract=off` (about a second) into a cache directory keyed by the source
and the headers beside it, the flags, the compiler and the CPU, and loaded once per process. ctypes releases the GIL for
the call. Where that cannot happen (no compiler, a read-only disk) `load()`
returns None, the reason is logged once, and the caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# -ffp-contract=off: a multiply-add is fused only where the source says so (csrc/vector_ops.h).
# Left to the compiler, one inlined copy of a loop may fuse it and another not, and a
# row's bits would depend on the rows beside it.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


class NativeLibrary:
    """One C source under csrc/, its exported functions' signatures, and its loaded build."""

    def __init__(
        self, source: str, what: str, functions: dict[str, list], exports_symbols: bool = False
    ) -> None:
        self.source = CSRC / source
        self.what = what  # for the log: "CPU decode attention: paged kernel ..."
        self.functions = functions  # name -> ctypes argtypes; every function returns int
        # Loaded with RTLD_GLOBAL: the kernels loaded after it link against its symbols.
        self.exports_symbols = exports_symbols
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self.load_failed: str | None = None

    def fresh(self) -> NativeLibrary:
        """The same library, not loaded yet (tests: another cache directory or compiler)."""
        return NativeLibrary(self.source.name, self.what, self.functions, self.exports_symbols)

    def load(self) -> ctypes.CDLL | None:
        if self._library is not None or self.load_failed is not None:
            return self._library
        with self._lock:
            if self._library is None and self.load_failed is None:
                try:
                    mode = ctypes.RTLD_GLOBAL if self.exports_symbols else ctypes.DEFAULT_MODE
                    if not self.exports_symbols:
                        thread_pool()
                    self._library = self._bind(ctypes.CDLL(str(self._build()), mode=mode))
                    logger.info("%s: compiled kernel loaded", self.what)
                except Exception as exc:  # no compiler, read-only disk...: keep the torch path
                    self.load_failed = f"{type(exc).__name__}: {exc}"
                    logger.warning(
                        "%s: compiled kernel unavailable (%s); using torch",
                        self.what,
                        self.load_failed,
                    )
        return self._library

    def _bind(self, library: ctypes.CDLL) -> ctypes.CDLL:
        for name, argtypes in self.functions.items():
            fn = getattr(library, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        return library

    def _build(self) -> Path:
        """The compiled library, built unless the cache already holds this source's build."""
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
        source = self.source.read_bytes() + b"".join(
            header.read_bytes() for header in sorted(CSRC.glob("*.h"))
        )
        # -march=native: a library built on one CPU must not be loaded on another.
        key = hashlib.sha256(
            source + " ".join(FLAGS).encode() + compiler.encode() + _cpu_signature().encode()
        ).hexdigest()[:16]
        target = cache_dir() / f"{self.source.stem}-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a private name, then renamed: concurrent processes never load half a file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *FLAGS, str(self.source), "-o", partial, "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return target


def cache_dir() -> Path:
    configured = os.environ.get("FLASHSERVE_KERNEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashserve" / "kernels"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, Arm
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Every kernel's parallel loop (csrc/thread_pool.h): loaded before any kernel.
THREAD_POOL = NativeLibrary(
    "thread_pool.c",
    "CPU kernels' thread pool",
    {"flashserve_pool_mode": [ctypes.c_int], "flashserve_pool_late_starts": []},
    exports_symbols=True,
)


def thread_pool() -> ctypes.CDLL:
    """The loaded thread pool; raises when it cannot be built. A failure is not kept: it
    is retried at the next kernel's first load (a test may have hidden the compiler)."""
    global THREAD_POOL
    if THREAD_POOL.load_failed is not None:
        THREAD_POOL = THREAD_POOL.fresh()
    library = THREAD_POOL.load()
    if library is None:
        raise RuntimeError(f"no thread pool ({THREAD_POOL.load_failed})")
    return library


# The linear kernels' argument list (ctypes argtypes), as linear_product passes it.
LINEAR_KERNEL_ARGS = [
    ctypes.c_void_p,  # x [rows, k]
    ctypes.c_int64,  # x row stride
    ctypes.c_int64,  # rows
    ctypes.c_void_p,  # weight [features, k]
    ctypes.c_int64,  # features
    ctypes.c_int64,  # k
    ctypes.c_void_p,  # bias [features] or NULL
    ctypes.c_void_p,  # y [rows, features]
    ctypes.c_int64,  # y row stride
    ctypes.c_int,  # threads
]


def linear_product(
    kernel: Callable[..., int],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    what: str,
    weight_layout: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T (+ bias) by a compiled kernel with the linear kernels' argument list
    (x, x row stride, rows, weight, features, k, bias or NULL, y, y row stride, threads;
    non-zero returned: its scratch memory could not be allocated). `weight_layout`: the
    weight's memory in the order the kernel reads it, when that is not `weight` itself."""
    out = torch.empty(x.shape[0], weight.shape[0])
    failed = kernel(
        x.data_ptr(),
        x.stride(0),
        x.shape[0],
        (weight if weight_layout is None else weight_layout).data_ptr(),
        weight.shape[0],
        weight.shape[1],
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError(f"{what}: no memory for the kernel's scratch buffers")
    return out
