"""DeepSeek-V3 (multi-head latent attention + MoE) gives transformers' own logits.

Tiny random configs in fp32: with and without q LoRA, yarn rope with mscale, rope
interleaved or not; whole prompt and chunked prefill (which decompress latents),
token by token (the absorbed decode over the latent cache), a batch decoding after
preemption and with its prompts' prefixes reused from the cache.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from flashserve.engine.disaggregation import CONTEXT_ONLY, GENERATION_ONLY, DisaggregatedRequest
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.models.kv_cache_spec import LatentKVCacheSpec
from tests.deepseek_models import VOCAB, save_random_deepseek
from tests.engine_harness import assert_logits_match, run_all
from tests.engine_harness import make_engine as harness_engine

CONFIGS = {
    "q-lora-yarn-interleaved": {},
    "no-q-lora": dict(q_lora_rank=None),
    # DeepSeek-V2: softmax routing within the best groups, no correction bias.
    "v2-group-limited-greedy": dict(
        config_cls=transformers.DeepseekV2Config, topk_method="group_limited_greedy"
    ),
    "v2-lite-greedy-no-q-lora": dict(
        config_cls=transformers.DeepseekV2Config, topk_method="greedy", q_lora_rank=None
    ),
    # DeepSeek-V2's mlp_bias: the dense layers' and the shared experts' projections.
    "v2-mlp-bias": dict(config_cls=transformers.DeepseekV2Config, mlp_bias=True),
    "plain-rope-not-interleaved": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=False
    ),
}


def make_engine(path, **overrides) -> LLMEngine:
    # One thread: on the shared 2-core CPU, OpenMP threads waiting for a busy core
    # make a tiny step ~50x slower.
    settings = dict(kv_cache_memory_gb=0.01, max_model_len=512, cpu_threads=1)
    return harness_engine(path, **{**settings, **overrides})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    overrides = dict(CONFIGS[name])
    config_cls = overrides.pop("config_cls", transformers.DeepseekV3Config)
    reference = save_random_deepseek(tmp_path, config_cls=config_cls, **overrides)
    engine = make_engine(tmp_path)
    spec = engine.model.kv_cache_spec
    assert isinstance(spec, LatentKVCacheSpec)
    # One latent (32) + one rope key (8) per token and layer, whatever the head count.
    assert spec.token_bytes(torch.float32) == (32 + 8) * 4
    token_ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    # Whole prompt, chunks straddling KV blocks (decompressed over cached latents),
    # and one token at a time (absorbed decode over the latent cache).
    assert_logits_match(engine, reference, token_ids, (200, 37, 1), name)


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
    prompts = [
        shared + torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 9, 30)
    ]
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


def test_decode_through_graph_static_inputs_equals_transformers(tmp_path):
    """The fixed-shape decode a CUDA graph captures (whole block table, masked), run eagerly."""
    reference = save_random_deepseek(tmp_path, seed=7, q_lora_rank=None)
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    steps = 12
    expected = {f"r{i}": _greedy_reference(reference, p, steps) for i, p in enumerate(prompts)}
    engine = make_engine(tmp_path)
    assert engine.runner.enable_decode_graphs(4, capture=False)
    graphs = engine.runner.graphs
    # The latent cache gathers one [latent | rope] row per token for all heads.
    assert graphs.table_widths[0] * engine.block_size == 256
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    got = run_all(engine, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    assert graphs.runs >= steps - 1
    assert got == expected


def test_parked_context_resumes_on_the_latent_cache(tmp_path):
    """A context_only request parks its latent blocks; generation_only continues from them."""
    reference = save_random_deepseek(tmp_path, seed=9, num_hidden_layers=2)
    prompt = torch.randint(2, VOCAB, (45,), generator=torch.Generator().manual_seed(9)).tolist()
    steps = 10
    expected = _greedy_reference(reference, prompt, steps)
    engine = make_engine(tmp_path, enable_prefix_caching=False)

    def run(request_id: str, request: DisaggregatedRequest) -> tuple[list[int], object]:
        params = SamplingParams(
            temperature=0.0, max_tokens=steps, ignore_eos=True, disaggregated=request
        )
        engine.add_request(request_id, prompt, params)
        tokens, handle = [], None
        while engine.has_work():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
                handle = out.context_handle or handle
        return tokens, handle

    first, handle = run("ctx", DisaggregatedRequest(CONTEXT_ONLY))
    assert first == expected[:1] and handle is not None
    assert engine.block_manager.num_used_blocks == 3  # 45 tokens' latents stay parked
    resumed, _ = run("gen", DisaggregatedRequest(GENERATION_ONLY, handle))
    assert resumed == expected


def test_long_context_prefill_attends_absorbed(tmp_path, monkeypatch):
    """Chunks whose per-head keys and values would pass the decompression limit attend
    over the latents directly; with the limit at 0 every prefill chunk does."""
    import flashserve.layers.mla as mla

    reference = save_random_deepseek(tmp_path, seed=11)
    monkeypatch.setattr(mla, "DECOMPRESS_BYTES_LIMIT", 0)
    engine = make_engine(tmp_path)
    token_ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    assert_logits_match(engine, reference, token_ids, (120, 37))


def test_config_without_mla_keys_is_a_load_error(tmp_path):
    save_random_deepseek(tmp_path, num_hidden_layers=1)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["kv_lora_rank"], config["v_head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="DeepseekV3ForCausalLM config.json lacks kv_lora_rank, v_head_dim"
    ):
        make_engine(tmp_path)
