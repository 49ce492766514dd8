"""Decode attention on the CPU that reads the paged KV cache where it lies.

The torch backend's decode otherwise gathers every block of every row into a
new tensor (index_select) and runs SDPA over the copy: on a CPU that step is
memory-bound, and the copy triples the traffic (read, write, read again).
csrc/paged_decode.c instead walks each row's block table and reads every key
and value row once, for all query heads of its GQA group together.

The kernel is plain C, compiled at first use with the system's C compiler
(`cc -O3 -march=native -fopenmp`, about a second) into a cache directory keyed
by the source, the flags and the CPU, and called through ctypes (which releases
the GIL). Where that cannot happen (no compiler, an unsupported dtype or head
size) `paged_decode` returns None and the caller keeps its torch path; the
reason is logged once.
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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# The kernel's vectors hold this many floats; head_dim must be a multiple.
LANES = 8
_KERNELS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}
_ARGTYPES = [
    ctypes.c_void_p,  # q
    ctypes.c_int64,  # q row stride
    ctypes.c_void_p,  # k_cache
    ctypes.c_void_p,  # v_cache
    ctypes.c_void_p,  # block tables
    ctypes.c_int64,  # table row stride
    ctypes.c_void_p,  # context lens
    ctypes.c_void_p,  # out
    ctypes.c_int64,  # out row stride
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # query heads
    ctypes.c_int64,  # kv heads
    ctypes.c_int64,  # head dim
    ctypes.c_int64,  # block size
    ctypes.c_float,  # scale
    ctypes.c_int64,  # max context
    ctypes.c_int,  # threads
]

# Benchmarks and tests switch the kernel off to compare with the torch path.
enabled = os.environ.get("FLASHSERVE_CPU_DECODE_KERNEL", "1") != "0"

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_failed: str | None = None


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context: int,
) -> torch.Tensor | None:
    """Attention of one query token per row over its first context_lens cached tokens.

    q [rows, heads, head_dim]; caches [blocks, block_size, kv_heads, head_dim];
    tables int32 [rows, >= ceil(context / block_size)]; context_lens int32 [rows],
    none above max_context. Returns [rows, heads, head_dim] in q's dtype, or None
    where the kernel cannot run this (the caller then uses its torch path).
    """
    if not enabled or unsupported(q, k_cache) is not None:
        return None
    library = _load()
    if library is None:
        return None
    rows, heads, head_dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    if tables.dtype != torch.int32 or tables.stride(1) != 1:
        tables = tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty((rows, heads, head_dim), dtype=q.dtype)
    if rows == 0:
        return out
    kernel = getattr(library, _KERNELS[q.dtype])
    failed = kernel(
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        tables.stride(0),
        context_lens.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        rows,
        heads,
        k_cache.shape[2],
        head_dim,
        k_cache.shape[1],
        scale,
        max(1, max_context),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("paged decode attention: no memory for its scratch buffers")
    return out


def unsupported(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (None: it can)."""
    if q.device.type != "cpu" or k_cache.device.type != "cpu":
        return "not on the CPU"
    if q.dtype not in _KERNELS or k_cache.dtype != q.dtype:
        return f"dtype {q.dtype} (cache {k_cache.dtype})"
    if q.shape[-1] % LANES:
        return f"head_dim {q.shape[-1]} is not a multiple of {LANES}"
    if q.shape[1] % k_cache.shape[2]:
        return "query heads not a multiple of KV heads"
    if not k_cache.is_contiguous():
        return "non-contiguous cache"
    return None


def available() -> bool:
    """Whether the compiled kernel loads here (compiling it on first call)."""
    return _load() is not None


def _load() -> ctypes.CDLL | None:
    global _library, _load_failed
    if _library is not None or _load_failed is not None:
        return _library
    with _lock:
        if _library is None and _load_failed is None:
            try:
                _library = _bind(ctypes.CDLL(str(_build())))
                logger.info("CPU decode attention: paged kernel loaded")
            except Exception as exc:  # no compiler, read-only disk...: keep the torch path
                _load_failed = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "CPU decode attention: paged kernel unavailable (%s); using torch", _load_failed
                )
    return _library


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    for name in _KERNELS.values():
        fn = getattr(library, name)
        fn.argtypes = _ARGTYPES
        fn.restype = ctypes.c_int
    return library


def _build() -> Path:
    """The compiled library, built unless the cache already holds this source's build."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
    source = SOURCE.read_bytes()
    # -march=native: a library built on one CPU must not be loaded on another.
    key = hashlib.sha256(
        source + " ".join(FLAGS).encode() + compiler.encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"paged_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a private name, then renamed: concurrent processes never load half a file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", partial, "-lm"],
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


def _cache_dir() -> Path:
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
