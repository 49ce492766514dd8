"""N-gram speculative decoding vs ordinary decoding, interleaved in one process.

    python bench/make_bench_model.py --shape llama3-1b --out build/bench_model_1b
    python bench/speculative.py [--model build/bench_model_1b] [--batches 1,8]
        [--max-tokens 64] [--rounds 2] [--dtype bfloat16]

Workloads (each at every batch size):
* repeat: greedy decoding of random prompts; a random model's greedy text loops, so
  the drafts (what followed the last n tokens before) are mostly right.
* copy: the prompt holds a passage and a grammar forces the reply to be that passage
  (an edit task in miniature); the drafts come from the prompt.
* fresh: sampling at temperature 1 from the same random model; its text does not
  repeat, drafts are few and mostly wrong, and the measured per-step rule has to make
  speculation harmless.

For each (workload, batch) the baseline and the speculative engine run alternately,
`--rounds` times each, on the same requests; the ratio is of the medians. Reported:
acceptance rate, tokens per forward pass (a sequence's tokens per decode step), tok/s with
and without, their ratio, and others_cpu (the share of the CPUs other processes used
while the pair ran: above a few percent the ratio is noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO_ROOT,
    ContentionMeter,
    machine,
    make_engine,
    random_prompts,
    today,
)

PASSAGE = (
    "The river rose in the night and by morning the lower fields were under water. "
    "Farmers moved their animals to the hill, and the school opened its doors to "
    "families who had nowhere else to sleep."
)


def build_requests(engine, workload: str, batch: int, max_tokens: int, tokenizer_dir: Path):
    from flashserve.engine.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size
    if workload == "repeat":
        prompts = random_prompts(batch, 48, vocab, seed=batch)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return [(p, params) for p in prompts]
    if workload == "fresh":
        prompts = random_prompts(batch, 48, vocab, seed=100 + batch)
        return [
            (p, SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=i))
            for i, p in enumerate(prompts)
        ]
    assert workload == "copy"
    from transformers import AutoTokenizer

    from flashserve.engine.structured import EBNF, GrammarCompilerCache, GrammarSpec

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    compiler = GrammarCompilerCache(tokenizer, vocab, [tokenizer.eos_token_id])
    grammar = compiler.compile(GrammarSpec(EBNF, f"root ::= {json.dumps(PASSAGE)}"))
    prompt = tokenizer.encode(f"Copy this passage exactly.\n\n{PASSAGE}\n\nCopy:\n")
    # The grammar allows any segmentation of the passage, and a random model picks odd
    # ones (byte tokens, word pieces) that no n-gram of the prompt matches; a real model
    # writes the usual tokens. A bias towards the passage's own tokens stands in for that.
    passage_ids = tokenizer.encode(PASSAGE, add_special_tokens=False)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        grammar=grammar,
        logit_bias={t: 5.0 for t in passage_ids},
    )
    return [(prompt, params) for _ in range(batch)]


def run_once(engine, requests) -> dict[str, float]:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{engine.steps}-{i}", prompt, params)
    produced = 0
    decode_steps = 0
    decode_tokens = 0
    decode_rows = 0
    first_tokens_at = None
    first_tokens_cpu = 0.0
    started = time.perf_counter()
    while engine.has_work():
        outputs = engine.step()
        n = sum(len(o.new_token_ids) for o in outputs)
        produced += n
        if first_tokens_at is None and n:
            # Every prompt is computed in the first step: time decoding from here.
            first_tokens_at = time.perf_counter()
            first_tokens_cpu = time.process_time()
            continue
        decode_steps += 1
        decode_tokens += n
        # Sequences in this step's forward pass (those still running, finished now included).
        decode_rows += len(outputs)
    ended = time.perf_counter()
    decode_seconds = ended - (first_tokens_at or started)
    # This process's CPU seconds (all its threads): less at the mercy of other processes
    # than the wall clock on a shared machine, though not immune (caches, memory, SMT).
    decode_cpu = time.process_time() - first_tokens_cpu
    return {
        "tokens": produced,
        "seconds": ended - started,
        "decode_tok_s": decode_tokens / decode_seconds if decode_seconds else 0.0,
        "decode_tok_cpu_s": decode_tokens / decode_cpu if decode_cpu else 0.0,
        # Tokens a sequence gets from one forward pass (1.0 without speculation).
        "tokens_per_forward": decode_tokens / decode_rows if decode_rows else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "build" / "bench_model_1b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--workloads", default="repeat,copy,fresh")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    settings = dict(
        dtype=args.dtype, cpu_threads=args.threads, kv_cache_memory_gb=1.0, max_model_len=1024
    )
    base = make_engine(args.model, **settings)
    spec = make_engine(
        args.model, speculative_method="ngram", num_speculative_tokens=args.k, **settings
    )
    # The speculative engine shares the baseline's weights: one copy in memory, and
    # both run the very same numbers.
    spec.runner.model = base.runner.model
    spec.model = base.model
    print(f"# {today()} {machine()}; model {args.model.name}, {args.dtype}, k={args.k}")
    rows = []
    for workload in args.workloads.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            requests = build_requests(base, workload, batch, args.max_tokens, args.model)
            runs: dict[str, list[dict[str, float]]] = {"base": [], "spec": []}
            before = _spec_counts(spec)
            meter = ContentionMeter()
            meter.start()
            for _ in range(args.rounds):
                runs["base"].append(run_once(base, requests))
                runs["spec"].append(run_once(spec, requests))
            others = meter.stop()
            after = _spec_counts(spec)
            drafted = after["draft_tokens"] - before["draft_tokens"]
            accepted = after["accepted_tokens"] - before["accepted_tokens"]
            base_tok_s = statistics.median(r["decode_tok_s"] for r in runs["base"])
            spec_tok_s = statistics.median(r["decode_tok_s"] for r in runs["spec"])
            base_cpu = statistics.median(r["decode_tok_cpu_s"] for r in runs["base"])
            spec_cpu = statistics.median(r["decode_tok_cpu_s"] for r in runs["spec"])
            row = {
                "workload": workload,
                "batch": batch,
                "draft_tokens": drafted,
                "acceptance": accepted / drafted if drafted else 0.0,
                "declined_steps": after["steps_declined"] - before["steps_declined"],
                "tokens_per_forward": statistics.median(
                    r["tokens_per_forward"] for r in runs["spec"]
                ),
                "base_tok_s": base_tok_s,
                "spec_tok_s": spec_tok_s,
                "ratio": spec_tok_s / base_tok_s if base_tok_s else 0.0,
                "ratio_per_cpu_second": spec_cpu / base_cpu if base_cpu else 0.0,
                "others_cpu": others,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        "| workload | batch | acceptance | tokens/forward | base tok/s | spec tok/s | ratio "
        "| ratio per CPU-second | others_cpu |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workload']} | {r['batch']} | {r['acceptance']:.0%} "
            f"({r['draft_tokens']} drafted) | {r['tokens_per_forward']:.2f} | "
            f"{r['base_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['ratio']:.2f}x | "
            f"{r['ratio_per_cpu_second']:.2f}x | "
            f"{r['others_cpu']:.0%} |"
        )
    return 0


def _spec_counts(engine) -> dict[str, int]:
    stats = engine.speculator.stats
    return {
        "draft_tokens": stats.draft_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "steps_declined": stats.steps_declined,
    }


if __name__ == "__main__":
    sys.exit(main())
