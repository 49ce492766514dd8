"""Workload W1 (bench/throughput.py): its shape, its result rows, and this engine's run."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from _common import make_engine, measured, neighbour


@dataclass
class Result:
    system: str
    dtype: str
    concurrency: int
    output_tokens: int
    wall_s: float
    others_cpu: float
    note: str = ""

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s


@dataclass
class Workload:
    prompts: list[list[int]]
    output_len: int
    temperature: float
    top_p: float
    top_k: int


def run_engine(engine: Any, work: Workload, count: int) -> tuple[int, float]:
    from flashserve.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=work.output_len,
        temperature=work.temperature,
        top_p=work.top_p,
        top_k=work.top_k,
        ignore_eos=True,
    )
    started = time.perf_counter()
    for i, prompt in enumerate(work.prompts[:count]):
        engine.add_request(f"w1-{count}-{i}-{started}", prompt, params)
    tokens = 0
    while engine.has_work():
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    return tokens, time.perf_counter() - started


def bench_engine(
    args: argparse.Namespace, dtype: str, work: Workload, sizes: list[int]
) -> list[Result]:
    engine = make_engine(args.model, dtype=dtype, cpu_threads=args.threads)
    run_engine(engine, Workload(work.prompts[:2], 8, 0.8, 0.95, 50), 2)  # warm-up
    name = str(engine.dtype).removeprefix("torch.")
    results = []
    for size in sizes:

        def run(n: int = size) -> tuple[int, float]:
            # Started after the gate's wait for an idle machine, which it would spoil.
            with neighbour(args.neighbour):
                return run_engine(engine, work, n)

        (tokens, wall), others = measured(run, args.gate, lambda v: v[1])
        note = f"dtype={dtype}" + (f", neighbour {args.neighbour:.0%}" if args.neighbour else "")
        results.append(Result("engine", name, size, tokens, wall, others, note))
        print_row(results[-1])
    return results


def print_row(r: Result) -> None:
    print(
        f"  {r.system:<10} {r.dtype:<9} c={r.concurrency:<3} {r.output_tokens:>6} tok "
        f"{r.wall_s:8.2f} s {r.tok_s:8.1f} tok/s  others_cpu {r.others_cpu:5.1%}  {r.note}",
        flush=True,
    )
