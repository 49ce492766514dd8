"""How much device memory the KV cache may take, measured after the weights are placed.

`torch.cuda.mem_get_info` reports the driver's view: blocks torch's caching
allocator holds but no tensor uses (temporaries of loading, freed copies)
count as used. Measured without releasing them first, the KV budget comes
out short by whatever the load left cached. So the cache is emptied before
measuring; the numbers of the measurement are logged at start-up.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Protocol

import torch


class DeviceMemory(Protocol):
    """The allocator and driver calls the budget needs (torch.cuda's, for one device)."""

    def synchronize(self) -> None: ...
    def empty_cache(self) -> None: ...
    def mem_get_info(self) -> tuple[int, int]: ...
    def memory_reserved(self) -> int: ...
    def memory_allocated(self) -> int: ...


class CudaMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def memory_reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)


@dataclass(frozen=True)
class FreeMemory:
    free: int  # bytes the device has free once the allocator's cache is released
    total: int
    released: int  # bytes the allocator held unused and gave back
    allocated: int  # bytes live tensors (the weights) occupy


def measure_free_memory(memory: DeviceMemory) -> FreeMemory:
    memory.synchronize()
    gc.collect()  # tensors only a reference cycle keeps alive would stay allocated
    cached = memory.memory_reserved() - memory.memory_allocated()
    memory.empty_cache()
    free, total = memory.mem_get_info()
    return FreeMemory(free, total, max(0, cached), memory.memory_allocated())


def kv_cache_budget(free: FreeMemory, fraction: float, reserve: int = 0) -> int:
    """Bytes for the KV cache: `fraction` of the free memory, leaving at least `reserve` free."""
    budget = int(free.free * fraction)
    if reserve:
        budget = min(budget, free.free - reserve)
    return max(0, budget)
