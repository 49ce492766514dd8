"""Linear layers whose parameters know how to take checkpoint tensors.

Every parameter the loader fills may carry a `weight_loader(param, loaded,
shard_id) -> int` attribute: it copies the checkpoint tensor `loaded` into
its part of `param` and returns how many of the parameter's elements it
wrote (the loader counts them to know when a parameter is complete).
`shard_id` says which part: None for the whole parameter, a name for one
projection of a packed one ("q", "k", "v", "gate", "up"), or whatever the
owning module defines (experts use (expert, name)). A tensor-parallel
loader replaces these functions with ones that keep only a rank's slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Any], int]


def copy_into(target: torch.Tensor, loaded: torch.Tensor, what: str) -> int:
    """Copy (and cast) a checkpoint tensor into a parameter region of the same shape."""
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(
            f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, "
            f"the model expects {tuple(target.shape)}"
        )
    target.copy_(loaded)
    return target.numel()


def whole_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> int:
    """The default: the checkpoint tensor is the whole parameter."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} has no shard {shard_id!r}")
    return copy_into(param.data, loaded, "parameter")


def weight_loader_of(param: nn.Parameter) -> WeightLoader:
    return getattr(param, "weight_loader", whole_weight_loader)


class PackedLinear(nn.Module):
    """Several projections of one input as one matrix product (q|k|v, gate|up).

    The checkpoint stores each projection separately; each is a named shard
    (rows `offset : offset + size` of the fused weight and bias).
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool) -> None:
        super().__init__()
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shards.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.split_sizes = list(shards.values())
        self.weight = nn.Parameter(torch.empty(offset, in_features))
        self.bias = nn.Parameter(torch.empty(offset)) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.load_shard

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any) -> int:
        if shard_id is None:  # a checkpoint that already stores the fused tensor
            return copy_into(param.data, loaded, "packed projection")
        if shard_id not in self.shard_offsets:
            raise ValueError(f"packed projection has no shard {shard_id!r}")
        offset, size = self.shard_offsets[shard_id]
        return copy_into(param.data.narrow(0, offset, size), loaded, f"shard {shard_id!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The packed product, split back into its projections."""
        return self(x).split(self.split_sizes, dim=-1)
