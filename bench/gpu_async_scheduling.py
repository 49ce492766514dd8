"""Async scheduling on a lent GPU: decode rates with the overlap off, then on, in one engine
with its decode CUDA graphs; run by bench/gpu.sh after gpu_bench.py. Prints a table, writes JSON.

    python bench/gpu_async_scheduling.py [--out DIR] [--shape llama3-8b] [--model-dir DIR]
        [--batch-sizes 1,64] [--prompt-len 128] [--output-len 128] [--attention torch]

gpu_bench.py's decode engine (a Llama-3-8B-shaped random bf16 model, weights drawn on
the device, or `--model-dir`'s checkpoint) with async scheduling (engine/async_scheduling.py:
step n+1 launched before step n's draws reach the host) off, then on, at each batch size:
decode tok/s, ms per step, the share of the bandwidth floor (a device copy's rate, as in
gpu_bench.py) and on / off. The batch-1 row with the overlap is judged against the same
target as gpu_bench.py's (>= 85% of the floor). Without graphs (a CPU dry run:
`--device cpu --shape bench --batch-sizes 2`, or a failed capture) both run eagerly.
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
    copy_bandwidth,
    decode_arguments,
    decode_engine,
    decode_rows,
    decode_setup,
    decode_summary_rows,
    decode_weight_bytes,
    graphs_report,
    random_model_arguments,
)


def overlap_off_and_on(
    model_dir: Path | None,
    shape: str,
    device: torch.device,
    batches: list[int],
    prompt_len: int,
    output_len: int,
    report: dict[str, Any],
    attention: str,
) -> list[dict[str, Any]]:
    engine = decode_engine(model_dir, shape, device, batches, attention)
    report["weight_bytes"] = decode_weight_bytes(engine.model)
    graphs = graphs_report(engine)
    if graphs is not None:
        report["cuda_graphs"] = graphs
    use_graphs = graphs is not None
    modes = [(use_graphs, False), (use_graphs, True)]  # (CUDA graphs, async scheduling)
    rows = decode_rows(engine, device, modes, batches, prompt_len, output_len, report)
    engine.close()
    del engine
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode_arguments(parser)
    random_model_arguments(parser)
    args = parser.parse_args(argv)
    device, batches = decode_setup(args)
    gpu = GpuReport(device, args.out, "gpu_async_scheduling", decode_summary_rows)
    gpu.section("copy_bandwidth_gb_s", lambda: copy_bandwidth(device) / 1e9)
    shape = (args.model_dir, args.shape, device, batches, args.prompt_len, args.output_len)
    gpu.section("engine", overlap_off_and_on, *shape, gpu.data, args.attention)
    gpu.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
