"""Host <-> device copies that never make the host wait for the device's queue.

On CUDA, `torch.tensor(values, device=...)` and `.tolist()` on a device tensor both
synchronize the stream: the host stops until every kernel queued so far has run. With
step n+1 queued behind step n (engine/async_scheduling.py) that would serialize them
again. Uploads here go through pinned memory with `non_blocking=True` (torch's pinned
allocator keeps the staging buffer until its copy has run); downloads copy into pinned
memory behind the work that produced them and record an event, so reading them waits
for that work only. On the CPU both are plain tensors: nothing is queued there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """values (a list of numbers, or of equal-length lists) as a tensor on device."""
    host = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host if device.type == "cpu" else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class Download:
    """A device tensor on its way to the host, readable once the work before it is done."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cuda":
            self._host, self._done = tensor, None
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def tolist(self) -> list:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()
