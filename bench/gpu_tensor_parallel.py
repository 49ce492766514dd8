"""Decode at tensor_parallel_size N on a machine with several GPUs: gpu_bench.py's decode
check (CUDA graphs off, then on) with the model split over N ranks. Prints a table, writes JSON.

    python bench/gpu_tensor_parallel.py --model-dir DIR [--tp 2] [--out DIR]
        [--batch-sizes 1,64] [--prompt-len 128] [--output-len 128] [--attention torch]

Needs a checkpoint folder (bench/make_bench_model.py --shape llama3-8b --device cuda
--out build/bench_model_8b writes one): every rank loads its shard from disk, so weights
drawn in this process would reach rank 0 only. Async scheduling stays as the engine sets
it (off at tp > 1). The bandwidth floor is rank 0's shard over one device's copy rate
(every rank reads its shard at once). bench/gpu.sh tensor-parallel runs
bench/tensor_parallel.py instead (W1 at tp=1 against tp=N, time in collectives); this
is the per-step view. `--device cpu --model-dir build/bench_model --batch-sizes 2` is a
CPU dry run (gloo, no graphs).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_common import (  # noqa: E402
    GpuReport,
    Row,
    copy_bandwidth,
    decode_arguments,
    decode_engine,
    decode_rows,
    decode_setup,
    decode_summary_rows,
    decode_weight_bytes,
    graphs_report,
)


def split_decode(
    model_dir: Path,
    tensor_parallel: int,
    device: torch.device,
    batches: list[int],
    prompt_len: int,
    output_len: int,
    report: dict[str, Any],
    attention: str,
) -> list[dict[str, Any]]:
    engine = decode_engine(model_dir, "", device, batches, attention, tensor_parallel)
    try:
        report["weight_bytes"] = decode_weight_bytes(engine.model)
        graphs = graphs_report(engine)
        if graphs is not None:
            report["cuda_graphs"] = graphs
        overlap = engine.async_scheduling
        modes = [(False, overlap), (True, overlap)]  # (CUDA graphs, async scheduling)
        return decode_rows(engine, device, modes, batches, prompt_len, output_len, report)
    finally:
        engine.close()
        del engine
        gc.collect()


def summary_rows(report: dict[str, Any]) -> list[Row]:
    size = ("tensor_parallel_size", f"{report['tensor_parallel_size']} ranks", "-")
    return [size, *decode_summary_rows(report)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode_arguments(parser)
    parser.add_argument(
        "--model-dir",
        type=Path,
        required=True,
        help="a checkpoint folder (e.g. bench/make_bench_model.py's): the worker ranks load it",
    )
    parser.add_argument("--tp", type=int, default=2, help="tensor_parallel_size (>= 2)")
    args = parser.parse_args(argv)
    if args.tp < 2:
        parser.error("--tp must be at least 2 (gpu_bench.py measures one GPU)")
    device, batches = decode_setup(args)
    gpu = GpuReport(device, args.out, "gpu_tensor_parallel", summary_rows)
    gpu.data["tensor_parallel_size"] = args.tp
    gpu.section("copy_bandwidth_gb_s", lambda: copy_bandwidth(device) / 1e9)
    run = (args.model_dir, args.tp, device, batches, args.prompt_len, args.output_len)
    gpu.section("engine", split_decode, *run, gpu.data, args.attention)
    gpu.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
