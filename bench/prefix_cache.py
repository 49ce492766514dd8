"""W3, prefix reuse: TTFT of requests sharing a long system prompt, prefix caching on vs off.

    python bench/prefix_cache.py [--requests 32] [--shared-len 2000] [--suffix-len 32]
        [--dtype auto] [--threads N]

Every request is the same --shared-len-token "system prompt" followed by its own
--suffix-len random tokens, asking for --output-len tokens. One request warms the
cache first (it is the same in both settings), then two patterns are timed with
EngineConfig.enable_prefix_caching true and false:

- sequential: one request at a time; TTFT is the pure prefill latency.
- burst:      all requests submitted at once; TTFT per request counts the queue.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_MODEL,
    FIRST_ORDINARY_TOKEN,
    machine,
    make_engine,
    measured,
    parse_args_with_gate,
    percentile,
    today,
)


def ttfts(engine, prompts: list[list[int]], output_len: int, burst: bool) -> list[float]:
    """Seconds from submission to first token, per request."""
    from flashserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    out: list[float] = []
    groups = [prompts] if burst else [[p] for p in prompts]
    for group in groups:
        started = time.perf_counter()
        ids = {f"w3-{started}-{i}" for i in range(len(group))}
        for rid, prompt in zip(sorted(ids), group):
            engine.add_request(rid, prompt, params)
        waiting = set(ids)
        while engine.has_work():
            for o in engine.step():
                if o.request_id in waiting:
                    waiting.discard(o.request_id)
                    out.append(time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--shared-len", type=int, default=2000)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parse_args_with_gate(parser, argv)

    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    rng = random.Random(4)
    shared = [rng.randrange(FIRST_ORDINARY_TOKEN, vocab) for _ in range(args.shared_len)]

    def fresh(count: int) -> list[list[int]]:
        # New suffixes every time: only the shared prefix may ever be found in the cache.
        return [
            shared + [rng.randrange(FIRST_ORDINARY_TOKEN, vocab) for _ in range(args.suffix_len)]
            for _ in range(count)
        ]

    rows = []
    mean = {}
    for caching in (True, False):
        engine = make_engine(
            args.model, dtype=args.dtype, cpu_threads=args.threads, enable_prefix_caching=caching
        )
        ttfts(engine, fresh(1), args.output_len, burst=False)  # warm-up, fills the cache
        for burst in (False, True):
            before = engine.stats()
            times, others = measured(
                lambda b=burst, e=engine: ttfts(e, fresh(args.requests), args.output_len, b),
                args.gate,
            )
            stats = engine.stats()
            hits = stats.prefix_hits - before.prefix_hits
            queries = stats.prefix_queries - before.prefix_queries
            mode = "burst" if burst else "sequential"
            mean[(caching, burst)] = sum(times) / len(times)
            rows.append(
                f"| {'on' if caching else 'off'} | {mode} | {mean[(caching, burst)] * 1e3:.0f} ms "
                f"| {percentile(times, 50) * 1e3:.0f} ms | {percentile(times, 99) * 1e3:.0f} ms "
                f"| {hits}/{queries} | {others:.1%} |"
            )
        dtype = engine.dtype
        del engine
    print(
        f"W3 {today()} on {machine()}\ncommand: python bench/prefix_cache.py "
        f"{' '.join(argv or sys.argv[1:])}\nengine dtype {dtype}, {args.requests} requests of "
        f"{args.shared_len} shared + {args.suffix_len} own prompt tokens\n"
        "| prefix caching | arrival | TTFT mean | p50 | p99 | cached blocks/reusable (all tries) | others_cpu |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    for burst, mode in ((False, "sequential"), (True, "burst")):
        ratio = mean[(False, burst)] / mean[(True, burst)]
        print(f"{mode}: mean TTFT with caching is {ratio:.1f}x better than without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
