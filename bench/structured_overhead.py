"""Per-step cost of structured-output masking, against unconstrained decoding, same run.

    python bench/structured_overhead.py [--model build/bench_model] [--device cpu|cuda]
        [--batch-sizes 1,64] [--steps 64] [--dtype auto]

For each batch size B, B requests on each of two engines over the same weights, stepped
in turn so that both see the same machine state: one unconstrained, one with every request
constrained by a JSON schema whose outputs stay long (a list of at least 40 small records:
strings, integers, enums, booleans), so every measured step is a full batch of masked
rows. Sampling is at temperature 1.0, as in production. Reported per decode step (prefill
excluded): the step time of both engines (medians), their ratio, and the time spent in the
grammar mask (xgrammar's bitmask fill for the batch + applying it to the logits; a mean),
also as a share of the unconstrained step. On a shared machine the step times still
wander by more than the mask costs; the mask column, timed around the mask alone, is the
steadier number.

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

from flashserve.api.frontend.structured.response_format import (  # noqa: E402
    StructuredOutputs,
    parse_response_format,
)
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


def _timed_step(engine: LLMEngine) -> tuple[float, list]:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def interleaved(
    plain: LLMEngine,
    constrained: LLMEngine,
    batch: int,
    params: tuple[SamplingParams, SamplingParams],
    steps: int,
    timer: MaskTimer,
) -> tuple[list[float], list[float], float]:
    """Step times of both engines, one step each in turn, and the constrained mask time.

    Alternating step by step (not run by run) gives both the same machine state: on a
    shared machine, load changes faster than a run lasts.
    """
    engines = (plain, constrained)
    for engine, p in zip(engines, params):
        for i in range(batch):
            engine.add_request(f"b{batch}.{i}", [1, 1000 + i, 2000 + 7 * i, 22], p)
        engine.step()  # prefill: all prompts fit in one step's token budget
    timer.seconds = 0.0
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for engine, out in zip(engines, times):
            seconds, outputs = _timed_step(engine)
            out.append(seconds)
            if len(outputs) != batch or any(o.finished for o in outputs):
                raise RuntimeError("a request finished early; raise minItems or lower --steps")
    for engine in engines:
        for i in range(batch):
            engine.abort(f"b{batch}.{i}")
    return times[0], times[1], timer.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "build" / "bench_model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    eos = (tokenizer.eos_token_id,)
    config = EngineConfig(
        device=args.device, dtype=args.dtype, kv_cache_memory_gb=1.0, max_model_len=2048
    )
    # Two engines on the same weights file: one decodes freely, one under the grammar.
    plain = LLMEngine(config, args.model, eos_token_ids=eos)
    constrained = LLMEngine(config, args.model, eos_token_ids=eos)
    outputs = StructuredOutputs(tokenizer, plain.model_config.vocab_size, eos)
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

    params = (
        SamplingParams(temperature=1.0, max_tokens=args.steps + 8, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=args.steps + 8, grammar=grammar),
    )
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        free_s, masked_s, mask_s = interleaved(plain, constrained, batch, params, args.steps, timer)
        p_ms = statistics.median(free_s) * 1000
        c_ms = statistics.median(masked_s) * 1000
        m_ms = mask_s / args.steps * 1000
        rows.append((batch, p_ms, c_ms, c_ms / p_ms, m_ms))

    mc = plain.model_config
    print(
        f"model: {args.model.name} ({mc.num_layers} layers, hidden {mc.hidden_size}, "
        f"vocab {mc.vocab_size}), device {plain.device} ({plain.dtype}), "
        f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print(
        f"tokenizer info: {tokenizer_ms:.0f} ms once; schema compile: {compile_ms:.0f} ms "
        f"(uncached); {args.steps} decode steps per cell, the two engines alternating; "
        "step times are medians, mask time a mean"
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
