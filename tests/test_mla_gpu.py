"""MLA on a lent accelerator (`pytest -m gpu`; skipped elsewhere): a bf16 decode step
replayed from a CUDA graph gives the eager step's logits (or the log says why not)."""

from __future__ import annotations

import pytest
import torch

from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence
from tests.deepseek_models import VOCAB, save_random_deepseek

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def make(model_dir, cuda_graphs: bool) -> LLMEngine:
    settings = dict(
        device="cuda",
        dtype="bfloat16",
        kv_cache_memory_fraction=0.05,
        max_model_len=512,
        cuda_graphs=cuda_graphs,
        cuda_graph_max_batch=8,
    )
    return LLMEngine(EngineConfig(**settings), model_dir)


def test_graph_decode_equals_eager(tmp_path, caplog):
    save_random_deepseek(tmp_path, seed=2, hidden_size=128, moe_intermediate_size=64)
    with caplog.at_level("INFO"):
        engine = make(tmp_path, cuda_graphs=True)
    if engine.model.decode_graph_problem is not None:
        # Experts without grouped_mm: the engine says why it decodes eagerly.
        assert "cuda_graphs: off, decode steps run eagerly" in caplog.text
        pytest.skip(engine.model.decode_graph_problem)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.captured
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i, n in enumerate((1, 9, 40, 130, 300)):
        seq = Sequence(
            f"s{i}", torch.randint(2, VOCAB, (n,), generator=gen).tolist(), SamplingParams()
        )
        assert engine.block_manager.allocate(seq, n)
        if n > 1:
            engine.runner.forward([(seq, n - 1)])
        seq.num_computed_tokens = n - 1
        seqs.append(seq)
    items = [(seq, 1) for seq in seqs]
    hidden, _, _ = engine.runner.forward(items)
    assert graphs.replays == 1
    engine.runner.use_graphs = False
    eager, _, _ = engine.runner.forward(items)
    torch.testing.assert_close(
        engine.model.compute_logits(hidden),
        engine.model.compute_logits(eager),
        rtol=2e-2,
        atol=2e-2,
    )
