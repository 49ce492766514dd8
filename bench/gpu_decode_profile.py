"""Where a decode step's time goes on a lent GPU: the step's wall against the bandwidth
floor, the same weights read by a chain of bare matmuls, and the step's kernels by name.

    python bench/gpu_decode_profile.py [--out DIR] [--shape llama3-8b] [--batch 1]
        [--steps 32] [--attention torch] [--trace]

gpu_bench.py's decode engine (random bf16 weights drawn on the device, decode CUDA
graphs, async scheduling), `--batch` requests decoding. Reported, per decode step:
1. wall: engine.step() in a loop, as gpu_bench.py times it;
2. matmul floor: every weight the step reads, multiplied by a [batch, in] input in one
   CUDA graph of bare F.linear calls, i.e. what cuBLAS reaches on these shapes;
3. copy floor: weight bytes / a device copy's rate;
4. torch.profiler over `--steps` steps: device time per kernel name (inside graph
   replays too), the device's busy time per step against the wall (the rest is the
   device waiting on the host), and the host-side ops by self CPU time; with `--trace`
   also its Chrome trace (decode_trace.json.gz).
A CPU dry run (`--device cpu --shape bench`) runs 1 and 4 without device timings.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gpu_common import (  # noqa: E402
    add_requests,
    copy_bandwidth,
    decode_engine,
    decode_weight_bytes,
    sync,
)


def matmul_chain_ms(model: torch.nn.Module, batch: int, device: torch.device) -> dict[str, Any]:
    """One [batch, in] x W^T per weight a decode step reads, back to back in a CUDA graph."""
    embed = getattr(getattr(model, "embed_tokens", None), "weight", None)
    tied = getattr(model, "lm_head", None) is None
    weights = [
        p
        for p in model.parameters()
        if p.dim() == 2 and (tied or embed is None or p.data_ptr() != embed.data_ptr())
    ]
    inputs = {
        w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype, device=device) for w in weights
    }
    total_bytes = sum(w.numel() * w.element_size() for w in weights)

    def chain() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    for _ in range(3):
        chain()
    sync(device)
    reps = 20
    started = time.perf_counter()
    for _ in range(reps):
        chain()
    sync(device)
    eager_ms = (time.perf_counter() - started) / reps * 1e3
    report = {"weights": len(weights), "bytes": total_bytes, "eager_ms": eager_ms}
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            chain()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        for _ in range(3):
            graph.replay()
        sync(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        sync(device)
        report["graph_ms"] = begin.elapsed_time(end) / reps
    return report


def start_decoding(engine, batch: int, prompt_len: int, tokens: int) -> None:
    add_requests(engine, batch, prompt_len, tokens, "profile")
    engine.step()  # the prefill
    for _ in range(8):
        engine.step()


def step_wall_ms(engine, device: torch.device, steps: int) -> float:
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    return (time.perf_counter() - started) / steps * 1e3


def profiled_steps(
    engine, device: torch.device, steps: int, trace_dir: Path | None
) -> dict[str, Any]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(device)
        wall = time.perf_counter() - started
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    host: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            elapsed = event.time_range.elapsed_us()
            kernels[event.name][0] += elapsed
            kernels[event.name][1] += 1
            intervals.append((event.time_range.start, event.time_range.end))
        else:
            host[event.name][0] += event.self_cpu_time_total
            host[event.name][1] += 1
    busy = _union_us(intervals)
    if trace_dir is not None:
        trace = trace_dir / "decode_trace.json"
        prof.export_chrome_trace(str(trace))
        (trace_dir / "decode_trace.json.gz").write_bytes(gzip.compress(trace.read_bytes()))
        trace.unlink()

    def top(table: dict[str, list[float]], n: int) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1][0])[:n]
        return [
            {"name": name[:110], "us_per_step": t / steps, "calls_per_step": c / steps}
            for name, (t, c) in rows
        ]

    return {
        "steps": steps,
        "wall_ms_per_step": wall / steps * 1e3,
        "device_busy_ms_per_step": busy / steps / 1e3,
        "kernel_ms_per_step": sum(t for t, _ in kernels.values()) / steps / 1e3,
        "kernels": top(kernels, 30),
        "host_ops": top(host, 25),
    }


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (kernels of streams overlap)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/gpu_out"))
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--attention", default="torch")
    parser.add_argument("--trace", action="store_true", help="also write the Chrome trace")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    engine = decode_engine(None, args.shape, device, [args.batch], args.attention)
    report: dict[str, Any] = {"shape": args.shape, "batch": args.batch}
    weight_bytes = decode_weight_bytes(engine.model)
    report["weight_gb"] = weight_bytes / 1e9
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        report["copy_gb_s"] = bandwidth / 1e9
        report["copy_floor_ms"] = weight_bytes / bandwidth * 1e3
    report["matmul_chain"] = matmul_chain_ms(engine.model, args.batch, device)
    print(json.dumps(report), flush=True)
    # Enough tokens for the warm-up, the timed steps and the profiled ones.
    start_decoding(engine, args.batch, args.prompt_len, 8 + 3 * args.steps + 16)
    report["step_wall_ms"] = step_wall_ms(engine, device, args.steps)
    report["graph_replays"] = engine.runner.graphs.replays if engine.runner.graphs else 0
    print(json.dumps(report), flush=True)
    report["profile"] = profiled_steps(engine, device, args.steps, args.out if args.trace else None)
    (args.out / "decode_profile.json").write_text(json.dumps(report, indent=1))
    profile = report["profile"]
    print(
        f"\nbatch {args.batch}: step {report['step_wall_ms']:.2f} ms wall"
        f" | copy floor {report.get('copy_floor_ms', float('nan')):.2f} ms"
        f" | matmul chain {report['matmul_chain'].get('graph_ms', float('nan')):.2f} ms in a graph,"
        f" {report['matmul_chain']['eager_ms']:.2f} ms eager"
        f" | profiled: {profile['wall_ms_per_step']:.2f} ms wall,"
        f" device busy {profile['device_busy_ms_per_step']:.2f} ms"
    )
    print("\nkernels (us per step, calls per step):")
    for row in profile["kernels"][:20]:
        print(f"  {row['us_per_step']:9.1f} {row['calls_per_step']:6.1f}  {row['name']}")
    print("\nhost ops by self CPU time (us per step, calls per step):")
    for row in profile["host_ops"][:15]:
        print(f"  {row['us_per_step']:9.1f} {row['calls_per_step']:6.1f}  {row['name']}")
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
