"""What the GPU benchmarks share (bench/gpu_bench.py, gpu_async_scheduling.py,
gpu_tensor_parallel.py): the decode-rate measurement on one engine, random weights drawn
on the device, copy bandwidth, and the summary table each of them prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT / "packages", REPO_ROOT, REPO_ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from flashserve.config import EngineConfig  # noqa: E402
from flashserve.engine.llm_engine import LLMEngine  # noqa: E402
from flashserve.engine.sampling_params import SamplingParams  # noqa: E402

SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=50)
SEED = 20261129
INIT_STD = 0.02
GIB = 1 << 30
# A table row: (check, result, verdict).
Row = tuple[str, str, str]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 10
    started = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * reps / (time.perf_counter() - started)


def write_random_model_config(shape: str) -> Path:
    """A folder with only config.json (+ generation_config.json) for the given shape."""
    from make_bench_model import make_config

    folder = Path(tempfile.mkdtemp(prefix=f"random-{shape}-"))
    (folder / "config.json").write_text(json.dumps(make_config(shape), indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2})
    )
    return folder


def load_random_model(model_dir, cfg, backend, dtype, device, max_positions):
    """Stands in for flashserve.models.loader.load_model: random weights drawn on the device."""
    from flashserve.models.loader import build_model

    model = build_model(cfg, backend, dtype, device, max_positions)
    gen = torch.Generator(device).manual_seed(SEED)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights; the bench shapes have no biases
            else:
                param.normal_(0.0, INIT_STD, generator=gen)
    return model


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: all but the input embedding (one row each)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        embed = model.embed_tokens.weight
        total -= embed.numel() * embed.element_size()
    return total


def decode_engine(
    model_dir: Path | None,
    shape: str,
    device: torch.device,
    batches: list[int],
    attention: str = "torch",
    tensor_parallel: int = 1,
) -> LLMEngine:
    """A bf16 engine with decode graphs up to the largest batch: `model_dir`'s checkpoint,
    or without one random `shape` weights drawn on the device (no 16 GB checkpoint to write
    and read back)."""
    config = EngineConfig(
        device=device.type, dtype="bfloat16", max_model_len=2048, attention_backend=attention,
        kv_cache_memory_fraction=0.3, kv_cache_memory_gb=2.0,
        cuda_graph_max_batch=max(batches), tensor_parallel_size=tensor_parallel,
    )  # fmt: skip
    if model_dir is None:
        with mock.patch("flashserve.engine.startup.load_model", load_random_model):
            return LLMEngine(config, write_random_model_config(shape))
    return LLMEngine(config, model_dir)


def graphs_report(engine: LLMEngine) -> dict[str, Any] | None:
    """The decode graphs the engine captured at start, or None (CPU, or capture failed)."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    return {
        "count": len(graphs.keys),
        "batch_sizes": graphs.batch_sizes,
        "table_widths": graphs.table_widths,
        "capture_s": graphs.capture_seconds,
        "capture_mib": graphs.capture_bytes / (1 << 20),
    }


def add_requests(engine: LLMEngine, batch: int, prompt_len: int, output_len: int, tag: str):
    """`batch` random prompts, sampled as SAMPLING says, for output_len tokens each."""
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, **SAMPLING)
    for i in range(batch):
        prompt = torch.randint(1000, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"{tag}-{batch}-{i}", prompt, params)


def run_batch(engine: LLMEngine, device, batch: int, prompt_len: int, output_len: int, tag: str):
    add_requests(engine, batch, prompt_len, output_len, tag)
    graphs = engine.runner.graphs
    replays = graphs.replays if graphs is not None else 0
    sync(device)
    started = time.perf_counter()
    tokens = sum(len(o.new_token_ids) for o in engine.step())  # the prefill (one step)
    sync(device)
    prefilled = time.perf_counter()
    steps = 0
    while engine.has_work():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    sync(device)
    done = time.perf_counter()
    return {
        "batch": batch,
        "attention": engine.attention_backend,
        "prefill_s": prefilled - started,
        "decode_steps": steps,
        "graph_replays": (graphs.replays if graphs is not None else 0) - replays,
        "decode_step_ms": (done - prefilled) / max(steps, 1) * 1e3,
        "decode_tok_s": (tokens - batch) / (done - prefilled),
        "end_to_end_tok_s": tokens / (done - started),
    }


def decode_rows(
    engine: LLMEngine,
    device: torch.device,
    modes: list[tuple[bool, bool]],
    batches: list[int],
    prompt_len: int,
    output_len: int,
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    """Decode rates at each batch size for each (CUDA graphs, async scheduling) mode, in
    order, on one engine; modes with graphs are skipped where none were captured. A
    failure with graphs is kept in report["engine_graphs_error"] with the rows so far."""
    rows = []
    for use_graphs, overlap in modes:
        if use_graphs and engine.runner.graphs is None:
            continue  # CPU, or capture failed (the engine logged why)
        engine.runner.use_graphs = use_graphs
        engine.async_scheduling = overlap
        tag = f"g{use_graphs}a{overlap}"
        try:
            run_batch(engine, device, 1, prompt_len, 16, "warm")
            for batch in batches:
                row = run_batch(engine, device, batch, prompt_len, output_len, tag)
                rows.append({"cuda_graphs": use_graphs, "async_scheduling": overlap, **row})
                print(f"[engine] {json.dumps(rows[-1])}", flush=True)
        except Exception as exc:  # keep the eager rows if the graphs fail
            if not use_graphs:
                raise
            report["engine_graphs_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    return rows


def decode_summary_rows(report: dict[str, Any]) -> list[Row]:
    """The bandwidth floor, the captured graphs and one row per decode rate in
    report["engine"], each against the floor, eager, no overlap and transformers where
    the report has them; then the failures of those parts."""
    rows: list[Row] = []
    bw = report.get("copy_bandwidth_gb_s")
    wb = report.get("weight_bytes")
    floor_ms = wb / (bw * 1e9) * 1e3 if isinstance(bw, float) and wb else None
    if floor_ms:
        rows.append(
            (
                "bandwidth floor",
                f"copy {bw:.0f} GB/s; {wb / 1e9:.2f} GB of weights per decode step -> "
                f"{floor_ms:.2f} ms/step",
                "-",
            )
        )
    graphs = report.get("cuda_graphs")
    if graphs:
        rows.append(
            (
                "CUDA graphs captured",
                f"{graphs['count']} (batch {graphs['batch_sizes'][0]}..{graphs['batch_sizes'][-1]}, "
                f"widths {graphs['table_widths']}) in {graphs['capture_s']:.1f} s, "
                f"{graphs['capture_mib']:.0f} MiB",
                "ok" if graphs["capture_mib"] > 0 else "0 MiB?",
            )
        )
    hf = {r["batch"]: r for r in report.get("hf", []) if isinstance(report.get("hf"), list)}
    engine = report.get("engine")
    if isinstance(engine, list):
        eager = {r["batch"]: r for r in engine if not r["cuda_graphs"]}
        serial = {r["batch"]: r for r in engine if not r.get("async_scheduling", True)}
        for r in engine:
            mode = "graphs on " if r["cuda_graphs"] else "graphs off"
            overlap = r.get("async_scheduling", True)
            mode += ", async scheduling" if overlap else ", no overlap"
            result = f"{r['decode_tok_s']:.0f} tok/s, {r['decode_step_ms']:.2f} ms/step"
            verdict = "-"
            if floor_ms:
                ceiling = r["batch"] / floor_ms * 1e3
                result += f", {r['decode_tok_s'] / ceiling:.0%} of the floor's {ceiling:.0f}"
            notes = []
            if r["cuda_graphs"]:
                notes.append(f"{r['graph_replays']}/{r['decode_steps']} replayed")
                if r["batch"] in eager:
                    notes.append(
                        f"{r['decode_tok_s'] / eager[r['batch']]['decode_tok_s']:.2f}x off"
                    )
                if r["batch"] == 1 and floor_ms and overlap:
                    share = r["decode_tok_s"] * floor_ms / 1e3
                    verdict = "met" if share >= 0.85 else "NOT met (target 85%)"
            # A report holds no-overlap rows only in the graph mode of its overlap rows.
            if overlap and r["batch"] in serial:
                ratio = r["decode_tok_s"] / serial[r["batch"]]["decode_tok_s"]
                notes.append(f"{ratio:.2f}x no overlap")
            if notes:
                result += f" ({', '.join(notes)})"
            if r["batch"] in hf:
                result += f"; transformers {hf[r['batch']]['decode_tok_s']:.0f} tok/s"
            rows.append((f"decode batch {r['batch']}, {mode} ({r['attention']})", result, verdict))
    for name in ("engine", "hf", "copy_bandwidth_gb_s"):
        if isinstance(report.get(name), dict) and "error" in report[name]:
            rows.append((name, report[name]["error"][:100], "FAILED"))
    if "engine_graphs_error" in report:
        rows.append(("engine with CUDA graphs", report["engine_graphs_error"][:100], "FAILED"))
    return rows


def environment(device: torch.device) -> dict[str, Any]:
    """The report's first keys: the device, torch and flash_attn versions."""
    try:
        import flash_attn

        flash = flash_attn.__version__
    except ImportError:
        flash = "not installed"
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "flash_attn": flash,
    }


class GpuReport:
    """One benchmark's results (`data`, written as <name>.json) and its summary table
    (<name>.txt: check | result | verdict, the rows `rows(data)` makes), in `out_dir`."""

    def __init__(
        self,
        device: torch.device,
        out_dir: Path,
        name: str,
        rows: Callable[[dict[str, Any]], list[Row]],
    ) -> None:
        self.data: dict[str, Any] = environment(device)
        self.out_dir, self.name, self.rows = out_dir, name, rows

    def section(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one part, keep its result or its error, and rewrite the table."""
        started = time.perf_counter()
        try:
            self.data[key] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
            self.data[key] = {
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(),
            }
            print(f"[{key}] FAILED: {exc}", flush=True)
        print(f"[{key}] {time.perf_counter() - started:.0f}s", flush=True)
        # A run cut short by gpu.sh's timeout still leaves its table.
        self._write_table()
        return self.data[key]

    def table(self) -> str:
        data = self.data
        head = (
            f"GPU checks: {data['device_name']}, torch {data['torch']}, "
            f"flash_attn {data['flash_attn']}"
        )
        rows = [("check", "result", "verdict"), *self.rows(data)]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head, ""]
        for n, row in enumerate(rows):
            lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
            if n == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)

    def finish(self) -> None:
        """Print the table; write it and the results as JSON."""
        print("\n" + self._write_table(), flush=True)
        (self.out_dir / f"{self.name}.json").write_text(
            json.dumps(self.data, indent=2, default=str)
        )

    def _write_table(self) -> str:
        text = self.table()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{self.name}.txt").write_text(text + "\n")
        return text


def random_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model-dir (a checkpoint folder) or else random weights of --shape."""
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="a checkpoint folder (default: random weights)"
    )


def decode_setup(args: argparse.Namespace) -> tuple[torch.device, list[int]]:
    """The device and batch sizes decode_arguments' options name."""
    return torch.device(args.device), [int(b) for b in args.batch_sizes.split(",")]


def decode_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every GPU decode benchmark takes: where to write, device, batches, lengths."""
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "gpu_out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--attention", default="torch", help="auto | torch | flash_attn")
