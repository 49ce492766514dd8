"""Routed experts on the CPU: the compiled short-run kernel against the torch paths, one run.

    python bench/moe_kernel.py [--threads N] [--tokens 1,8,64,128,256,1024] [--dtype float32]

W4's expert shape (32 experts of MLP 384, hidden 512, top-4, random routing).
For each token count: wall ms of one experts forward through the kernel
(layers/csrc/expert_mlp.c) and one GEMM per active expert (the torch path),
and the kernel's speed-up. It shows where
the kernel's MAX_RUN (the longest run it takes) should sit.
"""

from __future__ import annotations

import argparse
import sys

from _common import machine, time_ms, today


def _time_paths(experts, rows, counts: list[int]) -> tuple[float, float]:
    from flashserve.layers.moe import cpu_expert_kernel

    reps = max(3, 1600 // len(rows))
    weights = (experts.gate_up_proj, experts.down_proj)
    return (
        time_ms(lambda: cpu_expert_kernel.expert_mlp(rows, counts, *weights), reps),
        time_ms(lambda: experts._per_expert(rows, counts), reps),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", default="1,8,64,128,256,1024")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-size", type=int, default=384)
    args = parser.parse_args(argv)

    import torch

    from flashserve.layers.moe import StackedExperts, cpu_expert_kernel

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    experts = StackedExperts(args.experts, args.hidden, args.expert_size)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    cpu_expert_kernel.MAX_RUN = 1 << 30  # time the kernel at every run length
    print(
        f"MoE experts on {machine()}, {today()}, {torch.get_num_threads()} threads: "
        f"{args.experts} experts of {args.expert_size}, hidden {args.hidden}, "
        f"top-{args.top_k}, float32"
    )
    print(f"{'tokens':>7} {'longest run':>11} {'kernel':>9} {'per expert':>11}  ratio")
    with torch.inference_mode():
        for tokens in [int(t) for t in args.tokens.split(",")]:
            scores = torch.randn(tokens, args.experts, generator=gen)
            flat = scores.topk(args.top_k, dim=-1).indices.reshape(-1)
            order = torch.argsort(flat, stable=True)
            rows = torch.randn(tokens, args.hidden, generator=gen)[order // args.top_k]
            counts = torch.bincount(flat, minlength=args.experts).tolist()
            kernel, looped = _time_paths(experts, rows, counts)
            print(
                f"{tokens:>7} {max(counts):>11} {kernel:>7.2f}ms "
                f"{looped:>9.2f}ms  {looped / kernel:5.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
