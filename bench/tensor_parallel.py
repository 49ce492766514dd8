"""W1 at tensor_parallel_size 2 (one thread per rank) against 1 (two threads), in one run.

    python bench/tensor_parallel.py [--model build/bench_model] [--requests 64]
        [--prompt-len 128] [--output-len 128] [--rounds 3] [--dtype auto]

Both engines live in this process (rank 1 of the tp=2 engine is its worker
process) and take turns: a W1 batch on tp=1, then on tp=2, `--rounds` times,
each batch with fresh prompts (no prefix-cache hits). Reported per engine:
output tok/s (median round), wall time per engine step, and for tp=2 the
time rank 0 spends inside collectives per step (all-reduces and the logits
gather of the model, and the step-input broadcast), measured by timing the
torch.distributed calls this benchmark wraps; that includes waiting for the
other rank, so it is communication plus imbalance. The ratio tp=2 / tp=1 is
the figure the issue sets at >= 0.8x on a 2-core CPU (tp cannot win there).

On a GPU node (--device cuda) the same comparison runs tp=1 on one GPU
against tp=N (--tp N) over N GPUs (bench/gpu.sh's tensor-parallel mode).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODEL, ContentionMeter, machine, make_engine, today  # noqa: E402
from w1 import Workload, run_engine  # noqa: E402


class CollectiveClock:
    """Seconds this process spends in torch.distributed collectives (while installed)."""

    NAMES = ("all_reduce", "gather", "broadcast")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.seconds = 0.0
        self.calls = 0
        self._saved = {name: getattr(dist, name) for name in self.NAMES}

    def install(self) -> None:
        for name, original in self._saved.items():
            setattr(self.dist, name, self._timed(original))

    def _timed(self, original):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        return call

    def uninstall(self) -> None:
        for name, original in self._saved.items():
            setattr(self.dist, name, original)


def one_round(engine, work: Workload, count: int, clock: CollectiveClock | None) -> dict:
    steps_before = engine.steps
    comm_before = clock.seconds if clock else 0.0
    calls_before = clock.calls if clock else 0
    meter = ContentionMeter()
    meter.start()
    tokens, wall = run_engine(engine, work, count)
    others = meter.stop()
    steps = engine.steps - steps_before
    return {
        "tok_s": tokens / wall,
        "step_ms": 1000 * wall / max(steps, 1),
        "comm_ms": 1000 * ((clock.seconds if clock else 0.0) - comm_before) / max(steps, 1),
        "steps": steps,
        "calls": ((clock.calls if clock else 0) - calls_before) / max(steps, 1),
        "others": others,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the tp=1 engine")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run bench/make_bench_model.py first")
    cpu = args.device == "cpu"
    common = dict(dtype=args.dtype, device=args.device, max_num_seqs=args.requests)
    if cpu:
        common["kv_cache_memory_gb"] = 2.0
    else:  # both engines share GPU 0: each takes a third of what is free when it starts
        common["kv_cache_memory_fraction"] = 0.3
    single = make_engine(args.model, cpu_threads=args.threads if cpu else None, **common)
    split = make_engine(
        args.model,
        tensor_parallel_size=args.tp,
        cpu_threads=max(1, args.threads // args.tp) if cpu else None,
        **common,
    )
    work = Workload(args.prompt_len, single.model_config.vocab_size, args.output_len, 0.8, 0.95, 0)
    clock = CollectiveClock()
    clock.install()
    try:
        run_engine(single, work.shorter(8), 4)  # warm-ups
        run_engine(split, work.shorter(8), 4)
        rounds: dict[str, list[dict]] = {"tp1": [], f"tp{args.tp}": []}
        for i in range(args.rounds):
            rounds["tp1"].append(one_round(single, work, args.requests, None))
            rounds[f"tp{args.tp}"].append(one_round(split, work, args.requests, clock))
            print(
                f"  round {i + 1}: tp1 {rounds['tp1'][-1]['tok_s']:.1f} tok/s, "
                f"tp{args.tp} {rounds[f'tp{args.tp}'][-1]['tok_s']:.1f} tok/s",
                flush=True,
            )
    finally:
        clock.uninstall()
        split.close()
    print(
        f"W1 tensor parallel, {today()}, {machine()}, {args.model.name} "
        f"({single.dtype}), {args.requests} x ({args.prompt_len} + {args.output_len}) tokens, "
        f"T 0.8 top_p 0.95, {args.rounds} rounds alternating"
    )
    medians = {}
    for name, results in rounds.items():
        best = sorted(results, key=lambda r: r["tok_s"])[(len(results) - 1) // 2]
        medians[name] = best
        threads = args.threads if name == "tp1" else max(1, args.threads // args.tp)
        print(
            f"  {name} ({threads} thread{'s' if threads > 1 else ''}/rank): "
            f"{best['tok_s']:8.1f} tok/s  {best['step_ms']:6.1f} ms/step  "
            f"collectives {best['comm_ms']:5.2f} ms/step ({best['calls']:.0f} calls)  "
            f"({best['steps']} steps, "
            f"others {max(r['others'] for r in results):.0%} of the CPUs at most)"
        )
        print("     rounds tok/s: " + ", ".join(f"{r['tok_s']:.1f}" for r in results))
    ratio = medians[f"tp{args.tp}"]["tok_s"] / medians["tp1"]["tok_s"]
    comm = statistics.median(r["comm_ms"] / r["step_ms"] for r in rounds[f"tp{args.tp}"])
    print(f"  tp{args.tp} / tp1 = {ratio:.2f}x; collectives take {comm:.0%} of a tp{args.tp} step")


if __name__ == "__main__":
    main()
