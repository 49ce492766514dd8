"""A CPU engine keeps freed host memory for its next step (engine/host_memory.py)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from flashserve.engine.host_memory import retain_freed_host_memory

BLOCK_BYTES = 24 << 20  # above glibc's default mmap threshold, below the retained one


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        ).split()
    ]


def _malloc_info() -> MallInfo2:
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    return mallinfo2()


def test_a_freed_activation_block_stays_in_the_heap() -> None:
    assert retain_freed_host_memory(), "glibc on Linux takes the settings"
    mapped_before = _malloc_info().hblkhd
    activations = torch.ones(BLOCK_BYTES // 4)
    assert _malloc_info().hblkhd == mapped_before, "served from the heap, not a new mapping"
    del activations
    assert _malloc_info().fordblks >= BLOCK_BYTES, "kept for the next step, not trimmed"


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHSERVE_RETAIN_HOST_MEMORY", "0")
    assert not retain_freed_host_memory()
