"""The CPU sampler's pass over the vocabulary in one compiled kernel: csrc/vocab_race.c.

For each row of logits: the softmax, its blocks' totals, the two-round exponential
race (sampler._race) and the mass at or above the drawn token (certainly_kept's
check), while the row sits in the cache. The row may be the model's own (bf16 too)
with its temperature still to divide by: the kernel widens and divides as it reads,
with the bits torch's `.float()` and `div_` give, and no [rows, vocab] copy is made.
The torch passes read and write the whole [rows, vocab] batch several times over
(softmax, nan_to_num, block_sums, the mass), each through memory. The kernel repeats torch's arithmetic operation for operation,
with the exp torch itself calls (Sleef's, found in libtorch_cpu), so where torch
runs its 8-lane kernels the results are the torch passes' bits; elsewhere (AVX-512)
they differ in the last bits, no row depends on another either way.

The race's uniforms are drawn by the caller, with torch and in the same order as
before (sampler._race_noise), so a seeded request consumes its generator as it did.
Where the kernel cannot load, cannot find the exp, or the shapes are not its own,
`race_over_vocab` returns None and the sampler keeps the torch passes.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flashserve.engine.truncation import CROSSING_BLOCK
from flashserve.layers.native import NativeLibrary

logger = logging.getLogger(__name__)

_SIGNATURE = [
    ctypes.c_void_p,  # logits [rows, vocab]
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # vocab
    ctypes.c_int64,  # logits row stride
    ctypes.c_void_p,  # temperatures float32 [rows] or NULL
    ctypes.c_void_p,  # log U of the blocks' round, float64 [rows, blocks]
    ctypes.c_void_p,  # log U of the tokens' round, float32 [rows, CROSSING_BLOCK]
    ctypes.c_void_p,  # the 8-lane exp (Sleef_expf8_u10)
    ctypes.c_void_p,  # the 16-lane exp (Sleef_expf16_u10) or NULL
    ctypes.c_void_p,  # probs float32 [rows, vocab] or NULL
    ctypes.c_void_p,  # block totals float64 [rows, blocks] or NULL
    ctypes.c_void_p,  # chosen int64 [rows]
    ctypes.c_void_p,  # the chosen tokens' probabilities, float32 [rows]
    ctypes.c_void_p,  # mass at or above the chosen token's probability, float64 [rows]
    ctypes.c_void_p,  # the row's mass, float64 [rows]
    ctypes.c_int,  # threads
]
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}
KERNEL = NativeLibrary(
    "vocab_race.c",
    "sampler: softmax and race over the vocabulary",
    {f"vocab_race_{suffix}": _SIGNATURE for suffix in SUFFIXES.values()},
)
# Benchmarks and tests switch the kernel off to compare with the torch passes.
enabled = os.environ.get("FLASHSERVE_CPU_SAMPLER_KERNEL", "1") != "0"

# The exp ATen's vectorised float kernels call on x86 (AVX2): the softmax's bits need it.
EXP_SYMBOL = "Sleef_expf8_u10"
_exp_address: int | None = None
_exp_missing: str | None = None
# Its 16-lane form gives the same bits for every float (all 2^32 checked against torch
# 2.13's build): AVX-512 kernels call it, half as often. Tests switch it off to compare.
EXP16_SYMBOL = "Sleef_expf16_u10"
use_exp16 = True
_exp16_address: int | None = None


_LIBTORCH_CPU = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"


def _libtorch_symbol(name: str) -> int:
    """The address of a function libtorch_cpu exports (OSError, AttributeError: none)."""
    return ctypes.cast(getattr(ctypes.CDLL(str(_LIBTORCH_CPU)), name), ctypes.c_void_p).value


def torch_exp_address() -> int | None:
    """The address of torch's own 8-lane float exp, or None (logged once) where this
    torch build does not export it."""
    global _exp_address, _exp_missing
    if _exp_address is None and _exp_missing is None:
        try:
            _exp_address = _libtorch_symbol(EXP_SYMBOL)
        except (OSError, AttributeError) as exc:
            _exp_missing = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "sampler: %s not found in %s (%s); using torch",
                EXP_SYMBOL,
                _LIBTORCH_CPU,
                _exp_missing,
            )
    return _exp_address


def torch_exp16_address() -> int | None:
    """The address of torch's 16-lane float exp, or None where this build lacks it (the
    kernel then calls the 8-lane one)."""
    global _exp16_address
    if _exp16_address is None:
        try:
            _exp16_address = _libtorch_symbol(EXP16_SYMBOL) or 0
        except (OSError, AttributeError):
            _exp16_address = 0
    return _exp16_address or None


@dataclass
class RaceResult:
    """Per row: the race's token, its probability, the mass of the tokens at least as
    probable as it (float64) and the row's mass (float64); probs and totals only where
    asked for."""

    chosen: torch.Tensor
    chosen_prob: torch.Tensor
    through: torch.Tensor
    mass: torch.Tensor
    probs: torch.Tensor | None = None
    totals: torch.Tensor | None = None


def race_over_vocab(
    logits: torch.Tensor,
    log_block_u: torch.Tensor,
    log_token_u: torch.Tensor,
    keep_probs: bool = False,
    temperatures: torch.Tensor | None = None,
) -> RaceResult | None:
    """The race over softmax(logits / temperatures) (NaN as 0) with the given logs of
    uniforms, or None where the kernel does not take these tensors (then use the torch
    passes).

    logits: [rows, vocab] float32 or bfloat16 on the CPU, unit column stride; each row is
    taken as `logits.float() / temperatures[:, None]` would give it (the same bits),
    without that pass over the batch. temperatures: float32 [rows], all > 0, or None (1).
    log_block_u: float64 [rows, ceil(vocab / CROSSING_BLOCK)]; log_token_u: float32
    [rows, CROSSING_BLOCK]. keep_probs: also return the probabilities and block totals
    (tests; costs a write of the whole batch)."""
    if not enabled or logits.dim() != 2:
        return None
    rows, vocab = logits.shape
    blocks = -(-vocab // CROSSING_BLOCK)
    if not (
        logits.device.type == "cpu"
        and logits.dtype in SUFFIXES
        and logits.stride(1) == 1
        and vocab >= 8  # torch's softmax takes a shorter row another way
        and rows > 0
    ):
        return None
    # Shapes the C reads through raw pointers: checked here, before it reads anything.
    if log_block_u.shape != (rows, blocks) or log_block_u.dtype != torch.float64:
        raise ValueError(
            f"log_block_u: want float64 {(rows, blocks)}, got {log_block_u.dtype} "
            f"{tuple(log_block_u.shape)}"
        )
    if log_token_u.shape != (rows, CROSSING_BLOCK) or log_token_u.dtype != torch.float32:
        raise ValueError(
            f"log_token_u: want float32 {(rows, CROSSING_BLOCK)}, got "
            f"{log_token_u.dtype} {tuple(log_token_u.shape)}"
        )
    if temperatures is not None and (
        temperatures.shape != (rows,) or temperatures.dtype != torch.float32
    ):
        raise ValueError(
            f"temperatures: want float32 {(rows,)}, got {temperatures.dtype} "
            f"{tuple(temperatures.shape)}"
        )
    library = KERNEL.load()
    exp = torch_exp_address() if library is not None else None
    if exp is None:
        return None
    log_block_u = log_block_u.contiguous()
    log_token_u = log_token_u.contiguous()
    chosen = torch.empty(rows, dtype=torch.int64)
    chosen_prob = torch.empty(rows, dtype=torch.float32)
    through = torch.empty(rows, dtype=torch.float64)
    mass = torch.empty(rows, dtype=torch.float64)
    probs = torch.empty(rows, vocab) if keep_probs else None
    totals = torch.empty(rows, blocks, dtype=torch.float64) if keep_probs else None
    if temperatures is not None:
        temperatures = temperatures.contiguous()
    failed = getattr(library, f"vocab_race_{SUFFIXES[logits.dtype]}")(
        logits.data_ptr(),
        rows,
        vocab,
        logits.stride(0),
        None if temperatures is None else temperatures.data_ptr(),
        log_block_u.data_ptr(),
        log_token_u.data_ptr(),
        exp,
        torch_exp16_address() if use_exp16 else None,
        None if probs is None else probs.data_ptr(),
        None if totals is None else totals.data_ptr(),
        chosen.data_ptr(),
        chosen_prob.data_ptr(),
        through.data_ptr(),
        mass.data_ptr(),
        torch.get_num_threads(),
    )
    if failed == 1:
        raise MemoryError("sampler: no memory for the vocabulary race's scratch rows")
    if failed:
        return None  # built for a CPU without AVX2
    return RaceResult(chosen, chosen_prob, through, mass, probs, totals)
