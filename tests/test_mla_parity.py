"""DeepSeek-V3 (multi-head latent attention + MoE) gives transformers' own logits.

Tiny random configs in fp32: with and without q LoRA, yarn rope with mscale, rope
interleaved or not; whole prompt and chunked prefill (which decompress latents),
token by token (the absorbed decode over the latent cache), a batch decoding after
preemption and with its prompts' prefixes reused from the cache.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.models.kv_cache_spec import LatentKVCacheSpec
from tests.engine_harness import engine_logits, run_all

VOCAB = 512
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 0.6,
}


def deepseek_config(**overrides) -> transformers.DeepseekV3Config:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=24,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters=YARN,
        bos_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return transformers.DeepseekV3Config(**settings)


def save_random_deepseek(path, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        deepseek_config(**overrides), dtype=torch.float32
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random norms and router biases too, so every term matters.
            param.add_(torch.randn_like(param) * 0.05)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(torch.randn_like(module.e_score_correction_bias) * 0.05)
    model.save_pretrained(path, max_shard_size="200KB")
    return model.eval()


CONFIGS = {
    "q-lora-yarn-interleaved": {},
    "no-q-lora": dict(q_lora_rank=None),
    "plain-rope-not-interleaved": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=False
    ),
}


def make_engine(path, **overrides) -> LLMEngine:
    settings = dict(device="cpu", dtype="float32", kv_cache_memory_gb=0.01, max_model_len=512)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), path)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    reference = save_random_deepseek(tmp_path, **CONFIGS[name])
    engine = make_engine(tmp_path)
    spec = engine.model.kv_cache_spec
    assert isinstance(spec, LatentKVCacheSpec)
    # One latent (32) + one rope key (8) per token and layer, whatever the head count.
    assert spec.token_bytes(torch.float32) == (32 + 8) * 4
    token_ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([token_ids])).logits[0].float()
    # Whole prompt, chunks straddling KV blocks (decompressed over cached latents),
    # and one token at a time (absorbed decode).
    for chunk in (200, 37, 1):
        got = engine_logits(engine, token_ids, chunk)
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4, msg=f"{name}, chunk {chunk}")


def _greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_decode_after_preemption_and_prefix_reuse(tmp_path):
    reference = save_random_deepseek(tmp_path, seed=3)
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(2, VOCAB, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 9, 30)]
    steps = 24
    expected = {f"r{i}": _greedy_reference(reference, p, steps) for i, p in enumerate(prompts)}
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    # 10 blocks of 16 tokens cannot hold four sequences of ~90 tokens: the scheduler
    # preempts and recomputes; the shared 40-token prefix is reused from the cache.
    engine = make_engine(tmp_path, kv_cache_memory_gb=10 * 16 * 3 * 40 * 4 / (1 << 30))
    assert engine.block_manager.num_blocks == 10
    got = run_all(engine, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    assert engine.scheduler.total_preemptions > 0
    assert engine.block_manager.prefix_hits > 0
    assert got == expected
