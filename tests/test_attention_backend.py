"""Which attention backend runs: flash_attn only where it can (CUDA, fp16/bf16, paged
block size a multiple of 256, compute capability >= 8.0, importable); `auto` falls
back to torch and logs why; an explicit flash_attn that cannot run is a load error.
The decision is tested with explicit inputs, and select_backend / LLMEngine for real
on this CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.layers.attention import (
    TorchAttention,
    choose_backend,
    flash_attn_problems,
    select_backend,
)
from tests.chat_harness import EMBEDDED_MODEL

H100 = (9, 0)
FIT = dict(device_type="cuda", dtype=torch.bfloat16, block_size=256, capability=H100)


def problems(**changes) -> list[str]:
    return flash_attn_problems(**{**FIT, "import_error": None, **changes})


def test_flash_attn_fits_a_bf16_or_fp16_cache_of_256_token_blocks_on_ampere_or_newer():
    assert problems() == []
    assert problems(dtype=torch.float16, capability=(8, 0), block_size=512) == []
    assert problems(block_size="auto") == []  # auto becomes 256 with flash_attn
    assert choose_backend("auto", problems()) == "flash_attn"
    assert choose_backend("flash_attn", problems()) == "flash_attn"


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(dtype=torch.float32), "float16 or bfloat16 only, not float32"),
        (dict(block_size=16), "block_size a multiple of 256, not 16"),
        (dict(block_size=384), "block_size a multiple of 256, not 384"),
        (dict(capability=(7, 5)), "compute capability >= 8.0, this GPU has 7.5"),
        (dict(device_type="cpu", capability=None), "needs a CUDA device, not cpu"),
        (dict(import_error="ModuleNotFoundError: flash_attn"), "does not import"),
    ],
)
def test_each_thing_flash_attn_cannot_run_is_named(change, reason):
    found = problems(**change)
    assert len(found) == 1 and reason in found[0]
    assert choose_backend("auto", found) == "torch"
    with pytest.raises(ValueError, match=f"flash_attn cannot run here: .*{reason}"):
        choose_backend("flash_attn", found)


def test_every_problem_is_listed_together():
    found = problems(dtype=torch.float32, block_size=16, capability=(7, 0), import_error="x")
    assert len(found) == 4


def test_torch_is_chosen_when_asked_whatever_flash_attn_could_do():
    assert choose_backend("torch", []) == "torch"
    with pytest.raises(ValueError, match="attention_backend must be auto, flash_attn or torch"):
        choose_backend("flash", [])


def test_auto_on_this_cpu_uses_torch_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="flashserve.layers.attention"):
        backend = select_backend("auto", torch.device("cpu"), torch.float32, "auto")
    assert isinstance(backend, TorchAttention)
    assert "attention backend: torch" in caplog.text


def test_an_engine_asked_for_flash_attn_where_it_cannot_run_fails_to_load_naming_why():
    config = EngineConfig(
        device="cpu", dtype="float32", attention_backend="flash_attn", kv_cache_memory_gb=0.01
    )
    with pytest.raises(ValueError, match="needs a CUDA device, not cpu.*not float32"):
        LLMEngine(config, EMBEDDED_MODEL)
