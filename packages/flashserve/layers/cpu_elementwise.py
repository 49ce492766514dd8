"""RMSNorm, SwiGLU's activation and rope on the CPU in one pass each: csrc/elementwise.c.

torch runs RMSNorm as five passes over the activations (square, mean, add,
rsqrt, two products; one more for the residual add before it), silu(gate) * up
as two, and rope as five with two
concatenations; a prefill's rows outgrow the caches, so each pass goes through
memory. The kernels take each row once (rope in place), in fp32 or bf16 (computed
in fp32, rounded where torch's bf16 ops round). Their arithmetic per row is fixed,
so a row's bits do not depend on the batch. Other devices, dtypes and shapes keep
the torch path (None or False from these functions).
"""

from __future__ import annotations

import ctypes
import os

import torch

from flashserve.layers.native import NativeLibrary

LANES = 8

_RMS_NORM = [
    ctypes.c_void_p,  # x [rows, n]
    ctypes.c_int64,  # x row stride
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # n
    ctypes.c_void_p,  # weight [n], x's dtype
    ctypes.c_float,  # eps
    ctypes.c_void_p,  # out [rows, n]
    ctypes.c_int64,  # out row stride
    ctypes.c_int,  # threads
]
_ADD_RMS_NORM = [
    ctypes.c_void_p,  # x [rows, n]
    ctypes.c_int64,  # x row stride
    ctypes.c_void_p,  # residual [rows, n]
    ctypes.c_int64,  # residual row stride
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # n
    ctypes.c_void_p,  # weight [n], x's dtype
    ctypes.c_float,  # eps
    ctypes.c_void_p,  # sum [rows, n]: x + residual
    ctypes.c_int64,  # sum row stride
    ctypes.c_void_p,  # out [rows, n]
    ctypes.c_int64,  # out row stride
    ctypes.c_int,  # threads
]
_SILU_MUL = [
    ctypes.c_void_p,  # gate_up [rows, 2n]
    ctypes.c_int64,  # gate_up row stride
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # n
    ctypes.c_void_p,  # out [rows, n]
    ctypes.c_int64,  # out row stride
    ctypes.c_int,  # threads
]
_ROTATE_HALF = [
    ctypes.c_void_p,  # q [rows, q heads, head_dim], rotated in place
    ctypes.c_int64,  # q row stride
    ctypes.c_int64,  # q head stride
    ctypes.c_int64,  # q heads
    ctypes.c_void_p,  # k [rows, k heads, head_dim], rotated in place
    ctypes.c_int64,  # k row stride
    ctypes.c_int64,  # k head stride
    ctypes.c_int64,  # k heads
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # rotated dims per head
    ctypes.c_void_p,  # table float32 [positions, 2 * rotated dims]: cos|cos, -sin|sin
    ctypes.c_int64,  # table rows
    ctypes.c_void_p,  # positions int64 [rows]
    ctypes.c_int,  # threads
]
_STORE_KV = [
    ctypes.c_void_p,  # k [rows, ...]
    ctypes.c_int64,  # k row stride, bytes
    ctypes.c_void_p,  # v [rows, ...]
    ctypes.c_int64,  # v row stride, bytes
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # bytes of a token's keys (and of its values)
    ctypes.c_void_p,  # slots int64 [rows]
    ctypes.c_void_p,  # k cache [slots, ...]
    ctypes.c_void_p,  # v cache [slots, ...]
    ctypes.c_int64,  # slots in the cache
    ctypes.c_int,  # threads
]
# Each kernel in fp32 and bf16; strides in elements.
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}
KERNELS = NativeLibrary(
    "elementwise.c",
    "CPU RMSNorm, SwiGLU activation, rope and the KV cache write",
    {
        **{
            f"{name}_{suffix}": signature
            for name, signature in (
                ("rms_norm", _RMS_NORM),
                ("add_rms_norm", _ADD_RMS_NORM),
                ("silu_mul", _SILU_MUL),
                ("rotate_half", _ROTATE_HALF),
            )
            for suffix in SUFFIXES.values()
        },
        "store_kv": _STORE_KV,
    },
)

# Benchmarks and tests switch the kernels off to compare with torch.
enabled = os.environ.get("FLASHSERVE_CPU_ELEMENTWISE", "1") != "0"


def _takes(x: torch.Tensor, width: int) -> bool:
    return (
        enabled
        and x.dim() == 2
        and x.device.type == "cpu"
        and x.dtype in SUFFIXES
        and x.stride(1) == 1
        and width % LANES == 0
        and x.shape[0] > 0
        and not torch.is_grad_enabled()
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2) + eps) per row of a 2-D fp32 or bf16 CPU x (weight in
    x's dtype); None: use torch."""
    n = x.shape[-1]
    if not (
        _takes(x, n) and weight.shape == (n,) and weight.dtype == x.dtype and weight.is_contiguous()
    ):
        return None
    library = KERNELS.load()
    if library is None:
        return None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    getattr(library, f"rms_norm_{SUFFIXES[x.dtype]}")(
        x.data_ptr(),
        x.stride(0),
        x.shape[0],
        n,
        weight.data_ptr(),
        eps,
        out.data_ptr(),
        out.stride(0),
        torch.get_num_threads(),
    )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x + residual, rms_norm of it) in one pass, with the bits of the add (rounded to
    x's dtype) followed by rms_norm; None: use torch."""
    n = x.shape[-1]
    if not (
        _takes(x, n)
        and _takes(residual, n)
        and residual.shape == x.shape
        and residual.dtype == x.dtype
        and weight.shape == (n,)
        and weight.dtype == x.dtype
        and weight.is_contiguous()
    ):
        return None
    library = KERNELS.load()
    if library is None:
        return None
    total = torch.empty_like(x, memory_format=torch.contiguous_format)
    out = torch.empty_like(total)
    getattr(library, f"add_rms_norm_{SUFFIXES[x.dtype]}")(
        x.data_ptr(),
        x.stride(0),
        residual.data_ptr(),
        residual.stride(0),
        x.shape[0],
        n,
        weight.data_ptr(),
        eps,
        total.data_ptr(),
        total.stride(0),
        out.data_ptr(),
        out.stride(0),
        torch.get_num_threads(),
    )
    return total, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate_up = [gate | up] rows of a 2-D fp32 or bf16 CPU tensor;
    None: use torch."""
    n = gate_up.shape[-1] // 2
    if not _takes(gate_up, n):
        return None
    library = KERNELS.load()
    if library is None:
        return None
    out = gate_up.new_empty((gate_up.shape[0], n))
    getattr(library, f"silu_mul_{SUFFIXES[gate_up.dtype]}")(
        gate_up.data_ptr(),
        gate_up.stride(0),
        gate_up.shape[0],
        n,
        out.data_ptr(),
        out.stride(0),
        torch.get_num_threads(),
    )
    return out


def rotate_half_in_place(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rotary_dim: int
) -> bool:
    """Rope q [rows, heads, head_dim] and k [rows, kv_heads, head_dim] in place, in one
    call, at positions with the rotary table's rows (cos|cos, -sin|sin over the first
    rotary_dim dims). Both or neither: False when the kernel does not take both (nothing
    is changed then; use torch)."""
    tensors = (q, k)
    if not (
        enabled
        and table.dtype == torch.float32
        and table.is_contiguous()
        and table.shape[-1] == 2 * rotary_dim
        and rotary_dim % 2 == 0
        and positions.dtype == torch.int64
        and positions.device.type == "cpu"
        and not torch.is_grad_enabled()
        and all(
            x.dim() == 3
            and x.shape[2] >= rotary_dim
            and x.device.type == "cpu"
            and x.dtype in SUFFIXES
            and x.dtype == q.dtype
            and x.stride(2) == 1
            for x in tensors
        )
        and positions.dim() == 1
        and all(x.shape[0] == positions.shape[0] for x in tensors)
    ):
        return False
    library = KERNELS.load()
    if library is None:
        return False
    positions = positions.contiguous()
    out_of_table = getattr(library, f"rotate_half_{SUFFIXES[q.dtype]}")(
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        q.shape[1],
        k.data_ptr(),
        k.stride(0),
        k.stride(1),
        k.shape[1],
        q.shape[0],
        rotary_dim,
        table.data_ptr(),
        table.shape[0],
        positions.data_ptr(),
        torch.get_num_threads(),
    )
    return not out_of_table  # nothing written then; torch's indexing raises


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> bool:
    """Write k and v [rows, kv_heads, head_dim] into caches [blocks, block_size, kv_heads,
    head_dim] at slots (int64 [rows]) in one call: index_copy_'s result, two ops fewer a
    layer. False (nothing written) where the kernel does not take them: use torch."""
    if not (
        enabled
        and k.device.type == "cpu"
        and not torch.is_grad_enabled()
        and slots.dtype == torch.int64
        and slots.dim() == 1
        and slots.is_contiguous()
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and k_cache.shape == v_cache.shape
        and all(
            x.dim() == 3
            and x.shape == k.shape
            and x.shape[0] == slots.shape[0]
            and x.shape[1:] == k_cache.shape[2:]
            and x.dtype == k_cache.dtype == v_cache.dtype
            and x.stride(2) == 1
            and x.stride(1) == x.shape[2]
            for x in (k, v)
        )
    ):
        return False
    library = KERNELS.load()
    if library is None:
        return False
    size = k.element_size()
    out_of_range = library.store_kv(
        k.data_ptr(),
        k.stride(0) * size,
        v.data_ptr(),
        v.stride(0) * size,
        k.shape[0],
        k.shape[1] * k.shape[2] * size,
        slots.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[0] * k_cache.shape[1],
        torch.get_num_threads(),
    )
    return not out_of_range  # nothing written then; index_copy_ raises
