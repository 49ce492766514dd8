"""Read safetensors files one tensor at a time, without memory-mapping them.

`safetensors.safe_open` maps the file: every page a tensor is read from
stays mapped, and counts in the process's resident memory, until the file
is closed, so loading a one-file checkpoint holds the whole file in RSS
beside the model's own copy. Reading each tensor with plain `readinto`
leaves the pages in the kernel's page cache (reclaimable, not ours), and
the process holds at most one checkpoint tensor besides the model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def tensor_names(path: Path) -> list[str]:
    return list(_header(path)[0])


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of one file, in file order; each a fresh tensor."""
    entries, data_start = _header(path)
    order = sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for name, entry in order:
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(
                    f"{path.name}: tensor {name} has unsupported dtype {entry['dtype']}"
                )
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=dtype)
            if end > begin:
                f.seek(data_start + begin)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                got = 0
                while got < end - begin:
                    n = f.readinto(view[got:])
                    if not n:
                        raise ValueError(f"{path.name}: file ends inside tensor {name}")
                    got += n
            yield name, tensor


# A slice's runs shorter than this are read with their whole rows, in bounded groups
# (one large read beats many small ones), and cut in memory.
_SMALL_RUN_BYTES = 256 << 10
_GROUP_READ_BYTES = 16 << 20


class CheckpointSlice:
    """A tensor of a safetensors file, not read yet; `narrow` (along one dimension)
    picks a slice and `read` reads only that slice's bytes (tensor parallel: each
    rank reads its shard, never the whole tensor)."""

    def __init__(
        self,
        path: Path,
        name: str,
        dtype: torch.dtype,
        full_shape: tuple[int, ...],
        offset: int,
        window: tuple[int, int, int] | None = None,  # (dim, start, length)
    ) -> None:
        self.path, self.name, self.dtype = path, name, dtype
        self.full_shape, self.offset, self.window = full_shape, offset, window

    @property
    def shape(self) -> torch.Size:
        if self.window is None:
            return torch.Size(self.full_shape)
        dim, _, length = self.window
        shape = list(self.full_shape)
        shape[dim] = length
        return torch.Size(shape)

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        dim = dim % len(self.full_shape)
        base = 0
        if self.window is not None:
            if self.window[0] != dim:
                raise ValueError(f"{self.name}: slices along two dimensions are not supported")
            base = self.window[1]
            if start + length > self.window[2]:
                raise ValueError(f"{self.name}: slice past the end of dimension {dim}")
        elif start + length > self.full_shape[dim]:
            raise ValueError(f"{self.name}: slice past the end of dimension {dim}")
        return CheckpointSlice(
            self.path,
            self.name,
            self.dtype,
            self.full_shape,
            self.offset,
            (dim, base + start, length),
        )

    def read(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        if out.numel() == 0:
            return out
        itemsize = out.element_size()
        dim, start, length = self.window or (0, 0, self.full_shape[0] if self.full_shape else 1)
        outer = math.prod(self.full_shape[:dim])
        inner = math.prod(self.full_shape[dim + 1 :]) * itemsize  # bytes per index of `dim`
        row = self.full_shape[dim] * inner if self.full_shape else itemsize
        run = length * inner
        target = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if run >= _SMALL_RUN_BYTES or run == row:
                if run == row:  # whole rows: one contiguous read
                    _pread_into(fd, target, self.offset + start * inner, self.name)
                else:
                    for i in range(outer):
                        where = self.offset + i * row + start * inner
                        _pread_into(fd, target[i * run : (i + 1) * run], where, self.name)
                return out
            group = max(1, _GROUP_READ_BYTES // row)
            for first in range(0, outer, group):
                count = min(group, outer - first)
                rows = torch.empty(count * row, dtype=torch.uint8)
                _pread_into(fd, memoryview(rows.numpy()), self.offset + first * row, self.name)
                picked = rows.view(count, row)[:, start * inner : start * inner + run]
                target[first * run : (first + count) * run] = memoryview(
                    picked.contiguous().numpy()
                ).cast("B")
        finally:
            os.close(fd)
        return out


def _pread_into(fd: int, target: memoryview, where: int, name: str) -> None:
    got = 0
    while got < len(target):
        n = os.preadv(fd, [target[got:]], where + got)
        if not n:
            raise ValueError(f"file ends inside tensor {name}")
        got += n


def iter_slices(path: Path) -> Iterator[tuple[str, CheckpointSlice]]:
    """(name, unread tensor) for every tensor of one file, in file order."""
    entries, data_start = _header(path)
    order = sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0])
    for name, entry in order:
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {entry['dtype']}")
        shape = tuple(entry["shape"])
        yield name, CheckpointSlice(path, name, dtype, shape, data_start + entry["data_offsets"][0])


def _header(path: Path) -> tuple[dict[str, dict], int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size
