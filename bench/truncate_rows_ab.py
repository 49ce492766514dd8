"""kept_probs with its truncation in csrc/truncate_rows.c against the torch passes
(truncation._truncate_probs), same process.

    python bench/truncate_rows_ab.py [--repeats 40]

Shapes: 3 x 32768 (the unsure rows of a W1 decode step), 64 x 32768 and 3 x 151936;
at 1 and 2 threads. W1's settings: temperature 0.8, top_p 0.95, no top-k or min-p;
logits an LLM-like row (a few likely tokens over a normal tail). Kernel and torch
calls alternate on the same logits; both must keep the same tokens (checked up to the
rows whose nucleus ends within float32 rounding of a token, which the float32 sums of
the torch passes may end one token apart). Prints medians of process time and wall
time per call, in ms, and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "packages"))

import torch  # noqa: E402

from flashserve.engine import truncation  # noqa: E402
from flashserve.engine.sampling_params import SamplingParams  # noqa: E402


def _logits(rows: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=g) * 2.0
    likely = torch.randint(vocab, (rows, 8), generator=g)
    logits.scatter_add_(1, likely, torch.full((rows, 8), 10.0))
    return logits / 0.8


def _time(kernel: bool, logits, params, top_p) -> tuple[float, float, torch.Tensor]:
    truncation.truncate_kernel_enabled = kernel
    cpu, wall = time.process_time(), time.perf_counter()
    kept = truncation.kept_probs(logits, params, top_p)
    return time.process_time() - cpu, time.perf_counter() - wall, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows, vocab in ((3, 32768), (64, 32768), (3, 151936)):
            logits = _logits(rows, vocab)
            params = [SamplingParams(temperature=0.8, top_p=0.95)] * rows
            top_p = [0.95] * rows
            times: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
            for rep in range(args.repeats + 3):
                kept = {}
                for kernel in (True, False) if rep % 2 else (False, True):
                    cpu, wall, kept[kernel] = _time(kernel, logits, params, top_p)
                    if rep >= 3:
                        times[kernel][0].append(cpu * 1e3)
                        times[kernel][1].append(wall * 1e3)
                apart = ((kept[True] > 0).sum(1) - (kept[False] > 0).sum(1)).abs()
                assert int(apart.max()) <= 1, "kernel and torch keep other tokens"
            k_cpu, k_wall = (statistics.median(t) for t in times[True])
            t_cpu, t_wall = (statistics.median(t) for t in times[False])
            print(
                f"threads {threads}  {rows:3d} x {vocab:6d}  "
                f"cpu ms: kernel {k_cpu:7.3f} torch {t_cpu:7.3f} ({t_cpu / k_cpu:5.1f}x)  "
                f"wall ms: kernel {k_wall:7.3f} torch {t_wall:7.3f} ({t_wall / k_wall:5.1f}x)",
                flush=True,
            )
    truncation.truncate_kernel_enabled = True


if __name__ == "__main__":
    main()
