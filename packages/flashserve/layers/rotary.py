"""Rotary position embeddings with the scaling schemes Llama-family configs declare."""

from __future__ import annotations

import math
from typing import Any

import torch

from flashserve.layers import cpu_elementwise


def inverse_frequencies(
    rope: dict[str, Any], head_dim: int, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies and the cos/sin magnitude for one rope config.

    Returns (inv_freq [head_dim/2] float32, attention_factor).
    """
    base = float(rope.get("rope_theta", 10000.0))
    dim = _rotated_dims(rope, head_dim)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "dynamic":
        # Dynamic NTK raises the base only for sequences longer than
        # max_position_embeddings, and the engine never serves one (max_model_len is
        # capped there): within that range it is the plain rope, as in transformers.
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, rope, dim, base, max_positions)
    raise ValueError(
        f"rope_type {kind!r} is not supported (default, linear, dynamic, llama3, yarn)"
    )


def _rotated_dims(rope: dict[str, Any], head_dim: int) -> int:
    return int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))


def _llama3(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept; the band in
    # between is blended smoothly so nearby positions stay distinguishable.
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    in_band = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(in_band, blended, out)


def _yarn(
    inv_freq: torch.Tensor, rope: dict[str, Any], dim: int, base: float, max_positions: int
) -> tuple[torch.Tensor, float]:
    original = rope.get("original_max_position_embeddings") or max_positions
    factor = rope.get("factor") or max_positions / original

    def magnitude(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = (
            magnitude(factor, mscale) / magnitude(factor, mscale_all)
            if mscale and mscale_all
            else magnitude(factor)
        )

    def dim_for_rotations(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = dim_for_rotations(rope.get("beta_fast") or 32)
    high = dim_for_rotations(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (unchanged), 0: interpolate (divided by factor)
    scaled = inv_freq / factor * (1 - keep) + inv_freq * keep
    return scaled, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """Applies rotate-half RoPE (the Hugging Face Llama layout) at given positions."""

    def __init__(self, rope: dict[str, Any], head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.rope, self.head_dim, self.max_positions = rope, head_dim, max_positions
        # Dims rotated per head: one pair per frequency of inverse_frequencies.
        self.rotary_dim = 2 * -(-_rotated_dims(rope, head_dim) // 2)
        # On the meta device (the loader building a model) the table waits for
        # init_buffers: computing it there would pull in torch's reference ops.
        on_meta = torch.empty(0).device.type == "meta"
        table = torch.empty(0) if on_meta else self._table(None)
        self.register_buffer("cos_sin", table, persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        """Recompute the table (a model built on the meta device has none)."""
        self.cos_sin = self._table(device)

    def _table(self, device: torch.device | None) -> torch.Tensor:
        inv_freq, attention_factor = inverse_frequencies(
            self.rope, self.head_dim, self.max_positions
        )
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        # Cache, for every position once, cos|cos and -sin|sin over the rotated dims:
        # then rotate-half is x * cos + swap_halves(x) * sin, three elementwise ops
        # (exactly x1*cos - x2*sin and x2*cos + x1*sin, bit for bit).
        cos, sin = freqs.cos(), freqs.sin()
        table = torch.cat([cos, cos, -sin, sin], dim=-1) * attention_factor
        return table if device is None else table.to(device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim]; positions: [T].

        q and k are rotated together (one set of kernels, not two): a decode step at
        small batch is launch-bound, and this is a few dozen launches per layer fewer.
        """
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        heads = q.shape[1]
        both = _rotate(torch.cat([q, k], dim=1), cos, sin, self.rotary_dim)
        return both[:, :heads], both[:, heads:]

    def rotate_in_place(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's result, computed in q and k themselves where the CPU kernel takes them
        (the caller gives up their unrotated values either way)."""
        if cpu_elementwise.rotate_half_in_place(q, k, positions, self.cos_sin, self.rotary_dim):
            return q, k
        return self.forward(positions, q, k)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot = rot.float()
    x1, x2 = rot.chunk(2, dim=-1)
    out = (rot * cos + torch.cat([x2, x1], dim=-1) * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.numel() else out
