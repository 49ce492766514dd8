"""Write a random-weight Llama-shaped checkpoint for the benchmarks.

    python bench/make_bench_model.py [--out build/bench_model] [--shape bench|llama3-8b]
        [--device cpu|cuda]

`bench` (default, ~59M parameters): hidden 512, 8 layers, 8 heads of 64, 4 KV
heads, MLP 1536, vocab 32768, untied lm_head. It is big enough that the matrix
products, not Python, should dominate a step on a 2-core CPU, and small enough
to build in seconds. `llama3-8b` has Llama-3-8B's shapes (for bench/gpu_bench.py).

Weights are bf16 safetensors under Hugging Face's Llama tensor names, drawn from
a fixed seed, so reruns on the same device give identical files. The embedded
model's tokenizer files (same 32768-token vocabulary) are copied next to them
so the Truss server and `transformers` can load the folder too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "packages"))

from flashserve.testing.random_weights import random_llama_weights  # noqa: E402

TOKENIZER_SOURCE = REPO_ROOT / "data" / "embedded_model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SEED = 20261129
INIT_STD = 0.02

_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SHAPES: dict[str, dict[str, Any]] = {
    "bench": {
        "vocab_size": 32768,  # the embedded model's (Mistral v3) tokenizer
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
    },
    # Llama-3.2-1B's shapes (vocabulary as above): 2.1 GB of bf16 weights, quick to
    # write and read back, for bench/gpu_bench.py's load-memory probe.
    "llama3-1b": {
        "vocab_size": 32768,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    },
    # Llama-3-8B's shapes, except the vocabulary: the copied tokenizer has 32768
    # tokens. The lm_head is then 0.25 GB instead of 1 GB of the 16 GB of weights.
    "llama3-8b": {
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    },
}


def make_config(shape: str) -> dict[str, Any]:
    return {**_COMMON, **SHAPES[shape]}


def make_weights(config: dict[str, Any], device: str = "cpu") -> dict[str, torch.Tensor]:
    return random_llama_weights(config, SEED, INIT_STD, device)


def make_bench_model(out_dir: Path, shape: str = "bench", device: str = "cpu") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = make_config(shape)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(make_weights(config, device), str(out_dir / "model.safetensors"), {"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SOURCE / name, out_dir / name)
    return out_dir


def num_parameters(config: dict[str, Any]) -> int:
    hidden, inter, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "vocab_size"))
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    per_layer = hidden * (2 * q_dim + 2 * kv_dim) + 3 * hidden * inter + 2 * hidden
    heads = 1 if config["tie_word_embeddings"] else 2
    return config["num_hidden_layers"] * per_layer + heads * vocab * hidden + hidden


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench_model")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--device", default="cpu", help="where to draw the random numbers")
    args = parser.parse_args(argv)
    out = make_bench_model(args.out, args.shape, args.device)
    print(f"{num_parameters(make_config(args.shape)) / 1e6:.1f}M parameters -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
