"""Workload W1 (and the concurrency sweep) on vLLM's CPU build; prints one JSON line.

Runs inside vLLM's own virtualenv (build/vllm-venv), never the project's: it
imports nothing from flashserve. bench/throughput.py starts it as a subprocess:

    build/vllm-venv/bin/python bench/vllm_w1.py --model build/bench_model \
        --prompts prompts.json --output-len 128 [--dtype bfloat16] [--batch-sizes 64]

prompts.json holds a list of token-id lists, taken in order and never twice (vLLM
caches prompt prefixes): one for the warm-up, then for each batch size B and each
try the next B, submitted at once. The JSON gives wall time and output tokens per B.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="64")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--quiet-wait", type=float, default=0.0)
    parser.add_argument("--max-others", type=float, default=1.0)
    parser.add_argument("--attempts", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    # bench/_common.py needs only psutil, which vLLM depends on too.
    from _common import Gate, measured

    gate = Gate(args.quiet_wait, args.max_others, args.attempts, args.repeat)
    # KV cache budget in GiB, like the engine's kv_cache_memory_gb.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as f:
        prompts: list[list[int]] = json.load(f)
    started = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        skip_tokenizer_init=True,
        seed=0,
    )
    load_s = time.perf_counter() - started
    params = SamplingParams(
        max_tokens=args.output_len,
        min_tokens=args.output_len,
        ignore_eos=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        detokenize=False,
    )
    # Warm-up: first calls allocate and pick kernels.
    unused = iter(prompts)

    def take(count: int) -> list:
        batch = [TokensPrompt(prompt_token_ids=next(unused)) for _ in range(count)]
        return batch

    llm.generate(take(1), params, use_tqdm=False)
    runs = []
    for size in (int(b) for b in args.batch_sizes.split(",")):

        def run(size: int = size) -> tuple[float, int]:
            batch = take(size)
            started = time.perf_counter()
            outputs = llm.generate(batch, params, use_tqdm=False)
            wall = time.perf_counter() - started
            return wall, sum(len(o.outputs[0].token_ids) for o in outputs)

        # vLLM's engine core and workers are child processes: their CPU counts as ours.
        (wall, tokens), others = measured(run, gate, lambda v: v[0])
        runs.append({"batch": size, "wall_s": wall, "output_tokens": tokens, "others": others})
    print(json.dumps({"load_s": load_s, "dtype": args.dtype, "runs": runs}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
