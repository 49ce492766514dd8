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


def _header(path: Path) -> tuple[dict[str, dict], int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size
