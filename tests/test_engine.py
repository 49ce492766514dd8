"""Continuous batching, chunked prefill, preemption and prefix reuse keep outputs exact."""

from __future__ import annotations

import asyncio
import random

import pytest

from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.layers import onednn_linear
from tests.engine_harness import VOCAB, make_engine, mixed_prompts, run_all
from tests.tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=VOCAB)


def greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_greedy_alone_equals_inside_a_mixed_batch_of_16(model_dir):
    prompts = mixed_prompts(16)
    alone = {}
    for i, prompt in enumerate(prompts):
        alone.update(run_all(make_engine(model_dir), {f"r{i}": (prompt, greedy())}))
    # A small token budget forces chunked prefills to share steps with decodes.
    engine = make_engine(model_dir, max_num_batched_tokens=96)
    together = run_all(engine, {f"r{i}": (p, greedy()) for i, p in enumerate(prompts)})
    assert together == alone
    assert all(len(tokens) == 24 for tokens in together.values())
    assert engine.block_manager.num_used_blocks == 0


def test_preempted_sequences_resume_with_the_same_output(model_dir):
    prompts = mixed_prompts(8, seed=1)
    params = greedy(max_tokens=40)
    expected = {}
    for i, prompt in enumerate(prompts):
        expected.update(run_all(make_engine(model_dir), {f"r{i}": (prompt, params)}))
    # 40 blocks of 16 tokens cannot hold 8 sequences of up to 341 tokens at once.
    engine = make_engine(
        model_dir,
        kv_cache_memory_gb=40 * 2 * 2 * 16 * 2 * 16 * 4 / (1 << 30),
        enable_prefix_caching=False,
    )
    assert engine.block_manager.num_blocks == 40
    got = run_all(engine, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    assert engine.scheduler.total_preemptions > 0
    assert got == expected
    assert engine.block_manager.num_used_blocks == 0


def _tokens_and_logprobs(engine, requests) -> dict[str, list[tuple[int, float]]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    produced: dict[str, list[tuple[int, float]]] = {rid: [] for rid in requests}
    while engine.has_work():
        for out in engine.step():
            logprobs = [entry.logprob for entry in out.logprobs]
            produced[out.request_id].extend(zip(out.new_token_ids, logprobs, strict=True))
    return produced


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_seeded_stream_has_the_same_logprob_bits_in_any_batch_and_after_preemption(
    model_dir, dtype
):
    """Every position's logits are the same bits whether it was a decode row, a row of a
    prompt chunk of any length (a recomputation after preemption starts from the whole
    text so far) or alone: so seeded sampling gives the same tokens under any load."""
    if dtype == "bfloat16" and not onednn_linear.SUPPORTED:
        pytest.skip("bf16 products here are torch's F.linear, not promised row-invariant")
    prompts = mixed_prompts(12, seed=3)

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=24, seed=i, logprobs=True, ignore_eos=True)

    alone = {}
    for i, prompt in enumerate(prompts):
        engine = make_engine(model_dir, dtype=dtype)
        alone.update(_tokens_and_logprobs(engine, {f"r{i}": (prompt, params(i))}))
    # 40 blocks (2 layers x K,V x 16 tokens x 2 heads x 16 dims) cannot hold them all:
    # preemptions; and a budget of 96 tokens a step chunks the prompts.
    element_bytes = 4 if dtype == "float32" else 2
    engine = make_engine(
        model_dir,
        dtype=dtype,
        kv_cache_memory_gb=40 * 2 * 2 * 16 * 2 * 16 * element_bytes / (1 << 30),
        max_num_batched_tokens=96,
        enable_prefix_caching=False,
    )
    assert engine.block_manager.num_blocks == 40
    requests = {f"r{i}": (p, params(i)) for i, p in enumerate(prompts)}
    together = _tokens_and_logprobs(engine, requests)
    assert engine.scheduler.total_preemptions > 0
    assert together == alone
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_cache_reuses_blocks_and_keeps_output(model_dir):
    engine = make_engine(model_dir)
    prompt = mixed_prompts(1, seed=2)[0] + list(range(10, 200))
    first = run_all(engine, {"a": (prompt, greedy())})["a"]
    engine.add_request("b", prompt, greedy())
    outputs = []
    while engine.has_work():
        outputs.extend(engine.step())
    assert outputs[0].num_cached_tokens >= (len(prompt) - 1) // 16 * 16 - 16
    assert [t for o in outputs for t in o.new_token_ids] == first


def test_blocks_filled_while_decoding_are_published_for_reuse(model_dir):
    """Each step publishes the blocks that became full (not the whole context again): a
    request repeating another's prompt and output finds every full block of it cached."""
    engine = make_engine(model_dir)
    prompt = list(range(3, 23))
    output = run_all(engine, {"a": (prompt, greedy(max_tokens=90))})["a"]
    seen = prompt + output  # the last token's KV was never computed
    engine.add_request("b", seen, greedy(max_tokens=1))
    outputs = []
    while engine.has_work():
        outputs.extend(engine.step())
    assert outputs[0].num_cached_tokens == (len(seen) - 1) // 16 * 16 == 96


def test_abort_frees_blocks(model_dir):
    engine = make_engine(model_dir, enable_prefix_caching=False)
    engine.add_request("x", list(range(3, 100)), greedy(max_tokens=100))
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort("x")
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_work()


def test_stop_token_and_max_tokens_finish_reasons(model_dir):
    engine = make_engine(model_dir)
    tokens = run_all(engine, {"a": (list(range(3, 40)), greedy(max_tokens=10))})["a"]
    stop_at = tokens[4]
    engine.add_request(
        "b",
        list(range(3, 40)),
        SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=(stop_at,), ignore_eos=True),
    )
    outs = []
    while engine.has_work():
        outs.extend(engine.step())
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop_at
    assert [o.new_token_ids[0] for o in outs] == tokens[: tokens.index(stop_at) + 1]
    engine.add_request("c", list(range(3, 40)), greedy(max_tokens=3))
    outs = []
    while engine.has_work():
        outs.extend(engine.step())
    assert len(outs) == 3 and outs[-1].finish_reason == "length"


def test_seeded_sampling_is_independent_of_the_batch(model_dir):
    params = SamplingParams(temperature=1.0, top_k=-1, seed=1234, max_tokens=30, ignore_eos=True)
    prompt = list(range(5, 60))
    alone = run_all(make_engine(model_dir), {"s": (prompt, params)})["s"]
    others = {
        f"o{i}": (p, SamplingParams(temperature=0.9, top_p=0.8, max_tokens=30, ignore_eos=True))
        for i, p in enumerate(mixed_prompts(32, seed=3))
    }
    together = run_all(make_engine(model_dir), {"s": (prompt, params), **others})["s"]
    assert together == alone


def test_async_engine_serves_concurrent_requests_and_aborts(model_dir):
    engine = AsyncEngine(make_engine(model_dir, enable_prefix_caching=False))
    engine.start()

    async def consume(rid, prompt, limit=None):
        tokens = []
        async for out in engine.generate(rid, prompt, greedy()):
            tokens.extend(out.new_token_ids)
            if limit and len(tokens) >= limit:
                break  # leaving early must abort the request
        return tokens[:limit]  # a late consumer may take several outputs as one

    async def main():
        prompts = mixed_prompts(8, seed=4)
        results = await asyncio.gather(
            *(consume(f"q{i}", p, limit=5 if i % 2 else None) for i, p in enumerate(prompts))
        )
        await asyncio.sleep(0.3)
        return results

    try:
        results = asyncio.run(main())
        assert [len(r) for r in results] == [24, 5] * 4
        assert engine.engine.block_manager.num_used_blocks == 0
        assert engine.num_in_flight == 0
    finally:
        engine.shutdown()


def test_parked_contexts_give_their_blocks_back_when_nothing_else_can(model_dir):
    from flashserve.engine.disaggregation import CONTEXT_ONLY, DisaggregatedRequest

    forty_blocks = 40 * 2 * 2 * 16 * 2 * 16 * 4 / (1 << 30)
    engine = make_engine(model_dir, kv_cache_memory_gb=forty_blocks, enable_prefix_caching=False)
    context = SamplingParams(
        temperature=0.0, max_tokens=8, disaggregated=DisaggregatedRequest(CONTEXT_ONLY)
    )
    rng = random.Random(7)
    parked = {f"c{i}": ([rng.randrange(3, VOCAB) for _ in range(150)], context) for i in range(3)}
    run_all(engine, parked)
    assert len(engine.contexts) == 3
    assert engine.block_manager.num_used_blocks == 30  # 10 blocks of 16 a context
    # 300 tokens need 19 blocks; 10 are free: the oldest parked contexts must go.
    big = {"big": (list(range(3, 203)), greedy(max_tokens=100))}
    steps_before = engine.steps
    got = run_all(engine, big)
    assert got == run_all(make_engine(model_dir), big)
    assert engine.steps - steps_before <= 101  # no step waited for a parked context's TTL
    assert len(engine.contexts) == 2  # one eviction was enough (its 10 blocks + the 10 free)
    assert engine.block_manager.num_used_blocks == 20
