"""Truncation of a batch's distributions: min-p, top-k and the nucleus (top-p).

`truncate_logits` is the definition: a descending sort, then the masks; the
sampler uses it where a sort is cheap (accelerators). `kept_probs` computes the
same truncation on the CPU without sorting: the probabilities' bit patterns are
integer keys in the same order, and a radix select (histograms of the keys)
finds each row's cut-off key and how many tokens equal to it stay: in one compiled
pass per row (csrc/truncate_rows.c) where it loads, else as torch passes
(_truncate_probs).
"""

from __future__ import annotations

import ctypes
import os

import torch

from flashserve.engine.host_transfer import upload
from flashserve.engine.sampling_params import SamplingParams
from flashserve.layers.native import NativeLibrary

MASS_KERNEL = NativeLibrary(
    "mass_at_least.c",
    "sampler: nucleus check",
    {
        "mass_at_least_f32": [
            ctypes.c_void_p,  # probs [rows, vocab]
            ctypes.c_int64,  # rows
            ctypes.c_int64,  # vocab
            ctypes.c_int64,  # probs row stride
            ctypes.c_void_p,  # floors float32 [rows]
            ctypes.c_void_p,  # mass float64 [rows]
            ctypes.c_int,  # threads
        ]
    },
)
# Benchmarks switch the kernel off to compare with the torch passes.
mass_kernel_enabled = os.environ.get("FLASHSERVE_CPU_SAMPLER_KERNEL", "1") != "0"

TRUNCATE_KERNEL = NativeLibrary(
    "truncate_rows.c",
    "sampler: truncation of the unsure rows",
    {
        "truncate_rows_f32": [
            ctypes.c_void_p,  # probs float32 [rows, vocab], zeroed in place
            ctypes.c_int64,  # rows
            ctypes.c_int64,  # vocab
            ctypes.c_int64,  # probs row stride
            ctypes.c_void_p,  # min_p float32 [rows]
            ctypes.c_void_p,  # top_k int64 [rows]
            ctypes.c_void_p,  # top_p float64 [rows]
            ctypes.c_int,  # threads
        ]
    },
)
# Benchmarks and tests switch it off to compare with the torch passes (_truncate_probs).
truncate_kernel_enabled = os.environ.get("FLASHSERVE_CPU_SAMPLER_KERNEL", "1") != "0"


def kept_probs(
    logits: torch.Tensor, params: list[SamplingParams], top_p: list[float]
) -> torch.Tensor:
    """softmax(truncate_logits(logits)) times a factor per row: min-p, top-k and top-p applied.

    Zero exactly where truncate_logits masks (ties at a cut-off aside: see _truncate_probs).
    """
    probs = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0)
    if _truncate_in_kernel(probs, params, top_p):
        return probs
    # Non-negative floats compare as their bit patterns do: the truncation works on
    # these integer keys, and zeroes a probability by multiplying its key by 0 (a
    # float mask, or masked_fill_, would cost a [B, V] conversion or a branch a token).
    keys = probs.view(torch.int32)
    work = torch.empty_like(keys)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=probs.device)[:, None]
        floor = (probs.amax(dim=-1, keepdim=True) * min_p).view(torch.int32)
        keys.mul_(work.copy_(keys).ge_(floor))  # p >= min_p * p_max stays
    _truncate_probs(probs, params, top_p, work)
    return probs


def _truncate_in_kernel(
    probs: torch.Tensor, params: list[SamplingParams], top_p: list[float]
) -> bool:
    """kept_probs's min-p, top-k and nucleus by csrc/truncate_rows.c, row by row, in
    place; False (probs untouched) where the kernel does not load or take the tensor.

    The same tokens stay as with the torch passes, with one difference: its masses are
    float64 sums (the torch passes sum blocks of 256 in float32), so where a row's
    nucleus target lies within float32 rounding of a running mass, the two may end
    the nucleus one token apart. Both are then truncate_logits' set up to rounding."""
    if not (
        truncate_kernel_enabled
        and probs.device.type == "cpu"
        and probs.dtype == torch.float32
        and probs.dim() == 2
        and probs.stride(1) == 1
    ):
        return False
    library = TRUNCATE_KERNEL.load()
    if library is None:
        return False
    rows, vocab = probs.shape
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
    nucleus = torch.tensor(top_p, dtype=torch.float64)
    failed = library.truncate_rows_f32(
        probs.data_ptr(),
        rows,
        vocab,
        probs.stride(0),
        min_p.data_ptr(),
        top_k.data_ptr(),
        nucleus.data_ptr(),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("sampler: no memory for the truncation kernel's scratch")
    return True


# certainly_kept's allowance for rounding: its sums (float32 within blocks) are good
# to ~1e-6 of the row's mass; a token this close to the nucleus's edge is left to the
# exact path.
CERTAIN_MARGIN = 1e-4


def certainly_kept(
    probs: torch.Tensor,
    tokens: torch.Tensor,
    params: list[SamplingParams],
    top_p: list[float],
    totals: torch.Tensor | None = None,
) -> list[bool]:
    """Per row: whether kept_probs surely keeps its token (False: not known, not "dropped").

    probs: the rows' softmax (kept_probs's first step); tokens: one per row; totals:
    block_sums(probs) where the caller has them. Known only
    for rows truncated by at most a nucleus (no top-k below the vocabulary, no min-p):
    the token stays when every token at least as probable, its ties included, holds
    less than top_p of the mass (by a margin for rounding), since the nucleus keeps
    tokens in descending order until the mass before one reaches top_p.
    """
    chosen = probs.gather(1, tokens[:, None])
    # Both sums have the same bits in any batch, so a seeded row decides the same way alone.
    through = mass_at_least(probs, chosen)
    mass = row_sums(probs) if totals is None else totals.cumsum(dim=-1)[:, -1]
    return vouched(chosen.squeeze(1), through, mass, probs.shape[-1], params, top_p)


def vouched(
    chosen_prob: torch.Tensor,
    through: torch.Tensor,
    mass: torch.Tensor,
    vocab: int,
    params: list[SamplingParams],
    top_p: list[float],
) -> list[bool]:
    """certainly_kept's decision from its sums: per row the drawn token's probability,
    the mass at or above it and the row's mass (float64; csrc/vocab_race.c gives them
    in its pass). On the host, in float64 as torch would compute it: a batch's few
    dozen rows cost less there than a handful of tensor ops."""
    factor = 1.0 - CERTAIN_MARGIN
    return [
        (p.top_k <= 0 or p.top_k >= vocab)
        and p.min_p <= 0
        and (nucleus >= 1.0 or (below < nucleus * total * factor and prob > 0))
        for p, nucleus, prob, below, total in zip(
            params, top_p, chosen_prob.tolist(), through.tolist(), mass.tolist()
        )
    ]


def mass_at_least(probs: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Each row's sum of its probs >= floor[row] (float64, the same bits in any batch).

    One pass of csrc/mass_at_least.c on the CPU in float32; else row_sums of _at_least."""
    rows, vocab = probs.shape
    if (
        mass_kernel_enabled
        and probs.device.type == "cpu"
        and probs.dtype == torch.float32
        and probs.stride(1) == 1
    ):
        library = MASS_KERNEL.load()
        if library is not None:
            floors = floor.reshape(rows).to(torch.float32).contiguous()
            mass = torch.empty(rows, dtype=torch.float64)
            library.mass_at_least_f32(
                probs.data_ptr(),
                rows,
                vocab,
                probs.stride(0),
                floors.data_ptr(),
                mass.data_ptr(),
                torch.get_num_threads(),
            )
            return mass
    return row_sums(_at_least(probs, floor))


def _at_least(probs: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """probs where probs >= floor (per row), else 0: torch.where's values.

    In float32, on the keys: non-negative floats order as their bit patterns do, and a
    key ANDed with 0 or -1 is 0.0 or itself. Integer passes, about twice as fast on
    the CPU as torch.where (bench/RESULTS.md, issue 17 second pass)."""
    if probs.dtype != torch.float32 or not probs.is_contiguous():
        return torch.where(probs >= floor, probs, 0.0)
    keys = probs.view(torch.int32)
    mask = (keys >= floor.contiguous().view(torch.int32)).to(torch.int32).neg_()
    return mask.bitwise_and_(keys).view(torch.float32)


def _truncate_probs(
    probs: torch.Tensor, params: list[SamplingParams], top_p: list[float], work: torch.Tensor
) -> None:
    """Zero, in place, the probabilities of the tokens that truncate_logits would mask.

    `probs`: a softmax with min-p's drops zeroed, not renormalised (the nucleus's
    target is scaled by what is left instead). `work`: an int32 tensor of the
    same shape, overwritten. A cut-off in descending order is a key and a count:
    every token above the key stays, and that many of the tokens equal to it (the
    first in vocabulary order: a sort leaves the order of ties arbitrary anyway).
    Top-k's cut-off is where the count reaches k; the nucleus's where the mass
    reaches top_p of what top-k kept, the token that crosses staying, as in
    truncate_logits. _radix_select finds both without sorting.
    """
    rows, vocab = probs.shape
    device = probs.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    nucleus = [tp < 1.0 for tp in top_p]
    if all(k >= vocab for k in top_k) and not any(nucleus):
        return
    keys = probs.view(torch.int32)
    cut = torch.zeros(rows, dtype=torch.int32, device=device)  # keep every key > cut ...
    ties = torch.full((rows,), vocab, dtype=torch.float64, device=device)  # ... and this many = cut
    crowded = torch.zeros(rows, dtype=torch.bool, device=device)  # more than one token = cut
    mass = row_sums(probs)
    if any(k < vocab for k in top_k):
        # Every row runs it (k = vocab: a cut-off below everything) and those without a
        # top-k discard the result: no row's numbers depend on the rest of the batch.
        k = torch.tensor(top_k, dtype=torch.float64, device=device)
        has_k = k < vocab
        value, above, count = _radix_select(keys, None, k, work)
        kept = row_sums(probs * (keys > value[:, None]))
        cut = torch.where(has_k, value, cut)
        ties = torch.where(has_k, k - above, ties)
        crowded = has_k & (count > 1)
        mass = torch.where(has_k, kept + ties * _as_float(cut), mass)
    if any(nucleus):
        target = torch.tensor(top_p, dtype=torch.float64, device=device) * mass
        target.clamp_(min=torch.finfo(torch.float64).tiny)
        value, above, at_value = _radix_select(keys, probs, target, work)
        # Tokens equal to the cut-off, in descending order: the first that crosses stays.
        each = _as_float(value)
        count = ((target - above) / each).ceil().clamp_(min=1.0)
        # Rounding aside the nucleus ends within top-k; never let it reach past it.
        inside = (value > cut) | ((value == cut) & (count < ties))
        inside &= torch.tensor(nucleus, device=device)
        cut = torch.where(inside, value, cut)
        ties = torch.where(inside, count, ties)
        crowded = torch.where(inside, at_value > 1.5 * each, crowded)
    keys.mul_(work.copy_(keys).ge_(cut[:, None]))
    # Where several tokens equal the cut-off, only the first `ties` of them stay. (A
    # tie at the cut-off is common: even fp32 probabilities of distinct logits often
    # round to the same value. Each such row costs one pass over its own keys.)
    for row in (crowded & (cut > 0)).nonzero().view(-1).tolist():
        equal = (keys[row] == cut[row]).nonzero().view(-1)
        keys[row, equal[int(ties[row]) :]] = 0


def _as_float(keys: torch.Tensor) -> torch.Tensor:
    """The float32 values whose bit patterns are `keys`, as float64."""
    return keys.to(torch.int32).view(torch.float32).to(torch.float64)


def _radix_levels(vocab: int) -> list[int]:
    """The bits of each histogram pass of _radix_select, 30 in all (a probability's key
    is below 2**30). The first pass, over every key, takes at most 15 bits, about
    log2(vocab) (so a row's bins are no more than its tokens: filling and reading
    them is a pass too); the later ones, over the few keys left, at most 8."""
    first = max(6, min(15, vocab.bit_length() - 1))
    count = -(-(30 - first) // 8)
    base, extra = divmod(30 - first, count)
    return [first] + [base + 1] * extra + [base] * (count - extra)


# _radix_select gathers the keys of the crossing bins when they are at most this share
# of the batch's tokens (their count estimated from the bins' weights).
RADIX_GATHER_SHARE = 1 / 8


def _radix_select(
    keys: torch.Tensor,
    weights: torch.Tensor | None,
    target: torch.Tensor,
    bins: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's cut-off in descending order: where the running weight reaches `target`.

    keys: [B, V] int32, non-negative, below 2**30 (a probability's bits); weights:
    [B, V] (None: count tokens); bins: int32 [B, V], overwritten. Returns
    the key at which the running total of the weights of the keys in descending
    order first reaches the target (tokens with equal keys count one by one), the
    total weight of all larger keys (float64), and the total weight of the keys
    equal to it.

    A histogram of every key's high bits finds the bin that crosses, and histograms
    of the next bits of the keys in that bin narrow it down to one key: three to
    five bincounts, no sort.
    """
    rows, vocab = keys.shape
    device = keys.device
    levels = _radix_levels(vocab)
    shift = 30 - levels[0]
    mask = (1 << levels[0]) - 1
    offsets = torch.arange(rows, dtype=torch.int32, device=device)[:, None] << levels[0]
    # A row's bins run best first: bin = offset + mask - digit.
    torch.sub(offsets + mask, torch.bitwise_right_shift(keys, shift, out=bins), out=bins)
    histogram = _histogram(bins, weights, rows, levels[0])
    index, above = _crossing(histogram, target)
    prefix = mask - index  # the key's bits found so far
    # The later passes histogram only the keys in each row's crossing bin: gathered,
    # when they are few (they usually are); else in place, all keys histogrammed
    # again with the others sent to a spare row of bins (a flat distribution's keys
    # can share their high bits by the thousand, and gathering them all costs more).
    # Both add up each bin's weights in the same order, so the choice, made for the
    # whole batch, changes no row's numbers.
    in_bin = histogram.gather(1, index[:, None]).view(rows).to(torch.float64)
    if weights is not None:  # weight over the bin's smallest value: at least its count
        in_bin /= _as_float((prefix << shift).to(torch.int32))
    gather = bool(in_bin.sum() < RADIX_GATHER_SHARE * rows * vocab)
    if gather:
        found = (bins == offsets + index[:, None].to(torch.int32)).nonzero()
        row = found[:, 0]
        flat = row * vocab + found[:, 1]
        key = keys.view(-1)[flat]
        weight = None if weights is None else weights.reshape(-1)[flat]
    else:
        outside = torch.empty_like(bins)
    for level, width in enumerate(levels[1:], start=1):
        shift -= width
        mask = (1 << width) - 1
        if gather:
            if level > 1:  # past the second pass, only the keys that share the prefix
                same = (key >> (shift + width)) == prefix[row]
                row, key = row[same], key[same]
                weight = None if weight is None else weight[same]
            bin_of = (row << width) + (mask - ((key >> shift) & mask))
            histogram = torch.bincount(bin_of, weights=weight, minlength=rows << width)
            histogram = histogram.view(rows, 1 << width)
        else:
            offsets = torch.arange(rows, dtype=torch.int32, device=device)[:, None] << width
            torch.bitwise_right_shift(keys, shift, out=bins).bitwise_and_(mask)
            torch.sub(offsets + mask, bins, out=bins)
            # Keys without the prefix: + (spare - offset), to spare + mask - digit.
            torch.bitwise_right_shift(keys, shift + width, out=outside)
            outside.sub_(prefix.to(torch.int32)[:, None]).ne_(0)
            bins.add_(outside.mul_((rows << width) - offsets))
            histogram = _histogram(bins, weights, rows + 1, width)[:rows]
        index, before = _crossing(histogram, target - above)
        above += before
        prefix = (prefix << width) | (mask - index)
    at_key = histogram.gather(1, index[:, None]).view(rows).to(torch.float64)
    return prefix.to(torch.int32), above, at_key


def _histogram(
    bins: torch.Tensor, weights: torch.Tensor | None, rows: int, width: int
) -> torch.Tensor:
    flat = None if weights is None else weights.reshape(-1)
    counts = torch.bincount(bins.reshape(-1), weights=flat, minlength=rows << width)
    return counts.view(rows, 1 << width)


# _crossing's first level: sums of blocks of this many weights.
CROSSING_BLOCK = 256


def block_sums(weights: torch.Tensor) -> torch.Tensor:
    """Sums of each row's blocks of CROSSING_BLOCK weights (the last may be shorter), float64.

    Also how the sampler sums a row: unlike a plain sum over the row, whose order
    changes with the number of rows (torch splits a lone long row among threads),
    this gives a row the same bits in any batch.
    """
    n = weights.shape[1]
    whole = n // CROSSING_BLOCK
    parts = []
    # Each block sums in the weights' own type: a float64 sum would convert them all.
    if whole:
        blocks = weights[:, : whole * CROSSING_BLOCK].unfold(1, CROSSING_BLOCK, CROSSING_BLOCK)
        parts.append(blocks.sum(dim=-1, dtype=weights.dtype))
    if n > whole * CROSSING_BLOCK:
        tail = weights[:, whole * CROSSING_BLOCK :]
        parts.append(tail.sum(dim=-1, keepdim=True, dtype=weights.dtype))
    return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).to(torch.float64)


def row_sums(weights: torch.Tensor) -> torch.Tensor:
    """Each row's sum, float64, the same in any batch (see block_sums)."""
    return block_sums(weights).cumsum(dim=-1)[:, -1]


def _crossing(weights: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first index at which the running sum of `weights` reaches `target`.

    Returns the index and the sum of the weights before it (float64). Past
    CROSSING_BLOCK weights, blocks of them are summed, the running sum over blocks
    picks the block, and a running sum inside that block the index: no [B, V]
    running sum. Where rounding leaves the target out of reach, the answer is the
    row's last non-zero weight.
    """
    rows, n = weights.shape
    block = CROSSING_BLOCK
    if n <= block:
        return _first_reaching(weights.to(torch.float64), None, target[:, None])
    sums = block_sums(weights)
    first, before = _first_reaching(sums, None, target[:, None])
    index = first[:, None] * block + torch.arange(block, device=weights.device)[None, :]
    inside = weights.gather(1, index.clamp(max=n - 1)).to(torch.float64) * (index < n)
    offset, before = _first_reaching(inside, before, target[:, None])
    return index.gather(1, offset[:, None]).squeeze(1), before


def _first_reaching(
    weights: torch.Tensor, start: torch.Tensor | None, goal: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """_crossing over float64 weights, each row's running sum starting at `start`."""
    running = weights.cumsum(dim=-1)
    if start is not None:
        running += start[:, None]
    positions = torch.arange(weights.shape[1], device=weights.device)
    last = torch.where(weights > 0, positions, 0).amax(dim=-1)
    first = torch.minimum((running < goal).sum(dim=-1), last)[:, None]
    return first.squeeze(1), (running - weights).gather(1, first).squeeze(1)


def truncate_logits(
    logits: torch.Tensor, params: list[SamplingParams], top_p: list[float], device: torch.device
) -> torch.Tensor:
    """Mask tokens outside each row's top-k, nucleus (top-p) and min-p sets."""
    vocab = logits.shape[-1]
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    min_p = [p.min_p for p in params]
    if any(mp > 0 for mp in min_p):
        probs = torch.softmax(logits, dim=-1)
        floor = (
            probs.max(dim=-1, keepdim=True).values * upload(min_p, torch.float32, device)[:, None]
        )
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if all(k >= vocab for k in top_k) and all(tp >= 1.0 for tp in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= upload(top_k, torch.long, device)[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token that
    # crosses the threshold stays in). Rows with top_p >= 1 keep everything:
    # rounding in the cumulative sum must not clip their tails.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    nucleus = upload(top_p, torch.float32, device)[:, None]
    drop |= (mass_before >= nucleus) & (nucleus < 1.0)
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
