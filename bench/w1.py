"""Workload W1 (bench/throughput.py): its shape, its result rows, and this engine's run."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from _common import make_engine, measured, neighbour, random_prompts


@dataclass
class Result:
    system: str
    dtype: str
    concurrency: int
    output_tokens: int
    wall_s: float
    others_cpu: float
    note: str = ""
    # CPU seconds the measured system's own process(es) used during the run, and for
    # the server, what its load generator (the clients, in this process) used while
    # the clock ran: together they bound what the machine's cores allow.
    cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s


@dataclass
class Workload:
    prompt_len: int
    vocab_size: int
    output_len: int
    temperature: float
    top_p: float
    top_k: int
    # Shared by the copies `shorter` makes, so no two draws anywhere repeat a seed.
    seeds: Iterator[int] = field(default_factory=itertools.count)

    def fresh_prompts(self, count: int) -> list[list[int]]:
        """Random prompts no earlier try has sent.

        flashserve and vLLM both cache prompt prefixes by default: a try that
        repeated an earlier try's prompts would skip most of its prefill.
        """
        return random_prompts(count, self.prompt_len, self.vocab_size, seed=next(self.seeds))

    def shorter(self, output_len: int) -> Workload:
        """The same workload with fewer output tokens (warm-ups)."""
        return dataclasses.replace(self, output_len=output_len)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_engine(engine: Any, work: Workload, count: int) -> tuple[int, float]:
    from flashserve.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=work.output_len,
        temperature=work.temperature,
        top_p=work.top_p,
        top_k=work.top_k,
        ignore_eos=True,
    )
    prompts = work.fresh_prompts(count)
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"w1-{count}-{i}-{started}", prompt, params)
    tokens = 0
    while engine.has_work():
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    return tokens, time.perf_counter() - started


def bench_engine(
    args: argparse.Namespace, dtype: str, work: Workload, sizes: list[int]
) -> list[Result]:
    engine = make_engine(args.model, dtype=dtype, cpu_threads=args.threads)
    run_engine(engine, work.shorter(8), 2)  # warm-up
    name = str(engine.dtype).removeprefix("torch.")
    results = []
    for size in sizes:

        def run(n: int = size) -> tuple[int, float, float]:
            # Started after the gate's wait for an idle machine, which it would spoil.
            with neighbour(args.neighbour):
                cpu = cpu_seconds()
                tokens, wall = run_engine(engine, work, n)
                return tokens, wall, cpu_seconds() - cpu

        (tokens, wall, cpu), others = measured(run, args.gate, lambda v: v[1])
        note = f"dtype={dtype}" + (f", neighbour {args.neighbour:.0%}" if args.neighbour else "")
        results.append(Result("engine", name, size, tokens, wall, others, note, cpu_s=cpu))
        print_row(results[-1])
    return results


def print_row(r: Result) -> None:
    print(
        f"  {r.system:<10} {r.dtype:<9} c={r.concurrency:<3} {r.output_tokens:>6} tok "
        f"{r.wall_s:8.2f} s {r.tok_s:8.1f} tok/s  others_cpu {r.others_cpu:5.1%}  {r.note}",
        flush=True,
    )
