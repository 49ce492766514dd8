"""Decode attention on the CPU that reads the paged KV cache where it lies.

The torch backend's decode otherwise gathers every block of every row into a
new tensor (index_select) and runs SDPA over the copy: on a CPU that step is
memory-bound, and the copy triples the traffic (read, write, read again).
csrc/paged_decode.c instead walks each row's block table and reads every key
and value row once, for all query heads of its GQA group together.

The kernel is plain C, compiled at first use (layers/native.py) and called
through ctypes. Where that cannot happen (no compiler, an unsupported dtype or
head size) `paged_decode` returns None and the caller keeps its torch path;
the reason is logged once.
"""

from __future__ import annotations

import ctypes
import os

import torch

from flashserve.layers.native import NativeLibrary

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
KERNELS = NativeLibrary(
    "paged_decode.c", "CPU decode attention", {name: _ARGTYPES for name in _KERNELS.values()}
)

# Benchmarks and tests switch the kernel off to compare with the torch path.
enabled = os.environ.get("FLASHSERVE_CPU_DECODE_KERNEL", "1") != "0"


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
    library = KERNELS.load()
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
    return KERNELS.load() is not None
