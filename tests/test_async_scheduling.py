"""Async scheduling (step n+1 launched before step n's tokens reach the host) changes no output.

Every case runs the same requests with the overlap on and off and compares tokens,
finish reasons and logprobs; on the CPU both run the same code, only in another order.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.async_scheduling import PENDING_TOKEN, overlap_enabled
from flashserve.engine.disaggregation import CONTEXT_ONLY, DisaggregatedRequest
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from tests.engine_harness import VOCAB, make_engine, mixed_prompts
from tests.structured_catalogue import schema_format
from tests.structured_harness import assert_all_valid, prompt
from tests.tiny_models import save_tiny_llama

pytest_plugins = ["tests.tokenizer_fixtures", "tests.structured_harness"]

Requests = dict[str, tuple[list[int], SamplingParams]]
FORTY_BLOCKS_GB = 40 * 2 * 2 * 16 * 2 * 16 * 4 / (1 << 30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=VOCAB)


def run(engine: LLMEngine, requests: Requests, abort_at: dict[str, int] | None = None) -> dict:
    """Per request: (tokens, finish_reason, stop_reason, logprobs); `abort_at` aborts a
    request once it has that many tokens. Also checks the engine ends clean."""
    for rid, (prompt_ids, params) in requests.items():
        engine.add_request(rid, prompt_ids, params)
    got: dict[str, list] = {rid: [[], None, None, []] for rid in requests}
    while engine.has_work():
        for out in engine.step():
            entry = got[out.request_id]
            assert entry[1] is None, f"{out.request_id}: output after its end"
            entry[0].extend(out.new_token_ids)
            entry[3].extend((lp.token_id, lp.logprob) for lp in out.logprobs or [])
            if out.finished:
                entry[1], entry[2] = out.finish_reason, out.stop_reason
        for rid, count in (abort_at or {}).items():
            if len(got[rid][0]) >= count and got[rid][1] is None:
                engine.abort(rid)
                got[rid][1] = "aborted"
    if not engine.contexts:  # parked contexts keep theirs
        assert engine.block_manager.num_used_blocks == 0
    assert not engine.sequences
    return {rid: tuple(map(tuple, (v[0], v[3]))) + (v[1], v[2]) for rid, v in got.items()}


def both(model_dir, requests: Requests, overlaps: bool = True, **settings) -> tuple[dict, dict]:
    off = run(make_engine(model_dir, async_scheduling=False, **settings), requests)
    engine = make_engine(model_dir, async_scheduling=True, **settings)
    on = run(engine, requests)
    assert (engine.overlapped_steps > 0) == overlaps
    return off, on


def greedy(max_tokens: int = 24, **fields) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **fields)


def test_the_setting():
    import torch

    assert overlap_enabled("auto", torch.device("cuda")) is True
    assert overlap_enabled("auto", torch.device("cpu")) is False
    assert overlap_enabled(True, torch.device("cpu")) is True
    with pytest.raises(ValueError, match="async_scheduling"):
        overlap_enabled("yes", torch.device("cpu"))


def test_greedy_mixed_batch_with_chunked_prefill(model_dir):
    requests = {f"r{i}": (p, greedy()) for i, p in enumerate(mixed_prompts(12, seed=3))}
    off, on = both(model_dir, requests, max_num_batched_tokens=96)
    assert on == off
    assert all(len(v[0]) == 24 and v[2] == "length" for v in on.values())


def test_seeded_sampling_and_logprobs(model_dir):
    prompts = mixed_prompts(10, seed=4)
    requests: Requests = {}
    for i, p in enumerate(prompts):
        requests[f"s{i}"] = (
            p,
            SamplingParams(
                temperature=0.8,
                top_p=0.9,
                top_k=(0, 40)[i % 2],
                seed=100 + i,
                max_tokens=20,
                ignore_eos=True,
                logprobs=i % 3 == 0,
                top_logprobs=2,
            ),
        )
    off, on = both(model_dir, requests, max_num_batched_tokens=128)
    assert on == off
    assert on["s0"][1] and len(on["s0"][1]) == 20


def test_max_tokens_exact_and_stop_tokens(model_dir):
    prompts = mixed_prompts(8, seed=5)
    # Stop tokens that greedy decoding writes part-way: the 4th token of each output.
    probe = run(make_engine(model_dir), {f"r{i}": (p, greedy(12)) for i, p in enumerate(prompts)})
    requests: Requests = {}
    for i, p in enumerate(prompts):
        if i % 2:
            requests[f"r{i}"] = (p, greedy((1, 2, 5, 17)[i % 4]))
        else:
            stop = probe[f"r{i}"][0][3]
            requests[f"r{i}"] = (p, greedy(30, stop_token_ids=(stop,)))
    off, on = both(model_dir, requests)
    assert on == off
    for i in range(8):
        tokens, _, finish, stop_reason = on[f"r{i}"]
        if i % 2:
            assert len(tokens) == (1, 2, 5, 17)[i % 4] and finish == "length"
        else:
            assert finish == "stop" and tokens[-1] == stop_reason and len(tokens) <= 4


def test_eos_and_min_tokens(model_dir):
    prompts = mixed_prompts(6, seed=6)
    probe = run(make_engine(model_dir), {f"r{i}": (p, greedy(8)) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        eos = probe[f"r{i}"][0][2]  # so greedy decoding ends by its 3rd token (min_tokens aside)
        params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=(0, 6)[i % 2])
        got = [
            run(
                LLMEngine(
                    make_engine(model_dir).config.replace(async_scheduling=overlap),
                    model_dir,
                    eos_token_ids=(eos,),
                ),
                {"x": (p, params)},
            )["x"]
            for overlap in (False, True)
        ]
        assert got[1] == got[0]
        tokens, _, finish, _ = got[1]
        if not params.min_tokens:
            assert finish == "stop" and tokens[-1] == eos and len(tokens) <= 3
        else:
            assert len(tokens) >= 6


def test_preemption(model_dir):
    requests = {f"r{i}": (p, greedy(40)) for i, p in enumerate(mixed_prompts(8, seed=1))}
    settings = dict(kv_cache_memory_gb=FORTY_BLOCKS_GB, enable_prefix_caching=False)
    off = run(make_engine(model_dir, async_scheduling=False, **settings), requests)
    engine = make_engine(model_dir, async_scheduling=True, **settings)
    assert run(engine, requests) == off
    assert engine.scheduler.total_preemptions > 0
    assert engine.overlapped_steps > 0


def test_prefix_cache_hits_and_penalties(model_dir):
    shared = list(range(10, 200))
    requests: Requests = {
        "a": (shared + [5], greedy()),
        "b": (shared + [6], greedy(repetition_penalty=1.3)),
        "c": (shared + [7], greedy(frequency_penalty=0.5, presence_penalty=0.2)),
        "d": (shared + [8], greedy(bad_sequences=((11, 12),), bad_token_ids=(13,))),
    }
    # Rows with penalties or bad sequences read their tokens: every step waits.
    off, on = both(model_dir, requests, overlaps=False)
    assert on == off
    engine = make_engine(model_dir, async_scheduling=True)
    first = run(engine, {"a": requests["a"]})
    hits = engine.block_manager.prefix_hits
    assert run(engine, {"again": requests["a"]})["again"] == first["a"]
    assert engine.block_manager.prefix_hits > hits


def test_abort_in_flight(model_dir):
    prompts = mixed_prompts(6, seed=8)
    requests = {f"r{i}": (p, greedy(30)) for i, p in enumerate(prompts)}
    abort_at = {"r1": 3, "r4": 10}
    off = run(make_engine(model_dir, async_scheduling=False), requests, abort_at)
    on = run(make_engine(model_dir, async_scheduling=True), requests, abort_at)
    for rid in requests:
        if rid in abort_at:
            # Aborted between steps: with the overlap one more step may have been emitted.
            assert on[rid][0][: abort_at[rid]] == off[rid][0][: abort_at[rid]]
            assert len(on[rid][0]) <= abort_at[rid] + 2
        else:
            assert on[rid] == off[rid]
    engine = make_engine(model_dir, async_scheduling=True)
    engine.add_request("x", list(range(3, 100)), greedy(100))
    engine.step()
    engine.step()
    assert engine.abort("x")
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_work()
    assert engine.step() == []


def test_context_only_parks_after_its_one_token(model_dir):
    params = SamplingParams(
        temperature=0.0, max_tokens=8, disaggregated=DisaggregatedRequest(CONTEXT_ONLY)
    )
    rng = random.Random(7)
    requests = {f"c{i}": ([rng.randrange(3, VOCAB) for _ in range(150)], params) for i in range(3)}
    requests["plain"] = (list(range(3, 60)), greedy(12))
    off, on = both(model_dir, requests)
    assert on == off
    assert all(len(on[f"c{i}"][0]) == 1 for i in range(3))


def test_pending_tokens_are_filled_on_the_device(model_dir):
    """Mid-run, the sequences sampled by the launched step hold PENDING_TOKEN."""
    engine = make_engine(model_dir, async_scheduling=True)
    engine.add_request("x", list(range(3, 40)), greedy(10))
    engine.step()  # prefill launched: its draw is pending
    seq = engine.sequences["x"]
    assert seq.token_ids[-1] == PENDING_TOKEN
    first = engine.step()  # decode launched with the pending token as input; prefill finished
    assert [out.new_token_ids for out in first] == [[seq.token_ids[-2]]]
    assert seq.token_ids[-1] == PENDING_TOKEN


def test_grammar_rows_wait_and_stay_valid(sp):
    nested = sp.grammar(schema_format("nested"))
    requests: Requests = {
        f"json{i}": (
            prompt(3000 + i),
            SamplingParams(temperature=0.0, max_tokens=200, grammar=nested),
        )
        for i in range(3)
    }
    for i in range(3):
        requests[f"plain{i}"] = (prompt(4000 + i), greedy(24))
    off = sp.run(requests, sp.engine(async_scheduling=False))
    engine = sp.engine(async_scheduling=True)
    on = sp.run(requests, engine)
    assert on == off
    # Steps launched while only unconstrained rows were pending (after the grammars end).
    assert engine.overlapped_steps < engine.steps
    assert_all_valid(sp, {f"schema:nested:{rid}": on[rid] for rid in on if rid.startswith("json")})


def test_async_engine_streams_the_same_tokens(model_dir):
    prompts = mixed_prompts(6, seed=9)

    async def collect(engine: LLMEngine) -> list[list[int]]:
        runner = AsyncEngine(engine)
        runner.start()
        try:

            async def one(i: int, p: list[int]) -> list[int]:
                tokens = []
                async for out in runner.generate(f"r{i}", p, greedy(16)):
                    tokens.extend(out.new_token_ids)
                return tokens

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            runner.shutdown()

    off = asyncio.run(collect(make_engine(model_dir, async_scheduling=False)))
    on_engine = make_engine(model_dir, async_scheduling=True)
    assert asyncio.run(collect(on_engine)) == off
    assert on_engine.block_manager.num_used_blocks == 0


def test_a_consumer_that_leaves_early_aborts_with_the_overlap_on(model_dir):
    """A stream closed early (a stop string, a disconnect) aborts its request while a
    step is in flight; the others' tokens do not change and every block comes back."""
    prompts = mixed_prompts(4, seed=10)

    async def collect(engine: LLMEngine) -> list[list[int]]:
        runner = AsyncEngine(engine)
        runner.start()
        try:

            async def one(i: int, p: list[int]) -> list[int]:
                tokens: list[int] = []
                stream = runner.generate(f"r{i}", p, greedy(20))
                async for out in stream:
                    tokens.extend(out.new_token_ids)
                    if i % 2 and len(tokens) >= 3:
                        break  # leaves: the generator's close aborts the request
                await stream.aclose()
                return tokens

            got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            for _ in range(200):  # the abort is handled on the engine's next turn
                if not engine.has_work() and engine.block_manager.num_used_blocks == 0:
                    break
                await asyncio.sleep(0.01)
            return got
        finally:
            runner.shutdown()

    off = asyncio.run(collect(make_engine(model_dir, async_scheduling=False)))
    on_engine = make_engine(model_dir, async_scheduling=True)
    on = asyncio.run(collect(on_engine))
    for i in range(4):
        if i % 2:
            assert on[i][:3] == off[i][:3]
        else:
            assert on[i] == off[i] and len(on[i]) == 20
    assert on_engine.block_manager.num_used_blocks == 0
    assert not on_engine.sequences
