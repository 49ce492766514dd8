"""A tiny random engine's helpers that several test modules share (no test module
imports another): building one, running requests to the end, prompts, raw logits."""

from __future__ import annotations

import random

import torch

from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence

VOCAB = 512


def make_engine(model_dir, **overrides) -> LLMEngine:
    settings = dict(device="cpu", dtype="float32", kv_cache_memory_gb=0.05, max_model_len=1024)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), model_dir)


def make_cuda_engine(model_dir, **overrides) -> LLMEngine:
    """A bf16 engine on the GPU with CUDA graphs up to batch 32 (the device tests' default)."""
    settings = dict(
        device="cuda",
        dtype="bfloat16",
        attention_backend="torch",
        kv_cache_memory_fraction=0.05,
        max_model_len=1024,
        cuda_graph_max_batch=32,
    )
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), model_dir)


def run_all(
    engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    produced: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_work():
        for out in engine.step():
            produced[out.request_id].extend(out.new_token_ids)
    return produced


def mixed_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(3, VOCAB) for _ in range(rng.choice([3, 17, 64, 130, 301]))]
        for _ in range(count)
    ]


def engine_logits(engine: LLMEngine, token_ids: list[int], chunk: int) -> torch.Tensor:
    """Logits at every position, computing the prompt `chunk` tokens per step."""
    seq = Sequence("parity", token_ids, SamplingParams())
    rows = []
    while seq.num_computed_tokens < seq.num_tokens:
        n = min(chunk, seq.num_uncomputed_tokens)
        assert engine.block_manager.allocate(seq, n)
        hidden, _, _ = engine.runner.forward([(seq, n)])
        rows.append(engine.model.compute_logits(hidden))
        seq.num_computed_tokens += n
    engine.block_manager.release(seq)
    return torch.cat(rows)


def assert_logits_match(
    engine: LLMEngine,
    reference: torch.nn.Module,
    token_ids: list[int],
    chunks: tuple[int, ...],
    label: str | None = None,
) -> None:
    """The engine's logits over `token_ids`, computed `chunk` tokens per step for each of
    `chunks`, equal the fp32 `reference` model's (transformers' own implementation)."""
    with torch.no_grad():
        expected = reference(torch.tensor([token_ids])).logits[0].float()
    for chunk in chunks:
        got = engine_logits(engine, token_ids, chunk)
        where = f"{label}, chunk {chunk}" if label else f"chunk {chunk}"
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4, msg=where)


def decode_batch(
    engine: LLMEngine,
    rng: random.Random,
    rows: int,
    lengths: list[int],
    vocab: int,
    prefix: str,
) -> list[Sequence]:
    """`rows` sequences of random prompts (lengths drawn from `lengths`, tokens below
    `vocab`), each computed eagerly but for its last token: one forward of them all is
    a decode step."""
    seqs = []
    for i in range(rows):
        n = rng.choice(lengths)
        seq = Sequence(
            f"{prefix}{i}", [rng.randrange(3, vocab) for _ in range(n)], SamplingParams()
        )
        seqs.append(computed_but_last(engine, seq))
    return seqs


def computed_but_last(engine: LLMEngine, seq: Sequence) -> Sequence:
    """`seq` with KV blocks for all its tokens, every token but the last computed eagerly."""
    n = seq.num_tokens
    assert engine.block_manager.allocate(seq, n)
    if n > 1:
        engine.runner._forward_eager([(seq, n - 1)])
    seq.num_computed_tokens = n - 1
    return seq


def run_greedy(
    engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]
) -> dict[str, list[int]]:
    """Greedy outputs by request id str(i); unequal max_tokens make the decode batch
    shrink step by step."""
    return run_all(
        engine,
        {
            str(i): (prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
            for i, (prompt, n) in enumerate(zip(prompts, max_tokens))
        },
    )
