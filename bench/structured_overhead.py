"""Per-step cost of structured-output masking, against unconstrained decoding, same run.

    python bench/structured_overhead.py [--model build/bench_model] [--device cpu|cuda]
        [--batch-sizes 1,64] [--steps 48] [--dtype auto]

For each batch size B, two runs of B requests on one engine, alternating so that both see
the same machine state: unconstrained, and every request constrained by a JSON schema
whose outputs stay long (a list of at least 40 small records: strings, integers, enums,
booleans), so every measured step is a full batch of masked rows. Sampling is at
temperature 1.0, as in production. Reported per decode step (prefill steps excluded):
engine step time in both runs, their ratio, and the time spent in the grammar mask
(xgrammar's bitmask fill for the batch + applying it to the logits), also as a share of
the unconstrained step. On a busy machine the two step times drift by more than the mask
costs; the mask column, timed around the mask alone, is the steadier number.

The model defaults to build/bench_model (bench/make_bench_model.py: ~59M parameters, the
32k Mistral tokenizer); data/embedded_model (tiny) works too, but its forward is so cheap
that the ratio says more about the sampler than about a real model. Prints a Markdown
table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "packages"))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from flashserve.api.structured_output import StructuredOutputs, parse_response_format  # noqa: E402
from flashserve.config import EngineConfig  # noqa: E402
from flashserve.engine import logits_processors, structured  # noqa: E402
from flashserve.engine.llm_engine import LLMEngine  # noqa: E402
from flashserve.engine.sampling_params import SamplingParams  # noqa: E402

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "n", "kind", "ok"],
}
LONG_SCHEMA = {"type": "array", "items": RECORD, "minItems": 40, "maxItems": 60}


class MaskTimer:
    """Wraps the grammar-mask processor to time it (synchronising CUDA around it)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inner = structured.apply_grammar_bitmask

    def __call__(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        if logits.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self._inner(logits, batch)
        if logits.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def decode_steps(
    engine: LLMEngine, batch: int, params: SamplingParams, steps: int, tag: str, timer: MaskTimer
) -> list[float]:
    """Seconds per engine step while all `batch` requests decode (prefill excluded)."""
    for i in range(batch):
        engine.add_request(f"{tag}{i}", [1, 1000 + i, 2000 + 7 * i, 22], params)
    engine.step()  # prefill of all prompts (they fit in one step's token budget)
    timer.seconds = 0.0
    times = []
    for _ in range(steps):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if any(o.finished for o in outputs) or len(outputs) != batch:
            raise RuntimeError(f"{tag}: a request finished early; raise minItems or lower --steps")
    for i in range(batch):
        engine.abort(f"{tag}{i}")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "build" / "bench_model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="alternations per batch size")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    eos = (tokenizer.eos_token_id,)
    config = EngineConfig(
        device=args.device, dtype=args.dtype, kv_cache_memory_gb=1.0, max_model_len=2048
    )
    engine = LLMEngine(config, args.model, eos_token_ids=eos)
    outputs = StructuredOutputs(tokenizer, engine.model_config.vocab_size, eos)
    started = time.perf_counter()
    outputs.compiler()  # once per tokenizer: xgrammar's vocabulary scan
    tokenizer_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    spec = parse_response_format(
        {"type": "json_schema", "json_schema": {"name": "records", "schema": LONG_SCHEMA}}
    )
    grammar = outputs.compile(spec)
    compile_ms = (time.perf_counter() - started) * 1000
    timer = MaskTimer()
    index = logits_processors.LOGITS_PROCESSORS.index(structured.apply_grammar_bitmask)
    logits_processors.LOGITS_PROCESSORS[index] = timer

    free = SamplingParams(temperature=1.0, max_tokens=args.steps + 8, ignore_eos=True)
    masked = SamplingParams(temperature=1.0, max_tokens=args.steps + 8, grammar=grammar)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        plain: list[float] = []
        constrained: list[float] = []
        mask_s = 0.0
        for r in range(args.rounds):
            plain += decode_steps(engine, batch, free, args.steps, f"p{batch}.{r}.", timer)
            constrained += decode_steps(engine, batch, masked, args.steps, f"c{batch}.{r}.", timer)
            mask_s += timer.seconds
        p_ms = statistics.median(plain) * 1000
        c_ms = statistics.median(constrained) * 1000
        m_ms = mask_s / (args.rounds * args.steps) * 1000
        rows.append((batch, p_ms, c_ms, c_ms / p_ms, m_ms))

    mc = engine.model_config
    print(
        f"model: {args.model.name} ({mc.num_layers} layers, hidden {mc.hidden_size}, "
        f"vocab {mc.vocab_size}), device {engine.device} ({engine.dtype}), "
        f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print(
        f"tokenizer info: {tokenizer_ms:.0f} ms once; schema compile: {compile_ms:.0f} ms "
        f"(uncached); {args.steps} decode steps x {args.rounds} rounds per cell; step times "
        "are medians, mask time a mean"
    )
    print()
    print(
        "| batch | unconstrained ms/step | constrained ms/step | ratio "
        "| mask ms/step | mask / unconstrained step |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, p_ms, c_ms, ratio, m_ms in rows:
        print(
            f"| {batch} | {p_ms:.1f} | {c_ms:.1f} | {ratio:.2f} | {m_ms:.1f} | {m_ms / p_ms:.1%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
