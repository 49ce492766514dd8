"""Two builds of the sampler's kernel (csrc/vocab_race.c) on W1's batch, same process.

    python bench/vocab_race_ab.py --before REV [--after REV] [--threads 1]
                                  [--rows 64] [--vocab 32768] [--repeats 60]

"before" is the kernel's source at git revision REV, "after" the working tree's (or
--after REV). Both are compiled with native.py's flags into a temporary directory, with
the working tree's headers, and called through engine/vocab_race.py, alternating, on
the same logits and uniforms; 64 MiB are written between calls so that each starts with
cold caches, as in a decode step. The two must give the same tokens (checked). Prints
the medians and their ratio.
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

from flashserve.engine import vocab_race  # noqa: E402
from flashserve.layers import native  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' source")
    parser.add_argument("--after", default=None, help="git revision (default: the worktree)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    native.thread_pool()  # loaded globally first: builds since the pool link against it
    with tempfile.TemporaryDirectory() as scratch:
        builds = [
            kernel_build_at(vocab_race.KERNEL, rev, Path(scratch))
            for rev in (args.before, args.after)
        ]
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(args.rows, args.vocab, generator=g) * 2
        blocks = -(-args.vocab // 256)
        log_block_u = torch.rand(args.rows, blocks, dtype=torch.float64, generator=g).log()
        log_token_u = torch.rand(args.rows, 256, generator=g).log()
        flush = torch.empty(16 << 20)  # 64 MiB
        times: list[list[float]] = [[], []]
        tokens = []
        for rep in range(args.repeats):
            for which in (0, 1) if rep % 2 == 0 else (1, 0):
                vocab_race.KERNEL._library = builds[which]
                flush.fill_(1.0)
                start = time.perf_counter()
                raced = vocab_race.race_over_vocab(logits, log_block_u, log_token_u)
                times[which].append(time.perf_counter() - start)
                if rep == 0:
                    tokens.append(raced.chosen)
        if not torch.equal(tokens[0], tokens[1]):
            print("the two builds draw different tokens")
            return 1
    before, after = (statistics.median(t) * 1e3 for t in times)
    print(
        f"vocab_race.c {args.before} -> {args.after or 'worktree'}: {args.rows} x {args.vocab}, "
        f"{args.threads} threads, {args.repeats} each: before {before:.3f} ms, "
        f"after {after:.3f} ms, {before / after:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
