"""Roofline of a W1 engine step: FLOPs, bytes, time, and the share of the matmul rate.

    python bench/roofline.py [--dtype auto] [--threads 2] [--requests 64]
                             [--prompt-len 128] [--decode-steps 16] [--reps 3]

Per phase (a prefill step of requests x prompt_len fresh tokens; a decode step
of `requests` rows at W1's contexts) it reports:
- FLOPs: matrix products (every linear layer of the decoder at the step's token
  count, lm_head at the sampled rows only) and attention (QK^T and PV: causal
  within each prompt; each decode row over its context);
- bytes: weights read once, KV written (new tokens) and read (attention),
  hidden states in and out of every linear;
- the step's measured wall time; the "matmul time": the same products run alone
  (the engine's own linear path, cpu_linear.linear: the CPU kernels, else F.linear,
  on the model's own weights and the step's row counts), timed
  in the same run, interleaved with the steps so both see the same machine;
- achieved GFLOP/s = all FLOPs / step wall, and its share of the matmul rate
  (= matmul FLOPs / matmul time at the phase's shapes); wall / matmul time.
Decode is also run with the paged decode kernel off (the gather + SDPA path),
alternating with it on, to show what attention costs either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODEL, machine, make_engine, today  # noqa: E402
from step_ab import CHANGES  # noqa: E402
from w1 import Workload  # noqa: E402


@dataclass
class Phase:
    name: str
    tokens: int  # rows through the decoder's linears
    sampled: int  # rows through lm_head
    attention_flops: float
    kv_bytes: float  # KV read + written
    wall: list[float]
    matmul: list[float]


def _linears(model):
    """(decoder weights, lm_head weight) of the engine's model."""
    import torch

    from flashserve.layers.linear import PackedLinear, RowParallelLinear

    # The packed (q|k|v, gate|up) and row-parallel (o, down) layers are not nn.Linear:
    # leaving them out undercounts the decoder's products (by a third for each kind).
    linear = (torch.nn.Linear, PackedLinear, RowParallelLinear)
    decoder = [m.weight for m in model.layers.modules() if isinstance(m, linear)]
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return decoder, head


def _time_matmuls(decoder, head, rows: int, sampled: int) -> float:
    """Seconds for one step's products: each decoder weight at `rows`, lm_head at `sampled`."""
    import torch

    from flashserve.layers.cpu_linear import linear

    dtype = head.dtype
    inputs = {}
    for w in [*decoder, head]:
        n = sampled if w is head else rows
        inputs.setdefault((n, w.shape[1]), torch.randn(n, w.shape[1], dtype=dtype))
    with torch.inference_mode():
        started = time.perf_counter()
        for w in decoder:
            linear(inputs[(rows, w.shape[1])], w)
        linear(inputs[(sampled, head.shape[1])], head)
        return time.perf_counter() - started


def _matmul_flops(decoder, head, rows: int, sampled: int) -> float:
    return 2 * rows * sum(w.numel() for w in decoder) + 2 * sampled * head.numel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16, help="per variant")
    parser.add_argument("--reps", type=int, default=3, help="prefill steps")
    args = parser.parse_args(argv)

    from flashserve.engine.sampling_params import SamplingParams

    engine = make_engine(args.model, dtype=args.dtype, cpu_threads=args.threads)
    cfg = engine.model_config
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    work = Workload(args.prompt_len, vocab, 0, 0.8, 0.95, -1)
    decoder, head = _linears(engine.model)
    itemsize = head.element_size()
    n, length = args.requests, args.prompt_len
    kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize  # K and V
    attn_unit = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # QK^T + PV, per pair

    def add(tag: str, max_tokens: int) -> list[str]:
        ids = []
        for i, prompt in enumerate(work.fresh_prompts(n)):
            ids.append(f"{tag}-{i}")
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.8, top_p=0.95, ignore_eos=True
            )
            engine.add_request(ids[-1], prompt, params)
        return ids

    def timed(step) -> float:
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    add("warm", 3)
    while engine.has_work():
        engine.step()
    _time_matmuls(decoder, head, n * length, n)

    prefill = Phase(
        "prefill",
        n * length,
        n,
        attn_unit * n * length * (length + 1) / 2,
        n * length * kv_token * 2,  # written, then read by the chunk's own attention
        [],
        [],
    )
    for rep in range(args.reps):
        ids = add(f"prefill-{rep}", 2)
        prefill.matmul.append(_time_matmuls(decoder, head, n * length, n))
        prefill.wall.append(timed(engine.step))
        for rid in ids:
            engine.abort(rid)

    add("decode", 10**6)
    engine.step()
    # Contexts run from length + 1 on; the phase's figures use the middle one.
    middle = length + args.decode_steps
    decode_phases = {
        label: Phase(
            f"decode ({label})", n, n, attn_unit * n * middle, n * (middle + 1) * kv_token, [], []
        )
        for label in ("paged kernel", "gather + SDPA")
    }
    off = CHANGES["decode_kernel"]
    for i in range(2 * args.decode_steps):
        label = ("paged kernel", "gather + SDPA")[(i + i // 2) % 2]
        phase = decode_phases[label]
        phase.matmul.append(_time_matmuls(decoder, head, n, n))
        if label == "paged kernel":
            phase.wall.append(timed(engine.step))
        else:
            with off(engine):
                phase.wall.append(timed(engine.step))

    weight_bytes = sum(w.numel() for w in decoder) * itemsize + head.numel() * itemsize
    print(
        f"{today()}  {machine()}\n{engine.dtype}, {args.threads} threads; prefill: {n} x {length} "
        f"tokens (median of {args.reps}); decode: {n} rows at contexts {length + 1}.."
        f"{length + 2 * args.decode_steps} (medians of {args.decode_steps} steps per variant, "
        f"alternating); matmul time: the step's products alone, interleaved with the steps\n"
    )
    print(
        "| phase | matmul GFLOP | attention GFLOP | MB moved | FLOP/byte | step ms | matmul ms "
        "| matmul GFLOP/s | achieved GFLOP/s | share of matmul rate | wall / matmul |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase in [prefill, *decode_phases.values()]:
        mm_flops = _matmul_flops(decoder, head, phase.tokens, phase.sampled)
        flops = mm_flops + phase.attention_flops
        hidden_io = 0
        for w in decoder:
            hidden_io += phase.tokens * (w.shape[0] + w.shape[1]) * itemsize
        moved = weight_bytes + phase.kv_bytes + hidden_io
        wall, mm = statistics.median(phase.wall), statistics.median(phase.matmul)
        rate = mm_flops / mm
        print(
            f"| {phase.name} | {mm_flops / 1e9:.1f} | {phase.attention_flops / 1e9:.2f} "
            f"| {moved / 1e6:.0f} | {flops / moved:.0f} | {wall * 1e3:.1f} | {mm * 1e3:.1f} "
            f"| {rate / 1e9:.0f} | {flops / wall / 1e9:.0f} | {flops / wall / rate:.0%} "
            f"| {wall / mm:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
