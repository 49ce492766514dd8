"""Build a model and fill it from (sharded) safetensors files."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from flashserve.layers.attention import AttentionBackend
from flashserve.models.llama import LlamaForCausalLM
from flashserve.models.model_config import ModelConfig

logger = logging.getLogger(__name__)

# checkpoint tensor suffix -> (fused parameter, which shard of it)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_PROJECTION = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")


def load_model(
    model_dir: str | Path,
    cfg: ModelConfig,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, backend, max_positions)
    # Materialise on the target device without initialising weights we overwrite anyway.
    model = model.to_empty(device=device).to(dtype)
    _restore_buffers(model, cfg, max_positions, device)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                target = _place(name, f.get_tensor(name), params, cfg)
                if target:
                    filled.add(target)
    missing = set(params) - filled
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks tensors: {sorted(missing)[:8]}")
    # Inference only: no autograd bookkeeping on weights.
    model.requires_grad_(False)
    model.eval()
    return model


def _place(name: str, tensor: torch.Tensor, params: dict, cfg: ModelConfig) -> str | None:
    """Copy one checkpoint tensor into its (possibly fused) parameter; return its name."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    local = name.removeprefix("model.")
    match = _PROJECTION.search(local)
    if match:
        fused, shard = _FUSED[match.group(1)]
        target = local[: match.start()] + f".{fused}.{match.group(2)}"
        param = params[target]
        if fused == "qkv_proj":
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            offset, size = [(0, q), (q, kv), (q + kv, kv)][shard]
        else:
            size = cfg.intermediate_size
            offset = shard * size
        param.data[offset : offset + size].copy_(tensor)
        # Report the fused parameter only once all of its shards have arrived.
        return target if shard == (2 if fused == "qkv_proj" else 1) else None
    if local not in params:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return None
        logger.warning("ignoring checkpoint tensor %s", name)
        return None
    params[local].data.copy_(tensor)
    return local


def _restore_buffers(
    model: LlamaForCausalLM, cfg: ModelConfig, max_positions: int, device: torch.device
) -> None:
    # to_empty() leaves non-persistent buffers uninitialised; rebuild the rope cache.
    from flashserve.layers.rotary import RotaryEmbedding

    fresh = RotaryEmbedding(cfg.rope, cfg.head_dim, max(max_positions, cfg.max_position_embeddings))
    rotary = model.layers[0].self_attn.rotary
    rotary.cos_sin = fresh.cos_sin.to(device)
