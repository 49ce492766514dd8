"""Mixture-of-experts architectures give the logits of transformers' own implementations.

Tiny random configs in fp32: whole prompt, chunked prefill and token by token
(a one-token step leaves most experts without a token); router weights that
tie every expert; checkpoints with per-expert tensors (what save_pretrained
and the hub store) and with transformers' stacked expert tensors; and a
batch of 64 mixed lengths decoding greedily exactly as each row does alone.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import transformers

from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.layers.moe import SoftmaxTopKRouter, StackedExperts
from flashserve.layers.moe.experts import combine_rows
from tests.engine_harness import assert_logits_match, make_engine, mixed_prompts, run_all
from tests.tiny_models import random_model

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

ARCHITECTURES = {
    "qwen3-moe-mlp-only-layer-renorm": (
        transformers.Qwen3MoeConfig,
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            head_dim=32,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-moe-sparse-step-2": (
        transformers.Qwen3MoeConfig,
        dict(
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            tie_word_embeddings=True,
        ),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    ),
    "glm4-moe": (
        transformers.Glm4MoeConfig,
        dict(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            attention_bias=True,
            use_qk_norm=False,
            head_dim=32,
            tie_word_embeddings=False,
        ),
    ),
    "glm4-moe-qk-norm-one-group": (
        transformers.Glm4MoeConfig,
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=2,
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            first_k_dense_replace=2,
            attention_bias=False,
            use_qk_norm=True,
            tie_word_embeddings=True,
        ),
    ),
    # Qwen2-MoE's own qkv_bias key (true by default) switches the q/k/v bias off.
    "qwen2-moe-no-qkv-bias": (
        transformers.Qwen2MoeConfig,
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            qkv_bias=False,
        ),
    ),
    # attention_bias: q, k, v and o.
    "qwen3-moe-attention-bias": (
        transformers.Qwen3MoeConfig,
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, attention_bias=True),
    ),
    # No shared expert: transformers still saves its empty projections (and Qwen2-MoE its
    # gate), which add nothing.
    "qwen2-moe-no-shared-expert": (
        transformers.Qwen2MoeConfig,
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=0,
        ),
    ),
    "glm4-moe-no-shared-expert": (
        transformers.Glm4MoeConfig,
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=0,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            head_dim=16,
        ),
    ),
    "qwen2-moe-shared-expert": (
        transformers.Qwen2MoeConfig,
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
    ),
}


def _random_reference(name: str, tie_router_layer: int | None = None):
    config_cls, extra = ARCHITECTURES[name]
    # Random norms, biases and router biases too, so they matter.
    model = random_model(
        config_cls(**COMMON, **extra), 0, 0.05, perturb=True, router_bias_scale=0.1
    )
    with torch.no_grad():
        if tie_router_layer is not None:
            # Every expert scores the same for every token: the choice is all tie-breaking.
            router = model.model.layers[tie_router_layer].mlp.gate
            router.weight.zero_()
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.zero_()
    return model.eval()


def _engine(path, **overrides) -> LLMEngine:
    return make_engine(path, kv_cache_memory_gb=0.01, max_model_len=512, **overrides)


def _assert_logits_match(reference, engine, name, chunks=(120, 37, 1)):
    token_ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    # Whole prompt at once, in chunks that straddle KV blocks, and one token at a time.
    assert_logits_match(engine, reference, token_ids, chunks, name)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_logits_match_transformers(name, tmp_path):
    reference = _random_reference(name)
    # Small shards: experts of one layer land in several files.
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _assert_logits_match(reference, _engine(tmp_path), name)


@pytest.mark.parametrize("name", ["qwen3-moe-mlp-only-layer-renorm", "glm4-moe"])
def test_tied_router_scores_choose_as_transformers_does(name, tmp_path):
    layer = 2
    reference = _random_reference(name, tie_router_layer=layer)
    reference.save_pretrained(tmp_path)
    _assert_logits_match(reference, _engine(tmp_path), f"{name} tied", chunks=(120, 1))


def test_stacked_expert_tensors_load_as_transformers_keeps_them(tmp_path):
    name = "qwen3-moe-mlp-only-layer-renorm"
    reference = _random_reference(name)
    reference.config.architectures = [type(reference).__name__]
    reference.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    _assert_logits_match(reference, _engine(tmp_path), "stacked", chunks=(120,))


def _random_experts(seed: int, experts_n: int, hidden: int, size: int) -> StackedExperts:
    torch.manual_seed(seed)
    experts = StackedExperts(experts_n, hidden, size)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    return experts


def _expert_sum_token_by_token(experts, x, weights, ids) -> torch.Tensor:
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            expected[t] += weights[t, slot] * (
                experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
            )
    return expected


def test_experts_without_tokens_cost_nothing_and_change_nothing():
    experts = _random_experts(3, 6, 16, 8)
    x = torch.randn(5, 16)
    # Only experts 1 and 4 receive tokens; 4 of the 6 get none.
    ids = torch.tensor([[1, 4], [4, 1], [1, 4], [4, 1], [1, 4]])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        got = experts(x, weights, ids)
        expected = _expert_sum_token_by_token(experts, x, weights, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_router_renormalises_only_when_asked():
    router = SoftmaxTopKRouter(8, 4, 2, renormalize=True)
    plain = SoftmaxTopKRouter(8, 4, 2, renormalize=False)
    with torch.no_grad():
        router.weight.normal_()
        plain.weight.copy_(router.weight)
    x = torch.randn(3, 8)
    weights, _ = router(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert (plain(x)[0].sum(-1) < 1).all()


def test_batch_of_64_mixed_lengths_decodes_as_each_row_alone(tmp_path):
    reference = _random_reference("qwen3-moe-mlp-only-layer-renorm")
    with torch.no_grad():  # peaked distributions, so greedy picks are not near-ties
        for param in reference.parameters():
            if param.dim() > 1:
                param.mul_(6.0)
    reference.save_pretrained(tmp_path)
    prompts = [p[:40] for p in mixed_prompts(64, seed=5)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone_engine = _engine(tmp_path)
    alone = {}
    for i, prompt in enumerate(prompts):
        alone.update(run_all(alone_engine, {f"r{i}": (prompt, params)}))
    engine = _engine(tmp_path, max_num_seqs=64, max_num_batched_tokens=256)
    together = run_all(engine, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    assert together == alone
    assert engine.block_manager.num_used_blocks == 0


def test_both_ways_of_combining_expert_rows_agree():
    torch.manual_seed(4)
    tokens, top_k, hidden = 9, 3, 16
    ids = torch.stack([torch.randperm(6)[:top_k] for _ in range(tokens)])
    order = torch.argsort(ids.reshape(-1), stable=True)
    rows = torch.randn(tokens * top_k, hidden)
    weights = torch.rand(tokens, top_k)
    expected = torch.zeros(tokens, hidden)
    for i, assignment in enumerate(order.tolist()):
        expected[assignment // top_k] += weights[assignment // top_k, assignment % top_k] * rows[i]
    for by_slot in (True, False):
        got = combine_rows(rows, order, weights, top_k, by_slot)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=f"by_slot={by_slot}")
