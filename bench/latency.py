"""W2, latency under a steady arrival rate: TTFT and inter-token latency percentiles.

    python bench/latency.py [--rate 2] [--requests 48] [--arrival poisson|fixed]
        [--prompt-len 128] [--output-len 128] [--dtype auto] [--threads N]

Requests (random prompt tokens, ignore_eos, T=0.8, top_p=0.95, top_k=50) arrive
at --rate per second, as a Poisson process (seeded) or at a fixed interval, into
an AsyncEngine running in this process (the engine thread the server uses, minus
HTTP). Reported: TTFT (arrival to first token) and ITL (gap between a request's
consecutive tokens) p50/p99, plus the throughput reached.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_MODEL,
    machine,
    make_engine,
    measured,
    parse_args_with_gate,
    percentile,
    random_prompts,
    today,
)


async def drive(engine, prompts: list[list[int]], gaps: list[float], output_len: int) -> dict:
    from flashserve.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=output_len, temperature=0.8, top_p=0.95, top_k=50, ignore_eos=True
    )
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    tokens_seen = [0] * len(prompts)

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal tokens
        arrived = last = time.perf_counter()
        async for out in engine.generate(f"w2-{i}", prompt, params):
            now = time.perf_counter()
            if not tokens_seen[i]:
                ttft.append(now - arrived)
            else:
                itl.append(now - last)
            tokens_seen[i] += len(out.new_token_ids)
            tokens += len(out.new_token_ids)
            last = now

    tasks = []
    started = time.perf_counter()
    for i, (prompt, gap) in enumerate(zip(prompts, gaps)):
        await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(i, prompt)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    return {"ttft": ttft, "itl": itl, "tokens": tokens, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parse_args_with_gate(parser, argv)

    from flashserve.engine.async_engine import AsyncEngine

    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    seeds = itertools.count(2)

    def fresh_prompts() -> list[list[int]]:
        # Never sent before: a repeated prompt would be served from the prefix cache.
        return random_prompts(args.requests, args.prompt_len, vocab, seed=next(seeds))

    rng = random.Random(3)
    gaps = [
        rng.expovariate(args.rate) if args.arrival == "poisson" else 1.0 / args.rate
        for _ in range(args.requests)
    ]
    gaps[0] = 0.0
    llm = make_engine(args.model, dtype=args.dtype, cpu_threads=args.threads)
    engine = AsyncEngine(llm)
    engine.start()
    try:
        asyncio.run(drive(engine, fresh_prompts()[:2], [0.0, 0.0], 8))  # warm-up
        result, others = measured(
            lambda: asyncio.run(drive(engine, fresh_prompts(), gaps, args.output_len)), args.gate
        )
    finally:
        engine.shutdown()
    ttft, itl = result["ttft"], result["itl"]
    print(
        f"W2 {today()} on {machine()}\ncommand: python bench/latency.py "
        f"{' '.join(argv or sys.argv[1:])}\nengine dtype {llm.dtype}, {args.requests} requests, "
        f"{args.arrival} arrivals at {args.rate}/s, {args.prompt_len} prompt + "
        f"{args.output_len} output tokens\n"
        f"| TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | output tok/s | others_cpu |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {percentile(ttft, 50) * 1e3:.0f} ms | {percentile(ttft, 99) * 1e3:.0f} ms "
        f"| {percentile(itl, 50) * 1e3:.1f} ms | {percentile(itl, 99) * 1e3:.1f} ms "
        f"| {result['tokens'] / result['wall_s']:.1f} | {others:.1%} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
