"""Chunking of streams: `stream_interval` and the merging of outputs a slow consumer missed.

Neither may change what is generated: the tokens, the text and the finish are
the same as with one token per chunk; only how many chunks carry them changes.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from flashserve.engine.async_engine import AsyncEngine, RequestTimeoutError
from flashserve.engine.sampling_params import SamplingParams
from tests.chat_harness import body, call, make_service, streamed_content
from tests.engine_harness import make_engine, mixed_prompts
from tests.tiny_models import save_tiny_llama

PARAMS = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=512)


def collect(engine: AsyncEngine, prompts: list[list[int]], pause_s: float = 0.0):
    """Each request's outputs as (token ids, finished); `pause_s` blocks the loop per output."""

    async def one(i: int, prompt: list[int]) -> list[tuple[list[int], bool]]:
        outputs = []
        async for out in engine.generate(f"r{i}", prompt, PARAMS):
            outputs.append((out.new_token_ids, out.finished))
            time.sleep(pause_s)  # a consumer with no time to spare: the whole loop stalls
        return outputs

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    engine.start()
    try:
        results = asyncio.run(main())
        assert engine.engine.block_manager.num_used_blocks == 0
        return results
    finally:
        engine.shutdown()


def tokens_of(outputs: list[tuple[list[int], bool]]) -> list[int]:
    return [t for ids, _ in outputs for t in ids]


def test_stream_interval_gathers_tokens_without_changing_them(model_dir):
    prompts = mixed_prompts(6, seed=11)
    every = collect(AsyncEngine(make_engine(model_dir), stream_interval=1), prompts)
    gathered = collect(AsyncEngine(make_engine(model_dir), stream_interval=4), prompts)
    for one_by_one, by_four in zip(every, gathered):
        assert tokens_of(by_four) == tokens_of(one_by_one)
        # A token a chunk, except where the engine thread got ahead of the event loop
        # (a fast CPU with a tiny model does): then outputs merge, as for any consumer
        # that falls behind (the next test). Never gathered as stream_interval 4 gathers.
        sizes_every = [len(ids) for ids, _ in one_by_one]
        assert sizes_every[0] == 1 and len(one_by_one) > len(by_four), sizes_every
        sizes = [len(ids) for ids, _ in by_four]
        # The first token at once (unless the loop fell behind and it merged with the next
        # chunks, as a CI run under load saw: 1 + 4 + 4); then at least 4 per chunk; the
        # rest with the finish.
        assert (sizes[0] == 1 or sizes[0] >= 5) and all(n >= 4 for n in sizes[1:-1]), sizes
        assert [done for _, done in by_four] == [False] * (len(by_four) - 1) + [True]
        assert len(by_four) <= 1 + 30 // 4 + 1


def test_a_consumer_that_falls_behind_gets_the_missed_outputs_as_one(model_dir):
    prompts = mixed_prompts(4, seed=12)
    reference = collect(AsyncEngine(make_engine(model_dir), stream_interval=1), prompts)
    slow = collect(AsyncEngine(make_engine(model_dir), stream_interval=1), prompts, pause_s=0.05)
    for fast, lagging in zip(reference, slow):
        assert tokens_of(lagging) == tokens_of(fast)
        assert len(lagging) < len(fast)  # outputs were merged while the loop was blocked
        assert [done for _, done in lagging][-1] and not any(d for _, d in lagging[:-1])


def test_a_deadline_behind_merged_outputs_still_ends_the_request(model_dir):
    engine = AsyncEngine(make_engine(model_dir), stream_interval=1)
    long = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)

    async def main() -> list[list[int]]:
        received: list[list[int]] = []
        deadline = time.monotonic() + 0.1
        with pytest.raises(RequestTimeoutError):
            async for out in engine.generate("late", list(range(3, 40)), long, deadline):
                received.append(out.new_token_ids)
                # Past the deadline, with outputs queued before the timeout and after it.
                time.sleep(0.25)
        await asyncio.sleep(0.3)  # the abort reaches the engine thread
        return received

    engine.start()
    try:
        received = asyncio.run(main())
        # Whatever was queued before the timeout arrives as one output, then it raises.
        assert 1 <= len(received) <= 2
        assert engine.engine.block_manager.num_used_blocks == 0
        assert engine.num_in_flight == 0
    finally:
        engine.shutdown()


def test_stream_interval_must_be_positive(model_dir):
    with pytest.raises(ValueError, match="stream_interval"):
        AsyncEngine(make_engine(model_dir), stream_interval=0)


def test_chat_stream_with_an_interval_has_the_same_text_in_fewer_chunks():
    request = body(max_tokens=24, stream=True, stream_options={"include_usage": True})
    plain = make_service()
    gathered = make_service(stream_interval=6)
    try:
        every, fewer = call(plain, request), call(gathered, request)
        whole = call(gathered, body(max_tokens=24))
    finally:
        plain.frontend.engine.shutdown()
        gathered.frontend.engine.shutdown()
    assert streamed_content(fewer) == streamed_content(every)
    assert streamed_content(fewer) == whole["choices"][0]["message"]["content"]
    # Chunks with choices: the role, then the tokens (first alone, then 6 at a time).
    with_choices = [e for e in fewer if isinstance(e, dict) and e.get("choices")]
    assert len(with_choices) <= 1 + 1 + 24 // 6 + 1
    assert fewer[-2]["usage"]["completion_tokens"] == every[-2]["usage"]["completion_tokens"]


def test_gathered_outputs_end_a_stop_string_at_the_same_token():
    """completion_tokens end at the token that completed the stop string, however many
    tokens the output that carried it held (a late consumer gets the same)."""
    plain, gathered = make_service(), make_service(stream_interval=8)
    try:
        hello = plain.frontend.tokenizer.convert_tokens_to_ids("▁Hello")
        forced = body(logit_bias={str(hello): 100}, max_tokens=8, stop=["Hello"])
        for min_tokens in (0, 3):
            one, eight = (
                call(svc, {**forced, "min_tokens": min_tokens}) for svc in (plain, gathered)
            )
            assert eight["choices"][0]["message"] == one["choices"][0]["message"]
            assert one["usage"]["completion_tokens"] == max(min_tokens, 1)
            assert eight["usage"]["completion_tokens"] == max(min_tokens, 1)
        streamed = {**forced, "min_tokens": 2, "stream": True}
        streamed["stream_options"] = {"include_usage": True}
        one, eight = call(plain, streamed), call(gathered, streamed)
        assert streamed_content(eight) == streamed_content(one)
        assert streamed_content(one).strip() == "Hello"
        assert one[-2]["usage"]["completion_tokens"] == 2
        assert eight[-2]["usage"]["completion_tokens"] == 2
    finally:
        plain.frontend.engine.shutdown()
        gathered.frontend.engine.shutdown()
