"""fp32 linear layers on the CPU: the packed GEMM kernel against torch's F.linear, one run.

    python bench/packed_gemm.py [--threads N] [--rows 1,4,64,8192]

Shapes of the 59M bench model (hidden 512) and of a 1B Llama (hidden 2048), at each of
`--rows`: a decode step's few rows up to a prefill's (W1's is 64 x 128 = 8,192 tokens).
For each: GFLOP/s of `packed_gemm.linear` (layers/csrc/packed_gemm.c, the weight packed
once beforehand, as in the engine) and of F.linear, measured alternately, and the ratio.
"""

from __future__ import annotations

import argparse
import sys

from _common import machine, time_ms, today

SHAPES = {  # name: (features, k)
    "59M q|k|v": (1024, 512),
    "59M o": (512, 512),
    "59M gate|up": (3072, 512),
    "59M down": (512, 1536),
    "1B q|k|v": (3072, 2048),
    "1B gate|up": (16384, 2048),
    "1B down": (2048, 8192),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", default="1,4,64,8192", help="row counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (best kept)")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from flashserve.layers import packed_gemm

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"packed GEMM on {machine()}, {today()}, {torch.get_num_threads()} threads, float32")
    print(f"{'shape':<12} {'rows':>5} {'kernel GFLOP/s':>15} {'F.linear GFLOP/s':>17}  ratio")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, (features, k) in SHAPES.items():
            weight = torch.randn(features, k, generator=gen)
            packed_gemm.panels(weight)
            for rows in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(rows, k, generator=gen)
                flops = 2 * rows * features * k
                reps = max(1, int(3e8 // flops))
                kernel = torch_ms = float("inf")
                for _ in range(args.rounds):
                    kernel = min(
                        kernel, time_ms(lambda x=x, w=weight: packed_gemm.linear(x, w), reps)
                    )
                    torch_ms = min(torch_ms, time_ms(lambda x=x, w=weight: F.linear(x, w), reps))
                print(
                    f"{name:<12} {rows:>5} {flops / kernel / 1e6:>15.1f} "
                    f"{flops / torch_ms / 1e6:>17.1f}  {torch_ms / kernel:4.2f}x",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
