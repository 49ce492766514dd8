"""Where a W1 engine step spends its time: torch profiler tables for prefill and decode.

    python bench/profile_engine.py [--requests 64] [--threads 1] [--dtype auto] [--rows 25] [--top-k -1]

Times are CPU time of this process (time.process_time), which a busy shared
machine distorts far less than wall time does; with --threads 1 the sum over
ops is the step's cost. For a flame graph of the Python side instead:
    py-spy record -o build/w1.svg -- python bench/profile_engine.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODEL, make_engine, random_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=40, help="decode steps to time")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--top-k", type=int, default=50, help="-1: top_p alone (W1 as worded)")
    parser.add_argument("--no-profiler", action="store_true", help="only the step timings")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import profile

    from flashserve.engine.sampling_params import SamplingParams

    engine = make_engine(args.model, dtype=args.dtype, cpu_threads=args.threads)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    params = SamplingParams(
        max_tokens=10_000, temperature=0.8, top_p=0.95, top_k=args.top_k, ignore_eos=True
    )
    for i, prompt in enumerate(random_prompts(args.requests, args.prompt_len, vocab)):
        engine.add_request(f"p{i}", prompt, params)

    def timed_step() -> float:
        started = time.process_time()
        engine.step()
        return time.process_time() - started

    prefill = timed_step()
    for _ in range(3):  # warm-up decodes
        timed_step()
    decode = [timed_step() for _ in range(args.decode_steps)]
    mean = sum(decode) / len(decode)
    print(
        f"threads={torch.get_num_threads()} dtype={engine.dtype}: prefill step "
        f"{prefill * 1e3:.0f} ms CPU ({args.requests * args.prompt_len} tokens), decode step "
        f"{mean * 1e3:.1f} ms CPU ({args.requests} tokens) -> "
        f"{args.requests / mean * args.threads:.0f} tok/s per {args.threads} busy threads"
    )
    if args.no_profiler:
        return 0
    with profile() as prof:
        for _ in range(10):
            engine.step()
    print("decode, 10 steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
