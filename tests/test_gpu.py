"""Device checks, run on a lent accelerator with `pytest -m gpu` (skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from tests.test_model_parity import engine_logits
from tests.tiny_models import save_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=1024, head_dim=64, num_attention_heads=4, hidden_size=256)


def make(model_dir, backend: str) -> LLMEngine:
    config = EngineConfig(device="cuda", dtype="bfloat16", attention_backend=backend, kv_cache_memory_fraction=0.05, max_model_len=1024)
    return LLMEngine(config, model_dir)


def test_flash_attn_backend_is_picked_on_cuda(model_dir):
    pytest.importorskip("flash_attn")
    assert make(model_dir, "auto").attention_backend == "flash_attn"


def test_flash_attn_and_torch_backends_give_the_same_logits(model_dir):
    pytest.importorskip("flash_attn")
    tokens = torch.randint(0, 1024, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    flash, reference = make(model_dir, "flash_attn"), make(model_dir, "torch")
    for chunk in (300, 100, 1):
        torch.testing.assert_close(engine_logits(flash, tokens, chunk), engine_logits(reference, tokens, chunk), atol=5e-2, rtol=5e-2)


def test_batched_greedy_generation_on_cuda(model_dir):
    engine = make(model_dir, "auto")
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for i in range(16):
        engine.add_request(str(i), list(range(3, 20 + i * 13)), params)
    produced = {str(i): 0 for i in range(16)}
    while engine.has_work():
        for out in engine.step():
            produced[out.request_id] += len(out.new_token_ids)
    assert set(produced.values()) == {16}
    assert engine.block_manager.num_used_blocks == 0
