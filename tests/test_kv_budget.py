"""The KV cache budget counts memory torch's allocator caches but no tensor uses as free.

The CUDA memory calls are the boundary to hardware; a stand-in device below
keeps the driver's accounting (cached blocks count as used until released).
"""

from __future__ import annotations

from flashserve.engine.device_memory import kv_cache_budget, measure_free_memory

GIB = 1 << 30


class AllocatorStandIn:
    """A device of `total` bytes where `allocated` are live and `cached` are held unused."""

    def __init__(self, total: int, allocated: int, cached: int) -> None:
        self.total, self.allocated, self.cached = total, allocated, cached
        self.calls: list[str] = []

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")
        self.cached = 0

    def mem_get_info(self) -> tuple[int, int]:
        self.calls.append("mem_get_info")
        return self.total - self.allocated - self.cached, self.total

    def memory_reserved(self) -> int:
        return self.allocated + self.cached

    def memory_allocated(self) -> int:
        return self.allocated


def test_budget_ignores_what_the_allocator_caches():
    # An 8B model on an 80 GiB card: 16 GiB of bf16 weights, and the 32 GiB fp32
    # copies a load freed still cached (what the old meta -> fp32 -> bf16 load left).
    device = AllocatorStandIn(total=80 * GIB, allocated=16 * GIB, cached=32 * GIB)
    free = measure_free_memory(device)
    assert free.free == 64 * GIB
    assert free.released == 32 * GIB
    assert free.allocated == 16 * GIB
    assert kv_cache_budget(free, 0.9) == int(64 * GIB * 0.9)
    # The cache is released before the driver is asked, not after.
    assert device.calls.index("empty_cache") < device.calls.index("mem_get_info")


def test_budget_leaves_the_reserve_free():
    device = AllocatorStandIn(total=80 * GIB, allocated=16 * GIB, cached=0)
    free = measure_free_memory(device)
    assert kv_cache_budget(free, 0.99, reserve=4 * GIB) == 60 * GIB
    assert kv_cache_budget(free, 0.5, reserve=4 * GIB) == 32 * GIB
    tight = AllocatorStandIn(total=20 * GIB, allocated=18 * GIB, cached=0)
    assert kv_cache_budget(measure_free_memory(tight), 0.9, reserve=4 * GIB) == 0
