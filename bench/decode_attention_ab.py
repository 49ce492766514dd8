"""Two builds of the CPU paged decode attention kernel (csrc/paged_decode.c) on W1's shape.

    python bench/decode_attention_ab.py --before REV [--after REV] [--threads 1]
                                        [--rows 64] [--repeats 40] [--warm]
                                        [--q-heads 8] [--kv-heads 4] [--head-dim 64]

"before" is the kernel's source at git revision REV (or a .c file: REV a path), "after"
the working tree's (or --after REV). Both are compiled with native.py's flags into a temporary directory, with
the working tree's headers, and called through layers/cpu_decode_attention.py,
alternating, on the same inputs: one layer of a W1 decode step (64 rows, contexts drawn
from 128..256, block 16, each row's blocks scattered over the cache), in fp32 and bf16.
Unless --warm, 64 MiB are read between calls so that each reads the KV cache from
memory, as in a decode step (the other layers and the weights have evicted it); --warm
--rows 4 times the arithmetic alone (the rows' cache fits in L2). Times are CPU time
(time.process_time) of the call, Python wrapper included (about 17 us); prints the
medians, their ratio, and the largest difference between the two builds' outputs.

    python bench/decode_attention_ab.py --before b35b713             # W1, cold caches
    python bench/decode_attention_ab.py --before b35b713 --warm --rows 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import kernel_build_at  # noqa: E402

from flashserve.layers import cpu_decode_attention, native  # noqa: E402

BLOCK = 16


def _inputs(rows: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(128, 257, (rows,), generator=g)
    width = -(-int(contexts.max()) // BLOCK)
    blocks = rows * width
    shape = (blocks, BLOCK, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    tables = torch.randperm(blocks, generator=g).to(torch.int32).view(rows, width)
    q = torch.randn((rows, q_heads, head_dim), generator=g).to(dtype)
    return q, k_cache, v_cache, tables, contexts.to(torch.int32), int(contexts.max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' source")
    parser.add_argument("--after", default=None, help="git revision (default: the worktree)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warm", action="store_true", help="no cache flush between calls")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    native.thread_pool()  # loaded globally first: builds since the pool link against it
    flush = torch.ones(16 << 20)  # 64 MiB, read (as the weights are) between calls
    with tempfile.TemporaryDirectory() as scratch:
        builds = [
            kernel_build_at(cpu_decode_attention.KERNELS, rev, Path(scratch))
            for rev in (args.before, args.after)
        ]
        for dtype in (torch.float32, torch.bfloat16):
            q, k_cache, v_cache, tables, lens, longest = _inputs(
                args.rows, args.q_heads, args.kv_heads, args.head_dim, dtype
            )
            scale = args.head_dim**-0.5
            times: list[list[float]] = [[], []]
            outputs: list[torch.Tensor] = []
            for rep in range(args.repeats):
                for which in (0, 1) if rep % 2 == 0 else (1, 0):
                    cpu_decode_attention.KERNELS._library = builds[which]
                    if not args.warm:
                        flush.sum()
                    start = time.process_time()
                    out = cpu_decode_attention.paged_decode(
                        q, k_cache, v_cache, tables, lens, scale, longest
                    )
                    times[which].append(time.process_time() - start)
                    if rep == 0:
                        outputs.append(out)
            before, after = (statistics.median(t) * 1e3 for t in times)
            diff = (outputs[0].float() - outputs[1].float()).abs().max().item()
            print(
                f"paged_decode.c {args.before} -> {args.after or 'worktree'}: {dtype}, "
                f"{args.rows} rows, {args.q_heads}/{args.kv_heads} heads x {args.head_dim}, "
                f"{'warm' if args.warm else 'cold'}, {args.threads} threads, "
                f"{args.repeats} each: before {before:.3f} ms, after {after:.3f} ms, "
                f"{before / after:.2f}x (max |diff| {diff:.2e})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
