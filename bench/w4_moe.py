"""W4: a small Qwen3-MoE-shaped model under W1's load; this engine vs batched transformers
`generate` vs vLLM CPU, in one run, as ratios; and the MoE layer's step time vs a dense
MLP with the same active parameters.

    python bench/w4_moe.py [--model build/w4_model] [--dtype auto] [--threads N]
        [--install-vllm] [--wait-quiet 30] [--attempts 3]

The model (written on first use, random bf16 weights from a fixed seed): 8 layers,
hidden 512, 8 heads of 64 (4 KV heads), 32 experts of MLP 384, top-4 renormalised,
vocab 32768 (the embedded model's tokenizer is copied beside it), untied lm_head:
~190M parameters, ~44M active per token. It is saved by transformers'
save_pretrained, so it holds per-expert tensors as hub checkpoints do.
Load: 64 requests x 128 random prompt tokens x 128 output tokens, ignore_eos,
temperature 0.8, top_p 0.95, top_k 50 (W1's). vLLM is skipped, with its own error
message, when it cannot run this architecture on this CPU. Targets (issue 12):
engine >= 3x vLLM CPU and >= 2x batched transformers; MoE layer <= 1.5x the dense MLP.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from _common import REPO_ROOT, machine, parse_args_with_gate, today
from w1 import Workload, bench_engine
from w1_baselines import bench_hf_batch, bench_vllm

DEFAULT_MODEL = REPO_ROOT / "build" / "w4_model"
TOKENIZER_SOURCE = REPO_ROOT / "data" / "embedded_model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SEED = 20261202
SHAPE = dict(
    vocab_size=32768,
    hidden_size=512,
    intermediate_size=1536,  # unused: every layer is sparse
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=384,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def make_w4_model(out_dir: Path) -> Path:
    import torch
    import transformers

    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(SEED)
    config = transformers.Qwen3MoeConfig(**SHAPE)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SOURCE / name, out_dir / name)
    return out_dir


def moe_vs_dense(dtype_name: str, threads: int | None, tokens: list[int]) -> list[dict]:
    """Step time of one MoE block and of a dense MLP of the same active size, same inputs."""
    import torch

    from flashserve.layers.mlp import MLP
    from flashserve.layers.moe import SoftmaxTopKRouter, SparseMoeBlock, StackedExperts

    if threads:
        torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    hidden, experts, top_k, size = 512, 32, 4, 384
    gen = torch.Generator().manual_seed(SEED)
    moe = SparseMoeBlock(
        SoftmaxTopKRouter(hidden, experts, top_k, renormalize=True),
        StackedExperts(experts, hidden, size),
    )
    dense = MLP(hidden, top_k * size)
    for module in (moe, dense):
        with torch.no_grad():
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        module.to(dtype)
    rows = []
    for n in tokens:
        x = torch.randn(n, hidden, generator=gen).to(dtype)
        times = {}
        for name, module in (("moe", moe), ("dense", dense)):
            with torch.inference_mode():
                for _ in range(3):
                    module(x)
                reps = max(3, 2000 // n)
                started = time.perf_counter()
                for _ in range(reps):
                    module(x)
                times[name] = (time.perf_counter() - started) / reps
        rows.append({"tokens": n, "moe_ms": times["moe"] * 1e3, "dense_ms": times["dense"] * 1e3})
        print(
            f"  MoE layer {rows[-1]['moe_ms']:8.2f} ms  dense MLP {rows[-1]['dense_ms']:8.2f} ms"
            f"  ratio {times['moe'] / times['dense']:5.2f}  ({n} tokens, {dtype_name})",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto", help="this engine's dtype")
    parser.add_argument("--hf-dtype", default="float32")
    parser.add_argument("--vllm-dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--install-vllm", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parse_args_with_gate(parser, argv)
    args.neighbour = 0.0
    args.model = make_w4_model(args.model)
    work = Workload(args.prompt_len, SHAPE["vocab_size"], args.output_len, 0.8, 0.95, 50)
    sizes = [args.requests]
    print(
        f"W4 on {machine()}, {today()}: {args.requests} x {args.prompt_len} prompt x "
        f"{args.output_len} output",
        flush=True,
    )
    engine = bench_engine(args, args.dtype, work, sizes)
    hf = bench_hf_batch(args, args.hf_dtype, work, sizes)
    vllm = [] if args.skip_vllm else bench_vllm(args, args.vllm_dtype, work, sizes)
    layer = moe_vs_dense(engine[0].dtype, args.threads, [64, 64 * 128])
    ours = engine[0].tok_s
    print(f"\nengine {ours:.1f} tok/s")
    print(f"  vs batched transformers: {ours / hf[0].tok_s:.2f}x (target >= 2x)")
    if vllm:
        print(f"  vs vLLM CPU: {ours / vllm[0].tok_s:.2f}x (target >= 3x)")
    else:
        print("  vs vLLM CPU: not run (see its message above)")
    for row in layer:
        print(
            f"  MoE layer / dense MLP at {row['tokens']} tokens: "
            f"{row['moe_ms'] / row['dense_ms']:.2f}x (target <= 1.5x)"
        )
    if args.json_out:
        report = {
            "engine": [r.__dict__ for r in engine],
            "hf": [r.__dict__ for r in hf],
            "vllm": [r.__dict__ for r in vllm],
            "layer": layer,
        }
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
