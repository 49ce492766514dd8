"""MoE decode under CUDA graphs: what can be checked without a GPU.

On CUDA with bf16 the experts take the grouped-GEMM path, whose shapes depend
only on the number of tokens, so decode steps are captured like a dense
model's. Torch on the CPU has the same grouped GEMM, so here that path runs
for real: it must equal the per-expert path, and generation through the
decode graphs' static inputs (padding rows and all) must equal eager steps.
A model whose experts take the per-expert path (a host-side loop) says why
its decode cannot be captured, and the engine then decodes eagerly.
"""

from __future__ import annotations

import random

import pytest
import torch

from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.layers.moe.experts import (
    GROUPED_MM,
    SORTED,
    StackedExperts,
    grouped_path_problem,
)
from tests.tiny_models import save_tiny_qwen3_moe

VOCAB = 512
needs_grouped_mm = pytest.mark.skipif(
    getattr(torch.nn.functional, "grouped_mm", None) is None
    and getattr(torch, "_grouped_mm", None) is None,
    reason="this torch has no grouped_mm",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"), vocab_size=VOCAB)


def make_engine(model_dir, path: str, graphs: int | None = None) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.05, max_model_len=1024),
        model_dir,
    )
    for experts in engine.model.experts():
        experts.path = path
    if graphs is not None:
        assert engine.runner.enable_decode_graphs(graphs, capture=False)
    return engine


def greedy_outputs(engine: LLMEngine, prompts, max_tokens) -> dict[str, list[int]]:
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=n))
    produced: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            produced[out.request_id].extend(out.new_token_ids)
    return produced


@needs_grouped_mm
def test_grouped_gemm_path_equals_the_per_expert_path():
    torch.manual_seed(0)
    experts = StackedExperts(8, 32, 16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    x = torch.randn(11, 32)
    # Experts 0, 5 and 7 get no token.
    ids = torch.tensor([[1, 2], [2, 3], [4, 6], [6, 1], [3, 2]] * 2 + [[6, 4]])
    weights = torch.rand(11, 2)
    results = {}
    for path in (SORTED, GROUPED_MM):
        experts.path = path
        with torch.no_grad():
            results[path] = experts(x, weights, ids)
    torch.testing.assert_close(results[GROUPED_MM], results[SORTED], atol=1e-5, rtol=1e-5)


@needs_grouped_mm
def test_the_load_time_probe_runs_the_grouped_forward_pass():
    # On CUDA this probe decides the path; torch's CPU grouped_mm lets it run here.
    assert grouped_path_problem(torch.device("cpu"), torch.bfloat16, 64, 32) is None
    # Rows that are not 16-byte aligned are what the kernel refuses.
    assert "grouped_mm failed" in grouped_path_problem(torch.device("cpu"), torch.bfloat16, 60, 30)


def test_per_expert_path_names_why_decode_runs_eagerly(model_dir):
    engine = make_engine(model_dir, SORTED)
    problem = engine.model.decode_graph_problem
    assert problem is not None and "per active expert" in problem
    for experts in engine.model.experts():
        experts.path = GROUPED_MM
    assert engine.model.decode_graph_problem is None


def test_cpu_chooses_the_per_expert_path(model_dir):
    engine = make_engine(model_dir, SORTED)
    engine.model.init_buffers(torch.device("cpu"))
    assert {e.path for e in engine.model.experts()} == {SORTED}


@needs_grouped_mm
def test_decode_through_static_inputs_equals_eager(model_dir):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 17, 64, 130, 9, 40)]
    max_tokens = [4, 10, 6, 8, 3, 9]
    eager = greedy_outputs(make_engine(model_dir, SORTED), prompts, max_tokens)
    engine = make_engine(model_dir, GROUPED_MM, graphs=8)
    assert greedy_outputs(engine, prompts, max_tokens) == eager
    assert engine.runner.graphs.runs > 0
    assert engine.block_manager.num_used_blocks == 0
