"""`dtype: auto` takes the faster float type on a CPU, measured at load; names map exactly."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from flashserve.engine.dtype_choice import faster_cpu_dtype, matmul_seconds, pick_dtype
from tests.engine_harness import make_engine
from tests.tiny_models import save_tiny_llama

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)],
)
def test_named_dtypes_are_taken_as_given(name, dtype):
    assert pick_dtype(name, CPU, 512, 1536) is dtype


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="dtype must be auto, bfloat16, float16 or float32"):
        pick_dtype("int8", CPU, 512, 1536)


@pytest.mark.parametrize(
    ("bf16_s", "fp32_s", "chosen"),
    [
        (1.0, 4.0, torch.bfloat16),  # AVX-512 BF16 / AMX: bf16 clearly faster
        (1.0, 1.2, torch.bfloat16),  # exactly the required margin
        (1.0, 1.1, torch.float32),  # not worth the precision
        (3.0, 1.0, torch.float32),  # emulated bf16
    ],
)
def test_bf16_is_kept_only_for_a_clear_gain(bf16_s, fp32_s, chosen):
    assert faster_cpu_dtype(bf16_s, fp32_s) is chosen


def test_the_probe_measures_a_real_product():
    seconds = matmul_seconds(torch.float32, 256, 512, repeats=2)
    assert seconds > 0 and math.isfinite(seconds)  # a measurement, not a bound on speed


def test_auto_on_cpu_measures_and_says_what_it_chose(caplog):
    with caplog.at_level(logging.INFO, logger="flashserve.engine.dtype_choice"):
        chosen = pick_dtype("auto", CPU, 512, 1536)
    assert chosen in (torch.bfloat16, torch.float32)
    line = next(r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage())
    assert "ms in bf16" in line and line.endswith(str(chosen).removeprefix("torch."))


def test_an_auto_engine_runs_its_weights_and_cache_in_the_chosen_type(tmp_path):
    engine = make_engine(save_tiny_llama(tmp_path, vocab_size=512), dtype="auto")
    assert engine.dtype in (torch.bfloat16, torch.float32)
    assert engine.model.embed_tokens.weight.dtype is engine.dtype
    assert engine.runner.kv_caches[0][0].dtype is engine.dtype
