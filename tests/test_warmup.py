"""The load-time warm-up (EngineConfig.warmup) leaves no trace: no blocks, no
sequences, no prefix-cache entries, no changed outputs, and no KV written outside
the scratch block. On data/embedded_model, with the engine tests' helpers."""

from __future__ import annotations

import torch

from flashserve.engine.sampling_params import SamplingParams
from tests.chat_harness import EMBEDDED_MODEL
from tests.engine_harness import make_engine, mixed_prompts, run_all


def test_warm_up_leaves_the_engine_empty():
    engine = make_engine(EMBEDDED_MODEL, warmup=True)
    blocks = engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts)
    assert not blocks.cached and not any(h is not None for h in blocks.block_hash)
    assert blocks.prefix_queries == blocks.prefix_hits == 0
    assert not engine.sequences and not engine.has_work()
    assert not engine.scheduler.waiting and not engine.scheduler.running


def test_outputs_are_the_same_with_and_without_warm_up():
    prompts = mixed_prompts(3, seed=5)
    common = dict(max_tokens=16, ignore_eos=True)
    requests = {
        "greedy": (prompts[0], SamplingParams(temperature=0.0, **common)),
        "seeded": (prompts[1], SamplingParams(top_p=0.9, top_k=50, seed=7, **common)),
        # Unseeded: the same only because the warm-up restores the global RNG.
        "unseeded": (prompts[2], SamplingParams(top_p=0.9, **common)),
    }
    results = []
    for warmup in (False, True):
        torch.manual_seed(1234)
        results.append(run_all(make_engine(EMBEDDED_MODEL, warmup=warmup), requests))
    assert results[0] == results[1]
    assert all(len(tokens) == 16 for tokens in results[0].values())


def test_warm_up_writes_no_kv_block_but_the_scratch_block():
    engine = make_engine(EMBEDDED_MODEL)
    runner = engine.runner
    scratch = runner.scratch_block
    assert scratch == engine.block_manager.num_blocks  # the block after the last one handed out
    generator = torch.Generator().manual_seed(0)
    for cache in runner.kv_caches:
        for tensor in cache:
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    before = [tensor.clone() for cache in runner.kv_caches for tensor in cache]
    done = runner.warm_up(engine.config.max_num_seqs, engine.config.max_num_batched_tokens)
    assert (done.prefill_tokens, done.decode_rows) == (8192, 256)
    after = [tensor for cache in runner.kv_caches for tensor in cache]
    for old, new in zip(before, after):
        assert torch.equal(old[:scratch], new[:scratch])
        assert not torch.equal(old[scratch], new[scratch])  # it did write, there
