"""Routed experts on the CPU for short runs of rows: csrc/expert_mlp.c.

A decode step gives each expert a handful of rows. A BLAS GEMM with so few
rows spends most of its time packing the expert's weights. The kernel reads each active expert's weights once and multiplies them by all of that
expert's rows while they sit in registers, one pass over the active weights.
Longer runs (prefill) stay with the BLAS GEMMs, which are faster there.
"""

from __future__ import annotations

import ctypes
import os
from itertools import accumulate

import torch

from flashserve.layers.native import NativeLibrary

KERNELS = NativeLibrary(
    "expert_mlp.c",
    "CPU routed experts",
    {
        "expert_mlp_f32": [
            ctypes.c_void_p,  # rows [n, hidden], sorted by expert
            ctypes.c_void_p,  # offsets int64 [experts + 1]
            ctypes.c_int64,  # experts
            ctypes.c_void_p,  # gate_up [experts, 2I, hidden]
            ctypes.c_void_p,  # down [experts, hidden, I]
            ctypes.c_void_p,  # scratch [n, 2I]
            ctypes.c_void_p,  # out [n, hidden]
            ctypes.c_int64,  # hidden
            ctypes.c_int64,  # I
            ctypes.c_int,  # threads
        ],
    },
)

# Runs up to this many rows go to the kernel. Above it a BLAS GEMM's packing is paid
# back over the rows (bench/moe_kernel.py measures both; RESULTS.md has the crossover).
MAX_RUN = 64
LANES = 8

# Benchmarks and tests switch the kernel off to compare with the torch paths.
enabled = os.environ.get("FLASHSERVE_CPU_EXPERT_KERNEL", "1") != "0"


def unsupported(rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (None: it can)."""
    if rows.device.type != "cpu" or gate_up.device.type != "cpu":
        return "not on the CPU"
    if rows.dtype != torch.float32 or gate_up.dtype != torch.float32:
        return f"dtype {gate_up.dtype} (the kernel computes float32)"
    hidden, inter = gate_up.shape[-1], down.shape[-1]
    if hidden % LANES or inter % LANES:
        return f"hidden {hidden} and expert size {inter} must be multiples of {LANES}"
    if not (gate_up.is_contiguous() and down.is_contiguous()):
        return "non-contiguous expert weights"
    return None


def expert_mlp(
    rows: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor | None:
    """SwiGLU of each expert over its run of `rows` (sorted by expert, run lengths `counts`).

    Returns [n, hidden], or None where the kernel cannot run this (the caller then
    uses its torch path): disabled, unsupported tensors, a run above MAX_RUN, or no
    compiled kernel.
    """
    if not enabled or max(counts) > MAX_RUN or unsupported(rows, gate_up, down) is not None:
        return None
    library = KERNELS.load()
    if library is None:
        return None
    rows = rows.contiguous()
    hidden, inter = gate_up.shape[-1], down.shape[-1]
    offsets = torch.tensor(list(accumulate(counts, initial=0)), dtype=torch.int64)
    scratch = torch.empty(rows.shape[0], 2 * inter)
    out = torch.empty(rows.shape[0], hidden)
    failed = library.expert_mlp_f32(
        rows.data_ptr(),
        offsets.data_ptr(),
        len(counts),
        gate_up.data_ptr(),
        down.data_ptr(),
        scratch.data_ptr(),
        out.data_ptr(),
        hidden,
        inter,
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("CPU experts: no memory for the kernel's partial sums")
    return out


def problem(gate_up: torch.Tensor, down: torch.Tensor) -> str | None:
    """Why these experts' short runs cannot use the kernel (None: they will); compiles it now."""
    reason = unsupported(gate_up, gate_up, down)
    if reason is None and KERNELS.load() is None:
        reason = KERNELS.load_failed
    return reason
