"""Before/after of the issue-6 engine changes on W1, in one process (re-creates the old paths).

    python bench/engine_ab.py [--dtype bfloat16,float32] [--wait-quiet 300]

"before" swaps back in, for the duration of its run, what the engine did before
those changes: a full-vocabulary sort and noise for every sampled row (the top-k
candidate path and the radix-select truncation switched off) and decode attention over k_cache[tables] with
SDPA's enable_gqa. Everything else is today's code, so the difference is those
two changes alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODEL, Gate, make_engine, measured  # noqa: E402
from w1 import Workload, run_engine  # noqa: E402


def _old_decode(q, k_cache, v_cache, meta, scale):
    import torch
    import torch.nn.functional as F

    n = q.shape[0]
    blocks = -(-meta.max_context_len // k_cache.shape[1])
    tables = meta.block_tables[:n, :blocks]
    kv_heads, head_dim = k_cache.shape[-2:]
    keys = k_cache[tables].view(n, -1, kv_heads, head_dim).transpose(1, 2)
    values = v_cache[tables].view(n, -1, kv_heads, head_dim).transpose(1, 2)
    mask = torch.arange(keys.shape[2])[None, :] < meta.context_lens[:n, None]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2).to(keys.dtype), keys, values,
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out.squeeze(2).to(q.dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16,float32")
    parser.add_argument("--wait-quiet", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)

    from flashserve.engine import sampler
    from flashserve.layers import attention

    new_decode, new_limit = attention.TorchAttention._decode, sampler.CANDIDATE_TOP_K_LIMIT
    new_vocab_draw = sampler._draw_from_vocab
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    work = Workload(128, vocab, 128, 0.8, 0.95, 50)
    gate = Gate(args.wait_quiet, 0.05, 4, args.repeat)
    print("| dtype | before tok/s | after tok/s | speed-up |\n|---|---|---|---|")
    for dtype in args.dtype.split(","):
        engine = make_engine(args.model, dtype=dtype)
        rates = {}
        for label, decode, limit in (("before", _old_decode, 0), ("after", new_decode, new_limit)):
            attention.TorchAttention._decode = staticmethod(decode)
            sampler.CANDIDATE_TOP_K_LIMIT = limit
            # The old whole-vocabulary draw: a sort and exponential_ (kept for accelerators).
            sampler._draw_from_vocab = new_vocab_draw if limit else sampler._draw_by_sort
            run_engine(engine, work.shorter(4), 2)  # warm-up
            (tokens, wall), _ = measured(
                lambda e=engine: run_engine(e, work, 64), gate, lambda v: v[1]
            )
            rates[label] = tokens / wall
        attention.TorchAttention._decode = new_decode
        sampler.CANDIDATE_TOP_K_LIMIT = new_limit
        sampler._draw_from_vocab = new_vocab_draw
        before, after = rates["before"], rates["after"]
        print(f"| {dtype} | {before:.0f} | {after:.0f} | {after / before:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
