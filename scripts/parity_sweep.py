"""Every architecture the registry claims, in the config variants an outside check would
build, against transformers' own implementation: logits and greedy tokens.

    python scripts/parity_sweep.py [--only SUBSTRING ...] [--init default|perturbed]
                                   [--dtype float32|bfloat16] [--list]

Each case makes a tiny random checkpoint the usual way (`AutoConfig.for_model(type,
<small sizes>, <the variant's keys>)`, every other key at transformers' default,
`AutoModelForCausalLM.from_config`, `save_pretrained`, possibly in bfloat16 and in
shards), loads it back into transformers in fp32 as the reference, serves it with the
engine (CPU) and prints one line: the |logit difference| over a 120-token prompt
computed whole, in chunks of 37 and token by token, and whether 16 greedy tokens of
three prompts decoded together equal `generate(do_sample=False)` of each (a divergence
at a near-tie of the reference's two best logits is reported, not failed). A case the
engine refuses on purpose passes when its load error names the expected key. Exit
status 1 on any mismatch or unexpected load error.

`--dtype float32` (the default): every logit within 2e-4 + 1e-4 |logit|.
`--dtype bfloat16`: the engine in bf16; its mean error against the fp32 reference must
stay within twice transformers' own bf16 error (medians over positions); greedy tokens
are compared with transformers in bf16 and a divergence is reported, not failed (a
router near-tie rounded the other way flips an expert and moves logits by up to ~1).

`--init perturbed` (the default) adds N(0, 0.05) noise to transformers' initial
weights, so norms and biases differ from 1 and 0 and every term shows in the logits;
`--init default` keeps transformers' initialisation, as a plain random checkpoint has.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "packages"), str(REPO_ROOT)]

import torch  # noqa: E402
import transformers  # noqa: E402

from flashserve.config import EngineConfig  # noqa: E402
from flashserve.engine.llm_engine import LLMEngine  # noqa: E402
from flashserve.engine.sampling_params import SamplingParams  # noqa: E402
from flashserve.engine.sequence import Sequence  # noqa: E402

VOCAB = 512
PROMPT_LEN = 120
GREEDY_TOKENS = 16
CHUNKS = (PROMPT_LEN, 37, 1)
ATOL, RTOL = 2e-4, 1e-4  # fp32: every logit of every position
# bf16: the engine's typical error against the fp32 reference (the median over positions
# of a position's mean |logit error|) may be at most this multiple of transformers' own
# in bf16. A median: a MoE router's near-tie flips an expert at a few positions on
# either side, and those positions would dominate a mean or a max.
BF16_ERROR_RATIO = 2.0
# A greedy divergence where the reference's two best logits are closer than this is a
# near-tie, either choice right.
NEAR_TIE = {"float32": 10 * ATOL, "bfloat16": 5e-2}

DENSE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
# 3 heads of 16: num_key_value_heads must be 1 or 3.
ODD = dict(
    DENSE, hidden_size=48, num_attention_heads=3, intermediate_size=80, num_key_value_heads=1
)
QWEN_MOE = dict(DENSE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
MIXTRAL = dict(DENSE, num_local_experts=4, num_experts_per_tok=2)
GLM_MOE = dict(
    DENSE, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1
)
MLA = dict(
    DENSE,
    num_key_value_heads=4,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=24,
    # 16 experts: DeepSeek-V3's default 8 groups (top 4) need two experts per group.
    n_routed_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
)
# DeepSeek-V3 and Kimi K2 ship yarn with mscale = mscale_all_dim; V2 ships 0.707.
YARN_MSCALE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}


@dataclass(frozen=True)
class Case:
    name: str
    model_type: str
    settings: dict[str, Any]
    save_dtype: torch.dtype = torch.float32
    shard_size: str | None = None
    # A substring of the load error when the engine refuses this variant on purpose.
    refused: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def _cases() -> list[Case]:
    bf16 = torch.bfloat16
    return [
        # Llama
        Case("llama-defaults", "llama", DENSE),
        Case("llama-tied", "llama", dict(DENSE, tie_word_embeddings=True)),
        Case("llama-attention-bias", "llama", dict(DENSE, attention_bias=True)),
        Case("llama-mlp-bias", "llama", dict(DENSE, mlp_bias=True)),
        Case("llama-head-dim-32", "llama", dict(DENSE, head_dim=32)),
        # head_dim 12 is no multiple of the CPU decode kernel's 8 lanes (torch path).
        Case("llama-head-dim-12", "llama", dict(DENSE, head_dim=12)),
        Case("llama-head-dim-80", "llama", dict(DENSE, head_dim=80)),
        Case(
            "llama-odd-vocab-intermediate",
            "llama",
            dict(DENSE, vocab_size=1001, intermediate_size=37),
        ),
        Case("llama-odd-h48-heads3-kv1", "llama", ODD),
        Case("llama-odd-h48-heads3-kv3", "llama", dict(ODD, num_key_value_heads=3)),
        Case("llama-llama3-rope", "llama", dict(DENSE, rope_parameters=LLAMA3_ROPE)),
        Case(
            "llama-linear-rope",
            "llama",
            dict(DENSE, rope_parameters={"rope_type": "linear", "factor": 2.0}),
        ),
        Case(
            "llama-dynamic-rope",
            "llama",
            dict(DENSE, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
        ),
        Case(
            "llama-longrope",
            "llama",
            dict(
                DENSE,
                rope_parameters={
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 128,
                },
            ),
            refused="rope_type",
        ),
        Case("llama-gelu", "llama", dict(DENSE, hidden_act="gelu"), refused="hidden_act"),
        Case(
            "llama-yarn",
            "llama",
            dict(
                DENSE,
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 128,
                },
            ),
        ),
        Case("llama-bf16-sharded", "llama", DENSE, save_dtype=bf16, shard_size="100KB"),
        # Mistral (default sliding_window 4096 > the context here)
        Case("mistral-defaults", "mistral", DENSE),
        Case("mistral-head-dim-32", "mistral", dict(DENSE, head_dim=32)),
        Case("mistral-tied-bf16", "mistral", dict(DENSE, tie_word_embeddings=True), bf16),
        # Qwen2 (q/k/v bias by architecture)
        Case("qwen2-defaults", "qwen2", DENSE),
        Case("qwen2-tied", "qwen2", dict(DENSE, tie_word_embeddings=True)),
        Case(
            "qwen2-sliding-window-on",
            "qwen2",
            dict(DENSE, use_sliding_window=True, sliding_window=256, max_window_layers=1),
        ),
        Case(
            "qwen2-odd-kv3-sharded", "qwen2", dict(ODD, num_key_value_heads=3), shard_size="100KB"
        ),
        # Qwen3 (q/k norm; default head_dim is its own key)
        Case("qwen3-defaults", "qwen3", DENSE),
        Case("qwen3-head-dim-32-tied", "qwen3", dict(DENSE, head_dim=32, tie_word_embeddings=True)),
        Case("qwen3-attention-bias", "qwen3", dict(DENSE, attention_bias=True)),
        Case("qwen3-bf16", "qwen3", DENSE, save_dtype=bf16),
        Case(
            "qwen3-sliding-window-on",
            "qwen3",
            dict(DENSE, use_sliding_window=True, sliding_window=256, max_window_layers=1),
        ),
        # Qwen2-MoE
        Case("qwen2-moe-defaults", "qwen2_moe", dict(QWEN_MOE, shared_expert_intermediate_size=48)),
        Case(
            "qwen2-moe-unshrunk-experts",
            "qwen2_moe",
            dict(DENSE, num_experts=60, num_experts_per_tok=4),
        ),
        Case(
            "qwen2-moe-no-qkv-bias",
            "qwen2_moe",
            dict(QWEN_MOE, shared_expert_intermediate_size=48, qkv_bias=False),
        ),
        Case(
            "qwen2-moe-step2-renorm",
            "qwen2_moe",
            dict(
                QWEN_MOE,
                shared_expert_intermediate_size=48,
                decoder_sparse_step=2,
                norm_topk_prob=True,
            ),
        ),
        Case(
            "qwen2-moe-mlp-only-tied",
            "qwen2_moe",
            dict(
                QWEN_MOE,
                shared_expert_intermediate_size=48,
                mlp_only_layers=[0],
                tie_word_embeddings=True,
            ),
        ),
        # Qwen3-MoE
        Case("qwen3-moe-defaults", "qwen3_moe", QWEN_MOE),
        Case(
            "qwen3-moe-head-dim-renorm",
            "qwen3_moe",
            dict(QWEN_MOE, head_dim=32, norm_topk_prob=True, mlp_only_layers=[0]),
        ),
        Case("qwen3-moe-attention-bias", "qwen3_moe", dict(QWEN_MOE, attention_bias=True)),
        Case("qwen3-moe-step2", "qwen3_moe", dict(QWEN_MOE, decoder_sparse_step=2)),
        Case(
            "qwen3-moe-odd-expert-size-vocab",
            "qwen3_moe",
            dict(QWEN_MOE, moe_intermediate_size=37, vocab_size=1001),
        ),
        Case(
            "qwen3-moe-odd-top1",
            "qwen3_moe",
            dict(ODD, num_experts=6, num_experts_per_tok=1, moe_intermediate_size=24),
        ),
        Case(
            "qwen3-moe-top-all",
            "qwen3_moe",
            dict(QWEN_MOE, num_experts=4, num_experts_per_tok=4, norm_topk_prob=True),
        ),
        Case(
            "qwen3-moe-bf16-sharded",
            "qwen3_moe",
            QWEN_MOE,
            save_dtype=bf16,
            shard_size="100KB",
        ),
        # Mixtral
        Case("mixtral-defaults", "mixtral", MIXTRAL),
        Case(
            "mixtral-head-dim-32-tied",
            "mixtral",
            dict(MIXTRAL, head_dim=32, tie_word_embeddings=True),
        ),
        Case(
            "mixtral-odd-kv1",
            "mixtral",
            dict(ODD, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=1),
        ),
        Case("mixtral-bf16-sharded", "mixtral", MIXTRAL, save_dtype=bf16, shard_size="100KB"),
        # GLM-4.5 (partial rope 0.5, one group, scaling 1.0 by default)
        Case("glm4-moe-defaults", "glm4_moe", GLM_MOE),
        Case(
            "glm4-moe-glm45-like",
            "glm4_moe",
            dict(
                GLM_MOE,
                head_dim=32,
                attention_bias=True,
                use_qk_norm=True,
                routed_scaling_factor=2.5,
                n_group=1,
                topk_group=1,
            ),
        ),
        Case(
            "glm4-moe-groups-no-renorm",
            "glm4_moe",
            dict(GLM_MOE, n_group=4, topk_group=2, norm_topk_prob=False, first_k_dense_replace=0),
        ),
        Case(
            "glm4-moe-full-rotary-tied",
            "glm4_moe",
            dict(
                GLM_MOE,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 1.0,
                },
                tie_word_embeddings=True,
            ),
        ),
        Case("glm4-moe-bf16", "glm4_moe", GLM_MOE, save_dtype=bf16),
        # head_dim 12: partial rope rotates 6 dims (3 pairs).
        Case(
            "glm4-moe-odd-head-dim-12",
            "glm4_moe",
            dict(GLM_MOE, hidden_size=48, num_key_value_heads=1, first_k_dense_replace=0),
        ),
        # DeepSeek-V2 (softmax routing; num_experts_per_tok has no usable default)
        Case("deepseek-v2-defaults", "deepseek_v2", MLA),
        Case(
            "deepseek-v2-lite",
            "deepseek_v2",
            dict(MLA, q_lora_rank=None, first_k_dense_replace=1, n_shared_experts=2),
        ),
        Case(
            "deepseek-v2-group-limited-yarn",
            "deepseek_v2",
            dict(
                MLA,
                topk_method="group_limited_greedy",
                n_group=4,
                topk_group=2,
                routed_scaling_factor=16.0,
                rope_parameters=dict(YARN_MSCALE, mscale=0.707, mscale_all_dim=0.707),
            ),
        ),
        # V2's own expert shapes: 64 experts of 1407 (odd), V2-Lite's top 6.
        Case(
            "deepseek-v2-default-expert-sizes",
            "deepseek_v2",
            dict(
                MLA,
                n_routed_experts=64,
                moe_intermediate_size=1407,
                num_experts_per_tok=6,
                vocab_size=1001,
            ),
        ),
        Case("deepseek-v2-norm-topk", "deepseek_v2", dict(MLA, norm_topk_prob=True)),
        Case(
            "deepseek-v2-mlp-bias",
            "deepseek_v2",
            dict(MLA, mlp_bias=True, first_k_dense_replace=1),
        ),
        # DeepSeek-V3 / Kimi K2
        # first_k_dense_replace defaults to 3: with 2 layers every one is dense.
        Case("deepseek-v3-defaults", "deepseek_v3", MLA),
        Case("deepseek-v3-default-groups-moe", "deepseek_v3", dict(MLA, first_k_dense_replace=1)),
        Case(
            "deepseek-v3-attention-bias",
            "deepseek_v3",
            dict(MLA, attention_bias=True, first_k_dense_replace=1),
        ),
        Case(
            "deepseek-v3-yarn-mscale",
            "deepseek_v3",
            dict(MLA, rope_parameters=YARN_MSCALE, first_k_dense_replace=1),
        ),
        Case(
            "deepseek-v3-no-q-lora-not-interleaved",
            "deepseek_v3",
            dict(MLA, q_lora_rank=None, rope_interleave=False, first_k_dense_replace=0),
        ),
        Case(
            "kimi-k2-like",
            "deepseek_v3",
            dict(
                MLA,
                n_group=1,
                topk_group=1,
                routed_scaling_factor=2.827,
                first_k_dense_replace=1,
                rope_parameters=dict(YARN_MSCALE, factor=32.0),
            ),
        ),
        Case(
            "deepseek-v3-odd-heads3",
            "deepseek_v3",
            dict(MLA, hidden_size=48, num_attention_heads=3, first_k_dense_replace=1, n_group=4),
        ),
        Case("deepseek-v3-tied-bf16", "deepseek_v3", dict(MLA, tie_word_embeddings=True), bf16),
    ]


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL, REFUSED (as expected), ERROR
    detail: str


def build_checkpoint(case: Case, path: Path, init: str, seed: int) -> transformers.PreTrainedModel:
    """Write the case's random checkpoint to `path`; return transformers' fp32 model of it."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(case.model_type, **case.settings)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if init == "perturbed":
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.copy_(torch.randn_like(buffer) * 0.05)
    model.to(case.save_dtype)
    kwargs = {"max_shard_size": case.shard_size} if case.shard_size else {}
    model.save_pretrained(path, **kwargs)
    # transformers' own reading of the same files is the reference (bf16 weights upcast).
    return load_reference(case, path, torch.float32)


def load_reference(case: Case, path: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    # Routed experts as plain per-expert products: transformers' default grouped_mm
    # on the CPU fails on odd sizes (strides not a multiple of 16 bytes).
    experts = set(case.settings) & {"num_experts", "num_local_experts", "n_routed_experts"}
    extra = {"experts_implementation": "eager"} if experts else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    return model.eval()


def engine_logits(engine: LLMEngine, token_ids: list[int], chunk: int) -> torch.Tensor:
    seq = Sequence("parity", token_ids, SamplingParams())
    rows = []
    while seq.num_computed_tokens < seq.num_tokens:
        n = min(chunk, seq.num_uncomputed_tokens)
        assert engine.block_manager.allocate(seq, n)
        hidden, _, _ = engine.runner.forward([(seq, n)])
        rows.append(engine.model.compute_logits(hidden).float())
        seq.num_computed_tokens += n
    engine.block_manager.release(seq)
    return torch.cat(rows)


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens for all `prompts` at once: their decode steps run as one batch."""
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    produced: list[list[int]] = [[] for _ in prompts]
    while engine.has_work():
        for out in engine.step():
            produced[int(out.request_id)].extend(out.new_token_ids)
    return produced


def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        # No EOS at all, as the engine's ignore_eos: min_new_tokens would instead ban the
        # EOS token, and the engine rightly picks it when it is the best.
        model.generation_config.eos_token_id = None
        ids = torch.tensor([prompt])
        # An explicit mask: without one, generate takes pad_token_id tokens for padding.
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _top_two_margin(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def _load_engine(case: Case, path: Path, dtype: str) -> LLMEngine | Result:
    settings = dict(
        device="cpu", dtype=dtype, kv_cache_memory_gb=0.02, max_model_len=512, cpu_threads=1
    )
    try:
        engine = LLMEngine(EngineConfig(**settings), path)
    except Exception as exc:  # the case's verdict, printed on its line
        message = f"{type(exc).__name__}: {exc}"
        if case.refused and case.refused in str(exc):
            return Result(case.name, "REFUSED", message)
        return Result(case.name, "ERROR", message)
    if case.refused:
        return Result(case.name, "FAIL", f"loaded; expected a load error naming {case.refused}")
    return engine


def _typical_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().mean(-1).median())


def _compare_logits(engine, reference, bf16_reference, prompt) -> tuple[bool, str]:
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0].float()
        if bf16_reference is not None:
            own = bf16_reference(torch.tensor([prompt])).logits[0].float()
            allowed = BF16_ERROR_RATIO * _typical_error(own, expected) + 1e-4
    ok, diffs = True, []
    for chunk in CHUNKS:
        got = engine_logits(engine, prompt, chunk)
        diff = (got - expected).abs()
        if bf16_reference is None:
            diffs.append(f"{float(diff.max()):.1e}")
            ok &= bool((diff <= ATOL + RTOL * expected.abs()).all())
        else:
            error = _typical_error(got, expected)
            diffs.append(f"{error:.1e}")
            ok &= error <= allowed
    scale = f"|logits| max {float(expected.abs().max()):.2f}"
    if bf16_reference is None:
        return ok, f"max|diff| whole/37/1 = {'/'.join(diffs)}; {scale}"
    own_error = f"transformers bf16 {allowed / BF16_ERROR_RATIO:.1e}"
    return ok, f"median error whole/37/1 = {'/'.join(diffs)} ({own_error}); {scale}"


def _compare_greedy(engine, reference, prompts, near_tie: float) -> tuple[bool, str]:
    got_tokens = engine_greedy(engine, prompts, GREEDY_TOKENS)
    verdict = "greedy ok"
    for i, (prompt, got) in enumerate(zip(prompts, got_tokens)):
        want = reference_greedy(reference, prompt, GREEDY_TOKENS)
        if got == want:
            continue
        at = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
        margin = _top_two_margin(reference, prompt + want[:at])
        if margin >= near_tie:
            return False, f"greedy[{i}] DIFFERS at {at} (margin {margin:.1e})"
        verdict = f"greedy[{i}] differs at {at}, a near-tie (margin {margin:.1e})"
    return True, verdict


def run_case(case: Case, init: str, seed: int, dtype: str = "float32") -> Result:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch)
        reference = build_checkpoint(case, path, init, seed)
        engine = _load_engine(case, path, dtype)
        if isinstance(engine, Result):
            return engine
        bf16_reference = None
        if dtype == "bfloat16":
            bf16_reference = load_reference(case, path, torch.bfloat16)
        gen = torch.Generator().manual_seed(seed + 1)
        vocab = case.settings["vocab_size"]
        prompts = [
            torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (PROMPT_LEN, 57, 83)
        ]
        logits_ok, logits = _compare_logits(engine, reference, bf16_reference, prompts[0])
        greedy_reference = reference if bf16_reference is None else bf16_reference
        greedy_ok, greedy = _compare_greedy(engine, greedy_reference, prompts, NEAR_TIE[dtype])
        # In bf16 a flipped expert moves a logit by up to ~1, far past any near-tie
        # bound: greedy divergences there are reported, not failed.
        greedy_ok |= dtype == "bfloat16"
        status = "PASS" if logits_ok and greedy_ok else "FAIL"
        return Result(case.name, status, f"{logits}; {greedy}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", default=[], help="run cases whose name contains one of these"
    )
    parser.add_argument("--init", choices=("perturbed", "default"), default="perturbed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=sorted(NEAR_TIE),
        default="float32",
        help="the engine's dtype (bfloat16: its error against the fp32 reference is "
        "compared with transformers' own in bf16)",
    )
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    cases = [c for c in _cases() if not args.only or any(s in c.name for s in args.only)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    failed = 0
    width = max(len(c.name) for c in cases)
    for case in cases:
        started = time.monotonic()
        try:
            result = run_case(case, args.init, args.seed, args.dtype)
        except Exception as exc:  # a crash after loading is that case's failure, not the sweep's
            result = Result(case.name, "ERROR", f"{type(exc).__name__}: {exc}")
        failed += result.status in ("FAIL", "ERROR")
        seconds = time.monotonic() - started
        print(
            f"{result.name:<{width}}  {result.status:<7}  {result.detail}  ({seconds:.0f}s)",
            flush=True,
        )
    print(f"{len(cases) - failed}/{len(cases)} cases pass (init {args.init}, {args.dtype})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
