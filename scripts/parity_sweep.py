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
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "packages"), str(REPO_ROOT)]

import torch  # noqa: E402
import transformers  # noqa: E402
from parity_cases import Case  # noqa: E402
from parity_cases import cases as all_cases  # noqa: E402

from flashserve.config import EngineConfig  # noqa: E402
from flashserve.engine.llm_engine import LLMEngine  # noqa: E402
from flashserve.engine.sampling_params import SamplingParams  # noqa: E402
from flashserve.engine.sequence import Sequence  # noqa: E402

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
    cases = [c for c in all_cases() if not args.only or any(s in c.name for s in args.only)]
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
