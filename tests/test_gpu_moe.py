"""MoE device checks, run on a lent accelerator with `pytest -m gpu` (skipped elsewhere).

In bf16 on a GPU whose torch has grouped_mm the experts take the grouped-GEMM path
and decode steps replay CUDA graphs; replayed logits match eager ones, and the
grouped path's logits match the per-expert path's.
"""

from __future__ import annotations

import random

import pytest
import torch

from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.layers.moe.experts import GROUPED_MM, SORTED
from tests.engine_harness import decode_batch, engine_logits, make_cuda_engine
from tests.tiny_models import save_tiny_qwen3_moe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen3_moe(
        tmp_path_factory.mktemp("tiny-qwen3-moe"),
        vocab_size=VOCAB,
        hidden_size=256,
        head_dim=64,
        moe_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=4,
    )


def grouped_engine(model_dir) -> LLMEngine:
    engine = make_cuda_engine(model_dir)
    paths = {(e.path, e.path_reason) for e in engine.model.experts()}
    if {path for path, _ in paths} != {GROUPED_MM}:
        pytest.skip(f"experts run {paths}")
    return engine


def test_grouped_experts_capture_decode_graphs(model_dir):
    engine = grouped_engine(model_dir)
    assert engine.model.decode_graph_problem is None
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.captured
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i in range(9):
        engine.add_request(str(i), list(range(3, 20 + i * 37)), params)
    while engine.has_work():
        engine.step()
    assert graphs.replays == 11
    assert engine.block_manager.num_used_blocks == 0


def test_replayed_moe_decode_matches_eager(model_dir):
    engine = grouped_engine(model_dir)
    runner = engine.runner
    rng = random.Random(2)
    seqs = decode_batch(engine, rng, 13, [1, 16, 17, 200, 513], VOCAB, "s")
    items = [(s, 1) for s in seqs]
    hidden, _, _ = runner.forward(items)
    replayed = runner.model.compute_logits(hidden)
    runner.use_graphs = False
    eager = runner.model.compute_logits(runner.forward(items)[0])
    runner.use_graphs = True
    torch.testing.assert_close(replayed, eager, atol=5e-2, rtol=5e-2)
    assert (replayed.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9


def test_grouped_and_per_expert_paths_agree(model_dir):
    engine = grouped_engine(model_dir)
    tokens = torch.randint(3, VOCAB, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    grouped = engine_logits(engine, tokens, 150)
    for experts in engine.model.experts():
        experts.path = SORTED
    per_expert = engine_logits(engine, tokens, 150)
    torch.testing.assert_close(grouped, per_expert, atol=5e-2, rtol=5e-2)
