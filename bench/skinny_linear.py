"""Linear layers of a few rows on the CPU: the compiled kernel against torch's F.linear, one run.

    python bench/skinny_linear.py [--threads N] [--rows 1,2,4,5,8,16,32,64]

Shapes of a 1B Llama (hidden 2048: q|k|v 3072, gate|up 16384, lm_head 128256 rows)
and of the 59M bench model (hidden 512). For each row count: wall ms of
`skinny_gemm.linear` (layers/csrc/skinny_gemm.c) and of F.linear, and the ratio.
It shows where the kernel's MAX_ROWS should sit.
"""

from __future__ import annotations

import argparse
import sys

from _common import machine, time_ms, today

SHAPES = {
    "1B q|k|v": (3072, 2048),
    "1B gate|up": (16384, 2048),
    "1B lm_head": (128256, 2048),
    "59M gate|up": (2816, 512),
}


def _pair(x, weight) -> tuple[float, float]:
    import torch.nn.functional as F

    from flashserve.layers import skinny_gemm

    reps = max(3, int(2e8 // weight.numel()))
    return (
        time_ms(lambda: skinny_gemm.linear(x, weight), reps),
        time_ms(lambda: F.linear(x, weight), reps),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", default="1,2,4,5,8,16,32,64")
    args = parser.parse_args(argv)

    import torch

    from flashserve.layers import skinny_gemm

    if args.threads:
        torch.set_num_threads(args.threads)
    skinny_gemm.MAX_ROWS = 1 << 30  # time the kernel at every row count
    print(f"skinny linear on {machine()}, {today()}, {torch.get_num_threads()} threads, float32")
    print(f"{'shape':<14} {'rows':>4} {'kernel':>9} {'F.linear':>9}  ratio")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, (features, k) in SHAPES.items():
            weight = torch.randn(features, k, generator=gen)
            for rows in [int(r) for r in args.rows.split(",")]:
                kernel, torch_ms = _pair(torch.randn(rows, k, generator=gen), weight)
                print(
                    f"{name:<14} {rows:>4} {kernel:>7.2f}ms {torch_ms:>7.2f}ms "
                    f"{torch_ms / kernel:5.2f}x",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
