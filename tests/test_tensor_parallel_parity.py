"""Tensor parallel on the CPU: two ranks (gloo, one thread each) give tp=1's logits and tokens.

Each architecture's tiny fp32 checkpoint is served by an engine at
tensor_parallel_size 2 (rank 0 here, rank 1 a worker process) and one at 1:
logits at every position (whole prompt, chunked, token by token) agree within
2e-4, and a mixed batch decodes to the same greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence
from tests.engine_harness import make_engine, mixed_prompts, run_greedy
from tests.tensor_parallel_support import MODELS, ONE_THREAD, two_ranks


def every_position_logits(engine: LLMEngine, token_ids: list[int], chunk: int) -> torch.Tensor:
    """Logits at every position, `chunk` tokens per step (the other rank joins each step)."""
    seq = Sequence("parity", token_ids, SamplingParams())
    rows = []
    while seq.num_computed_tokens < seq.num_tokens:
        n = min(chunk, seq.num_uncomputed_tokens)
        assert engine.block_manager.allocate(seq, n)
        hidden, _, _ = engine.runner.forward([(seq, n)], every_row_logits=True)
        rows.append(engine.runner.logits(hidden, list(range(n))))
        seq.num_computed_tokens += n
    engine.block_manager.release(seq)
    return torch.cat(rows)


@pytest.fixture(scope="module", params=sorted(MODELS))
def engines(request, tmp_path_factory):
    folder = MODELS[request.param](tmp_path_factory.mktemp(request.param) / "model")
    single = make_engine(folder, **ONE_THREAD)
    split = make_engine(folder, **two_ranks(), **ONE_THREAD)
    yield single, split
    split.close()


def test_logits_at_tp2_equal_tp1_whole_and_chunked(engines) -> None:
    single, split = engines
    tokens = mixed_prompts(1, seed=3)[0][:90]
    for chunk in (len(tokens), 17, 1):
        expected = every_position_logits(single, tokens, chunk)
        got = every_position_logits(split, tokens, chunk)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4, msg=f"chunk {chunk}")


def test_greedy_tokens_at_tp2_equal_tp1(engines) -> None:
    single, split = engines
    prompts = mixed_prompts(6, seed=1)
    lengths = [12, 4, 9, 16, 1, 7]
    assert run_greedy(split, prompts, lengths) == run_greedy(single, prompts, lengths)
