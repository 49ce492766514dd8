"""Linear layers whose parameters know how to take checkpoint tensors.

Every parameter the loader fills may carry a `weight_loader(param, loaded,
shard_id) -> int` attribute: it copies the checkpoint tensor `loaded` into
its part of `param` and returns how many of the parameter's elements it
wrote (the loader counts them to know when a parameter is complete).
`shard_id` says which part: None for the whole parameter, a name for one
projection of a packed one ("q", "k", "v", "gate", "up"), or whatever the
owning module defines (experts use (expert, name)).

Tensor parallel: a column-parallel layer (PackedLinear with `ranges`) holds
some output rows of each projection, a row-parallel one (RowParallelLinear)
some input columns; their loaders `narrow` the checkpoint tensor to the
rank's slice before copying. At tensor_parallel_size > 1 the loader passes
lazy checkpoint tensors (models/safetensors_stream.py) whose `narrow` reads
only that slice from the file; at size 1 plain tensors, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flashserve.distributed.parallel_state import all_reduce, tensor_parallel
from flashserve.layers import cpu_linear

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Any], int]


def copy_into(target: torch.Tensor, loaded: Any, what: str) -> int:
    """Copy (and cast) a checkpoint tensor (or a lazy slice of one) into a parameter
    region of the same shape."""
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(
            f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, "
            f"the model expects {tuple(target.shape)}"
        )
    target.copy_(materialize(loaded))
    return target.numel()


def materialize(loaded: Any) -> torch.Tensor:
    """A checkpoint tensor's values: the tensor itself, or a lazy slice read from its file."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded.read()


def split_evenly(total: int, what: str) -> tuple[int, int]:
    """(start, size) of this rank's equal part of `total` (e.g. heads, rows); a clear
    error naming `what` when tensor_parallel_size does not divide it."""
    tp = tensor_parallel()
    if total % tp.size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size {tp.size}")
    size = total // tp.size
    return tp.rank * size, size


def whole_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> int:
    """The default: the checkpoint tensor is the whole parameter."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} has no shard {shard_id!r}")
    return copy_into(param.data, loaded, "parameter")


def weight_loader_of(param: nn.Parameter) -> WeightLoader:
    return getattr(param, "weight_loader", whole_weight_loader)


class PackedLinear(nn.Module):
    """Several projections of one input as one matrix product (q|k|v, gate|up);
    column-parallel (merged) under tensor parallel.

    The checkpoint stores each projection separately; each is a named shard
    (rows `offset : offset + size` of the fused weight and bias). `shards`
    gives each projection's checkpoint size; `ranges`, when set, the rows
    (start, size) of it this rank holds (tensor parallel), else all of them.
    """

    def __init__(
        self,
        in_features: int,
        shards: dict[str, int],
        bias: bool,
        ranges: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint_sizes = dict(shards)
        self.ranges = {name: ranges[name] if ranges else (0, size) for name, size in shards.items()}
        self.sliced = any(
            self.ranges[name] != (0, size) for name, size in self.checkpoint_sizes.items()
        )
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, (_, size) in self.ranges.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.split_sizes = [size for _, size in self.ranges.values()]
        self.weight = nn.Parameter(torch.empty(offset, in_features))
        self.bias = nn.Parameter(torch.empty(offset)) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.load_shard

    def load_shard(self, param: nn.Parameter, loaded: Any, shard_id: Any) -> int:
        if shard_id is None:  # a checkpoint that already stores the fused tensor
            if not self.sliced:
                return copy_into(param.data, loaded, "packed projection")
            fused = sum(self.checkpoint_sizes.values())
            if loaded.shape[0] != fused:
                raise ValueError(
                    f"packed projection: checkpoint tensor has {loaded.shape[0]} rows, "
                    f"the model expects {fused}"
                )
            written, start = 0, 0
            for name, size in self.checkpoint_sizes.items():
                written += self.load_shard(param, loaded.narrow(0, start, size), name)
                start += size
            return written
        if shard_id not in self.shard_offsets:
            raise ValueError(f"packed projection has no shard {shard_id!r}")
        offset, size = self.shard_offsets[shard_id]
        if self.sliced:
            full = self.checkpoint_sizes[shard_id]
            if loaded.shape[0] != full:
                raise ValueError(
                    f"shard {shard_id!r}: checkpoint tensor has {loaded.shape[0]} rows, "
                    f"the model expects {full}"
                )
            start, _ = self.ranges[shard_id]
            loaded = loaded.narrow(0, start, size)
        return copy_into(param.data.narrow(0, offset, size), loaded, f"shard {shard_id!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(x, self.weight, self.bias)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The packed product, split back into its projections."""
        return self(x).split(self.split_sizes, dim=-1)


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b) where this rank holds input columns of W and the matching slice of
    x: the ranks' partial products are summed (all-reduce) unless `reduce` is False
    (a caller that sums several partial outputs once, e.g. routed + shared experts).

    At tensor_parallel_size 1 this is a plain linear layer.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, what: str, reduce: bool = True
    ) -> None:
        super().__init__()
        self.tp = tp = tensor_parallel()
        self.tp_size, self.tp_rank = tp.size, tp.rank
        self.in_start, self.in_size = split_evenly(in_features, what)
        self.in_features = in_features
        self.reduce = reduce
        self.weight = nn.Parameter(torch.empty(out_features, self.in_size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if self.tp_size > 1:
            self.weight.weight_loader = self.load_weight

    def load_weight(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> int:
        if shard_id is not None:
            raise ValueError(f"row-parallel weight has no shard {shard_id!r}")
        if tuple(loaded.shape) != (param.shape[0], self.in_features):
            raise ValueError(
                f"checkpoint tensor has shape {tuple(loaded.shape)}, the model expects "
                f"{(param.shape[0], self.in_features)}"
            )
        return copy_into(param.data, loaded.narrow(1, self.in_start, self.in_size), "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduced(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of the product (all of it at tensor_parallel_size 1)."""
        # The bias once, on rank 0, so the sum over ranks holds it once.
        return cpu_linear.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)

    def reduced(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of the ranks' `partial` products, where this layer reduces."""
        return all_reduce(partial, self.tp) if self.reduce and self.tp_size > 1 else partial
