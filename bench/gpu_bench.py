"""GPU checks for a lent H100/H200, run by bench/gpu.sh; prints one summary table, writes JSON.

    python bench/gpu_bench.py [--out DIR] [--shape llama3-8b] [--batch-sizes 1,64]
        [--attention torch] [--probe-shape llama3-1b] [--pytest-log FILE]

0. Load-memory probe: a random `--probe-shape` checkpoint written to disk and
   loaded through LLMEngine (the real loader), once with a tiny KV cache (the
   load's own peak allocation against the bf16 weight bytes; reserved vs
   allocated after it; free memory) and once with kv_cache_memory_fraction 0.90
   (the KV blocks it sizes, against 0.90 x the memory free after the weights).
1. Logits: the engine against transformers on the same device, on a small random
   Llama, in fp32 (torch attention, TF32 off) and bf16 (the backend `auto`
   picks), for a whole prompt, chunks that straddle KV blocks, and one token at
   a time (eager; tests/test_gpu.py compares the CUDA graphs with the eager path).
2. Bandwidth: a device-to-device copy; its rate (bytes read + written per
   second) gives the floor of a decode step, which must read every weight once
   (all but the input embedding, of which it reads one row per sequence):
   weight bytes / bandwidth.
3. Decode throughput on a Llama-3-8B-shaped random bf16 model at each batch size,
   with the engine's decode CUDA graphs off and on (one engine, one process,
   `--attention` backend, torch by default; async scheduling on): 128 random
   prompt tokens, 128 output tokens (ignore_eos, T=0.8, top_p=0.95, top_k=50).
   Decode tok/s counts the steps after the prefill only; it is compared with the
   bandwidth floor and with transformers `generate`. The weights are drawn on the
   device (no 16 GB checkpoint to write and read back); transformers gets its own
   random weights of the same shapes. `--model-dir DIR` uses a checkpoint folder
   instead.

Async scheduling on against off is bench/gpu_async_scheduling.py; decode at
tensor_parallel_size N, bench/gpu_tensor_parallel.py (helpers: bench/gpu_common.py).

The table has a row per check with a verdict; the decode target is batch-1 decode
with CUDA graphs at >= 85% of the bandwidth floor. `--pytest-log` adds the
`pytest -m gpu` counts. `--device cpu --shape bench --probe-shape bench
--batch-sizes 2` runs the same code on a CPU as a dry run (no graphs there).
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_common import (  # noqa: E402
    GIB,
    SAMPLING,
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
    random_model_arguments,
    sync,
    write_random_model_config,
)

from flashserve.config import EngineConfig  # noqa: E402
from flashserve.engine.llm_engine import LLMEngine  # noqa: E402


def check_logits(device: torch.device) -> list[dict[str, Any]]:
    import transformers

    from tests.engine_harness import engine_logits
    from tests.tiny_models import save_tiny_llama

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = save_tiny_llama(
        Path(tempfile.mkdtemp()), vocab_size=1024, head_dim=64
    )  # 4 query heads of 64, 2 KV heads (the helper's defaults otherwise)
    tokens = torch.randint(0, 1024, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    # Allowed max |diff| as a share of the largest logit: fp32 differs by
    # summation order only; bf16 by a few roundings of 8-bit mantissas.
    for dtype, backend, tolerance in (("float32", "torch", 1e-4), ("bfloat16", "auto", 0.03)):
        torch_dtype = getattr(torch, dtype)
        reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        reference = reference.to(device).eval()
        with torch.no_grad():
            expected = reference(torch.tensor([tokens], device=device)).logits[0].float()
        del reference
        config = EngineConfig(
            device=device.type, dtype=dtype, attention_backend=backend,
            kv_cache_memory_fraction=0.02, kv_cache_memory_gb=0.05, max_model_len=1024,
            cuda_graphs=False,
        )  # fmt: skip
        engine = LLMEngine(config, folder)
        for chunk in (300, 37, 1):
            got = engine_logits(engine, tokens, chunk).float()
            err = (got - expected).abs().max().item()
            rows.append(
                {
                    "dtype": dtype,
                    "backend": engine.attention_backend,
                    "chunk": chunk,
                    "max_abs_err": err,
                    "max_abs_logit": expected.abs().max().item(),
                    "ok": err <= tolerance * expected.abs().max().item(),
                }
            )
        del engine
    return rows


def _memory(device: torch.device) -> dict[str, float]:
    """The caching allocator's view and the driver's, in GiB."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated_gib": torch.cuda.memory_allocated(device) / GIB,
        "reserved_gib": torch.cuda.memory_reserved(device) / GIB,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "free_gib": free / GIB,
        "total_gib": total / GIB,
    }


def load_probe(device: torch.device, shape: str, attention: str) -> dict[str, Any]:
    """GPU memory around a real checkpoint load (issue 15, item 3), through the real loader.

    A random `shape` checkpoint is written to disk and loaded by LLMEngine twice:
    first with a tiny KV cache, so the peak allocation is the load's own (it should
    stay near the bf16 weight bytes: weights created in fp32 and then cast peak at
    3x), and to read what the allocator keeps cached after it (reserved minus
    allocated: memory mem_get_info counts as used); then with config.yaml's
    kv_cache_memory_fraction, to see the KV blocks the engine sizes from it. If the
    cache is released before measuring, those blocks fill ~fraction x (free after
    the load), not fraction x (free - cache).
    """
    from make_bench_model import make_bench_model

    folder = make_bench_model(Path(tempfile.mkdtemp(prefix=f"probe-{shape}-")), shape, device.type)
    checkpoint_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    report: dict[str, Any] = {"shape": shape, "checkpoint_gb": checkpoint_bytes / 1e9}
    # 0.001 of an H200's free memory is ~0.14 GiB: the first load's peak is its own.
    for label, fraction in (("small_kv", 0.001), ("config_kv", 0.90)):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before = _memory(device)
        config = EngineConfig(
            device=device.type, dtype="bfloat16", attention_backend=attention,
            kv_cache_memory_fraction=fraction, kv_cache_memory_gb=0.5, max_model_len=4096,
            cuda_graphs=False,
        )  # fmt: skip
        started = time.perf_counter()
        engine = LLMEngine(config, folder)
        sync(device)
        seconds = time.perf_counter() - started
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        kv = sum(k.numel() * k.element_size() * 2 for k, _ in engine.runner.kv_caches)
        report[label] = {
            "load_s": seconds,
            "weights_gib": weights / GIB,
            "kv_blocks": engine.block_manager.num_blocks,
            "block_size": engine.block_size,
            "kv_gib": kv / GIB,
            "before": before,
            "after": _memory(device),
            "phases_s": engine.startup_seconds,
        }
        del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def engine_decode(
    model_dir: Path | None,
    shape: str,
    device: torch.device,
    batches: list[int],
    prompt_len: int,
    output_len: int,
    report: dict[str, Any],
    attention: str = "torch",
) -> list[dict[str, Any]]:
    """Decode rates with CUDA graphs off, then on, in one engine (graphs captured at start)."""
    engine = decode_engine(model_dir, shape, device, batches, attention)
    report["weight_bytes"] = decode_weight_bytes(engine.model)
    graphs = graphs_report(engine)
    if graphs is not None:
        report["cuda_graphs"] = graphs
    modes = [(False, True), (True, True)]  # (CUDA graphs, async scheduling)
    rows = decode_rows(engine, device, modes, batches, prompt_len, output_len, report)
    engine.close()
    del engine
    gc.collect()
    return rows


def hf_generate(
    model_dir: Path | None,
    shape: str,
    device: torch.device,
    batches: list[int],
    prompt_len: int,
    output_len: int,
) -> list[dict[str, Any]]:
    import transformers

    if model_dir is None:
        config = transformers.AutoConfig.from_pretrained(write_random_model_config(shape))
        with torch.device(device):  # initialised on the device: seconds, not minutes
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def run(batch: int, new: int) -> float:
        ids = torch.randint(1000, vocab, (batch, prompt_len), generator=gen).to(device)
        sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                max_new_tokens=new, min_new_tokens=new, pad_token_id=0, **SAMPLING,
            )  # fmt: skip
        sync(device)
        return time.perf_counter() - started

    run(1, 4)  # warm-up
    rows = []
    for batch in batches:
        first = run(batch, 1)  # prefill + one token: what the decode rate leaves out
        total = run(batch, output_len)
        rows.append(
            {
                "batch": batch,
                "decode_tok_s": batch * (output_len - 1) / max(total - first, 1e-9),
                "end_to_end_tok_s": batch * output_len / total,
            }
        )
    return rows


def _pytest_result(log: Path | None) -> tuple[str, str]:
    """pytest's final counts line from its log, and ok / FAILED."""
    if log is None or not log.is_file():
        return "not run", "-"
    lines = [line.strip("= ") for line in log.read_text().splitlines() if line.strip()]
    counts = [line for line in lines if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if not counts:
        return f"no summary ({lines[-1][:60] if lines else 'empty log'})", "FAILED"
    last = counts[-1]
    return last, "FAILED" if re.search(r"failed|error", last) else "ok"


def summary_rows(report: dict[str, Any]) -> list[Row]:
    """(check, result, verdict) rows: everything gpu_bench reports, in one table."""
    rows: list[Row] = []
    result, verdict = _pytest_result(report.get("pytest_log"))
    rows.append(("pytest -m gpu", result, verdict))

    probe = report.get("load_probe")
    if isinstance(probe, dict) and "small_kv" in probe:
        small, full = probe["small_kv"], probe["config_kv"]
        w = small["weights_gib"]
        after = small["after"]
        if after:
            # The peak of weights + a tiny KV cache, or the load's own if it is higher.
            peak = after["peak_allocated_gib"] - small["before"]["allocated_gib"]
            ratio = peak / w
            rows.append(
                (
                    f"load peak ({probe['shape']}, {probe['checkpoint_gb']:.1f} GB)",
                    f"{peak:.2f} GiB allocated at peak for {w:.2f} GiB of bf16 weights "
                    f"(+{small['kv_gib']:.2f} KV) = {ratio:.2f}x",
                    "ok" if ratio <= 1.3 else "NOT ok (> 1.3x)",
                )
            )
            cached = after["reserved_gib"] - after["allocated_gib"]
            rows.append(
                (
                    "after load (tiny KV)",
                    f"allocated {after['allocated_gib']:.2f}, reserved {after['reserved_gib']:.2f} "
                    f"(cached {cached:.2f}), free {after['free_gib']:.2f} of "
                    f"{after['total_gib']:.1f} GiB",
                    "ok" if cached <= 0.5 else "cache held",
                )
            )
            # Free memory once the weights are in, as the engine should see it.
            available = after["free_gib"] + small["kv_gib"] + cached
            expected = 0.90 * available
            rows.append(
                (
                    "KV cache (fraction 0.90)",
                    f"{full['kv_blocks']} blocks x {full['block_size']} = "
                    f"{full['kv_blocks'] * full['block_size']} tokens, {full['kv_gib']:.2f} GiB; "
                    f"0.90 x {available:.2f} GiB free after weights = {expected:.2f}",
                    "ok" if full["kv_gib"] >= 0.95 * expected else "SHORT",
                )
            )
        else:
            rows.append(
                ("load probe", f"{w:.2f} GiB weights, {full['kv_blocks']} KV blocks (CPU)", "-")
            )
    elif isinstance(probe, dict):
        rows.append(("load probe", probe.get("error", "?")[:100], "FAILED"))

    logits = report.get("logits")
    if isinstance(logits, list):
        for r in logits:
            rows.append(
                (
                    f"logits vs transformers, {r['dtype']} {r['backend']} chunk {r['chunk']}",
                    f"max abs diff {r['max_abs_err']:.2e} (max abs logit {r['max_abs_logit']:.2f})",
                    "ok" if r["ok"] else "MISMATCH",
                )
            )
    elif isinstance(logits, dict):
        rows.append(("logits vs transformers", logits.get("error", "?")[:100], "FAILED"))

    rows.extend(decode_summary_rows(report))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode_arguments(parser)
    random_model_arguments(parser)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--probe-shape", default="llama3-1b", help="checkpoint for the load probe")
    parser.add_argument("--pytest-log", type=Path, default=None, help="pytest -m gpu output")
    args = parser.parse_args(argv)
    device, batches = decode_setup(args)
    gpu = GpuReport(device, args.out, "gpu_bench", summary_rows)
    report = gpu.data
    report["pytest_log"] = args.pytest_log
    report["out_dir"] = args.out
    gpu.section("load_probe", load_probe, device, args.probe_shape, args.attention)
    gpu.section("logits", check_logits, device)
    gpu.section("copy_bandwidth_gb_s", lambda: copy_bandwidth(device) / 1e9)

    shape = (args.model_dir, args.shape, device, batches, args.prompt_len, args.output_len)
    # transformers first: should the engine's graphs break the CUDA context, the rest is in.
    if not args.skip_hf:
        gpu.section("hf", hf_generate, *shape)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gpu.section("engine", engine_decode, *shape, report, args.attention)
    gpu.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
