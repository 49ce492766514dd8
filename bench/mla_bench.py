"""Multi-head latent attention: KV capacity against GQA, and decode speed against transformers.

    python bench/mla_bench.py [--kv-gb 1.0] [--context 4096] [--batch 16]
        [--prompt-len 64] [--new-tokens 32] [--device cpu] [--dtype float32] [--threads 1]

1. Capacity. A tiny random DeepSeek-V3 (MLA: kv_lora_rank 512 + rope 64 per token
   and layer) and a Llama of similar size (GQA, 8 KV heads x 128) get engines with
   the same KV budget; the table gives each engine's allocated blocks, KV bytes per
   token and how many sequences of --context tokens that cache holds at once (whole
   blocks per sequence, as the block manager hands them out).
2. Decode. A smaller random DeepSeek-V3 generates --new-tokens greedy tokens for
   --batch prompts of --prompt-len tokens, in flashserve's engine (one step per token,
   absorbed decode over the latent cache) and in transformers' generate() with the
   whole batch at once (its DynamicCache), both in this process, the same weights,
   dtype and threads. Reported: decode tokens per second of each and their ratio
   (prefill is timed apart and left out of both rates).

--threads sets torch's CPU threads for both engines (default 1: on a CPU shared with
other work, OpenMP threads waiting for a busy core make timings meaningless).
Prints Markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "packages"))

import torch  # noqa: E402
import transformers  # noqa: E402

from flashserve.config import EngineConfig  # noqa: E402
from flashserve.engine.llm_engine import LLMEngine  # noqa: E402
from flashserve.engine.sampling_params import SamplingParams  # noqa: E402

VOCAB = 4096


def deepseek(hidden: int, layers: int, heads: int, experts: int) -> transformers.PretrainedConfig:
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        q_lora_rank=hidden // 2,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=experts,
        num_experts_per_tok=4,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


def llama(hidden: int, layers: int, heads: int) -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=8 * hidden,  # about the MoE model's parameter count
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


def save(config, path: Path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05)
    model.save_pretrained(path)
    return model.eval()


def engine(path: Path, args, **overrides) -> LLMEngine:
    settings = dict(
        device=args.device,
        dtype=args.dtype,
        kv_cache_memory_gb=args.kv_gb,
        kv_cache_memory_fraction=0.05,
        max_model_len=args.context + 64,
        max_num_seqs=max(args.batch, 1),
        cuda_graphs=args.device == "cuda",
        warmup=False,
        cpu_threads=args.threads,
    )
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), path)


def capacity(args, root: Path) -> None:
    print(f"\n### KV capacity: {args.kv_gb} GiB budget, {args.context}-token sequences\n")
    print("| model | params | KV bytes/token (all layers) | blocks | concurrent sequences |")
    print("|---|---:|---:|---:|---:|")
    rows = {
        "DeepSeek-V3 tiny (MLA 512+64)": deepseek(1024, 8, 16, 16),
        "Llama tiny (GQA 8x128)": llama(1024, 8, 16),
    }
    held = {}
    for name, config in rows.items():
        path = root / name.split()[0]
        model = save(config, path)
        params = sum(p.numel() for p in model.parameters())
        del model
        eng = engine(path, args, max_num_seqs=1, device="cpu", cuda_graphs=False)
        per_block = eng.runner.bytes_per_block(eng.model, eng.block_size, eng.dtype)
        blocks = eng.block_manager.num_blocks
        per_seq = -(-args.context // eng.block_size)
        held[name] = blocks // per_seq
        print(
            f"| {name} | {params / 1e6:.0f}M | {per_block // eng.block_size:,} | {blocks:,} "
            f"| {held[name]} |"
        )
        del eng
    mla, gqa = held.values()
    print(f"\nMLA holds {mla / max(gqa, 1):.1f}x the sequences of GQA in the same budget.")


def decode_speed(args, root: Path) -> None:
    path = root / "decode"
    reference = save(deepseek(512, 4, 8, 16), path).to(args.device, getattr(torch, args.dtype))
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, VOCAB, (args.batch, args.prompt_len), generator=gen)
    n = args.new_tokens

    def hf(tokens: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            reference.generate(
                prompts.to(args.device),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - started

    hf(2)  # warm-up
    hf_prefill = hf(1)
    hf_decode = hf(n + 1) - hf_prefill

    eng = engine(path, args, kv_cache_memory_gb=max(args.kv_gb, 0.5))
    params = SamplingParams(temperature=0.0, max_tokens=n + 1, ignore_eos=True)

    def ours(tag: str) -> tuple[float, float]:
        for i, prompt in enumerate(prompts.tolist()):
            eng.add_request(f"{tag}{i}", prompt, params)
        started = time.perf_counter()
        eng.step()  # the whole batch's prefill and first token (fits one step's budget)
        prefilled = time.perf_counter()
        while eng.has_work():
            eng.step()
        return prefilled - started, time.perf_counter() - prefilled

    ours("warm")
    _, our_decode = ours("run")
    tokens = args.batch * n
    print(
        f"\n### Decode: batch {args.batch}, prompt {args.prompt_len}, {n} new tokens, "
        f"{args.device} {args.dtype}, {torch.get_num_threads()} threads\n"
    )
    print("| engine | decode tok/s | ratio |")
    print("|---|---:|---:|")
    print(f"| transformers generate (batched) | {tokens / hf_decode:.1f} | 1.00 |")
    print(
        f"| flashserve (absorbed MLA decode) | {tokens / our_decode:.1f} | {hf_decode / our_decode:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-gb", type=float, default=1.0)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", choices=["capacity", "decode"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "capacity":
            capacity(args, Path(tmp))
        if args.skip != "decode":
            decode_speed(args, Path(tmp))


if __name__ == "__main__":
    main()
