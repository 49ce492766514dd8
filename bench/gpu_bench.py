"""GPU checks for a lent H100/H200, run by bench/gpu.sh; prints a summary, writes JSON.

    python bench/gpu_bench.py [--out DIR] [--shape llama3-8b] [--batch-sizes 1,64]

1. Logits: the engine against transformers on the same device, on a small random
   Llama, in fp32 (torch attention, TF32 off) and bf16 (the backend `auto`
   picks: flash_attn when it imports), for a whole prompt, chunks that straddle
   KV blocks, and one token at a time (eager; tests/test_gpu.py compares the
   CUDA graphs with the eager path).
2. Bandwidth: a device-to-device copy; its rate (bytes read + written per
   second) gives the floor of a decode step, which must read every weight once
   (all but the input embedding, of which it reads one row per sequence):
   weight bytes / bandwidth.
3. Decode throughput on a Llama-3-8B-shaped random bf16 model at each batch size,
   with the engine's decode CUDA graphs off and on (one engine, one process):
   128 random prompt tokens, 128 output tokens (ignore_eos, T=0.8, top_p=0.95,
   top_k=50). Decode tok/s counts the steps after the prefill only; it is
   compared with the bandwidth floor and with transformers `generate`. The
   weights are drawn on the device (bench/make_bench_model.py's config, no
   16 GB checkpoint to write and read back); transformers gets its own random
   weights of the same shapes. `--model-dir DIR` uses a checkpoint folder instead.

The target: batch-1 decode with CUDA graphs at >= 85% of the bandwidth ceiling.
`--device cpu --shape bench --batch-sizes 2` runs the same code on a CPU as a
dry run of this script (no graphs there: the engine ignores them on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any
from unittest import mock

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT / "packages", REPO_ROOT, REPO_ROOT / "bench"):
    sys.path.insert(0, str(path))

import torch  # noqa: E402

from flashserve.config import EngineConfig  # noqa: E402
from flashserve.engine.llm_engine import LLMEngine  # noqa: E402
from flashserve.engine.sampling_params import SamplingParams  # noqa: E402

SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=50)
SEED = 20261129
INIT_STD = 0.02


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_logits(device: torch.device) -> list[dict[str, Any]]:
    import transformers

    from tests.test_model_parity import engine_logits
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
    from flashserve.models import loader
    from flashserve.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, backend, max_positions)
    model = model.to_empty(device=device).to(dtype)
    loader._restore_buffers(model, cfg, max_positions, device)
    gen = torch.Generator(device).manual_seed(SEED)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights; the bench shapes have no biases
            else:
                param.normal_(0.0, INIT_STD, generator=gen)
    model.requires_grad_(False)
    return model.eval()


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: all but the input embedding (one row each)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        embed = model.embed_tokens.weight
        total -= embed.numel() * embed.element_size()
    return total


def run_batch(engine: LLMEngine, device, batch: int, prompt_len: int, output_len: int, tag: str):
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, **SAMPLING)
    for i in range(batch):
        prompt = torch.randint(1000, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"{tag}-{batch}-{i}", prompt, params)
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


def engine_decode(
    model_dir: Path | None,
    shape: str,
    device: torch.device,
    batches: list[int],
    prompt_len: int,
    output_len: int,
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    """Decode rates with CUDA graphs off, then on, in one engine (graphs captured at start)."""
    config = EngineConfig(
        device=device.type, dtype="bfloat16", max_model_len=2048,
        kv_cache_memory_fraction=0.3, kv_cache_memory_gb=2.0,
        cuda_graph_max_batch=max(batches),
    )  # fmt: skip
    if model_dir is None:
        with mock.patch("flashserve.engine.llm_engine.load_model", load_random_model):
            engine = LLMEngine(config, write_random_model_config(shape))
    else:
        engine = LLMEngine(config, model_dir)
    report["weight_bytes"] = decode_weight_bytes(engine.model)
    graphs = engine.runner.graphs
    if graphs is not None:
        report["cuda_graphs"] = {
            "count": len(graphs.keys),
            "batch_sizes": graphs.batch_sizes,
            "table_widths": graphs.table_widths,
            "capture_s": graphs.capture_seconds,
            "capture_mib": graphs.capture_bytes / (1 << 20),
        }
    rows = []
    for use_graphs in (False, True):
        if use_graphs and graphs is None:
            break  # CPU, or capture failed (the engine logged why)
        engine.runner.use_graphs = use_graphs
        try:
            run_batch(engine, device, 1, prompt_len, 16, "warm")
            for batch in batches:
                row = run_batch(engine, device, batch, prompt_len, output_len, f"g{use_graphs}")
                rows.append({"cuda_graphs": use_graphs, **row})
                print(f"[engine] {json.dumps(rows[-1])}", flush=True)
        except Exception as exc:  # keep the eager rows if the graphs fail
            if not use_graphs:
                raise
            report["engine_graphs_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    del engine, graphs
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


def section(report: dict[str, Any], name: str, fn, *args) -> Any:
    started = time.perf_counter()
    try:
        report[name] = fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        print(f"[{name}] FAILED: {exc}", flush=True)
    print(f"[{name}] {time.perf_counter() - started:.0f}s", flush=True)
    return report[name]


def summary(report: dict[str, Any]) -> str:
    lines = [f"GPU bench: {report['device_name']}, torch {report['torch']}, "
             f"flash_attn {report['flash_attn']}"]  # fmt: skip
    logits = report.get("logits")
    if isinstance(logits, list):
        for r in logits:
            lines.append(
                f"logits {r['dtype']:<8} {r['backend']:<10} chunk {r['chunk']:>3}: max |diff| "
                f"{r['max_abs_err']:.2e} (max |logit| {r['max_abs_logit']:.2f}) "
                f"{'ok' if r['ok'] else 'MISMATCH'}"
            )
    bw = report.get("copy_bandwidth_gb_s")
    wb = report.get("weight_bytes")
    floor_ms = wb / (bw * 1e9) * 1e3 if isinstance(bw, float) and wb else None
    if floor_ms:
        lines.append(
            f"copy bandwidth {bw:.0f} GB/s; weights read per decode step {wb / 1e9:.2f} GB "
            f"-> decode step floor {floor_ms:.2f} ms"
        )
    graphs = report.get("cuda_graphs")
    if graphs:
        lines.append(
            f"CUDA graphs: {graphs['count']} captured (batch {graphs['batch_sizes']}, table "
            f"widths {graphs['table_widths']}) in {graphs['capture_s']:.1f} s, "
            f"{graphs['capture_mib']:.0f} MiB"
        )
    hf = {r["batch"]: r for r in report.get("hf", []) if isinstance(report.get("hf"), list)}
    engine = report.get("engine")
    if isinstance(engine, list):
        eager = {r["batch"]: r for r in engine if not r["cuda_graphs"]}
        for r in engine:
            mode = "graphs" if r["cuda_graphs"] else "eager "
            line = (
                f"engine {mode} batch {r['batch']:>3} ({r['attention']}): decode "
                f"{r['decode_tok_s']:8.1f} tok/s, {r['decode_step_ms']:.2f} ms/step"
            )
            if r["cuda_graphs"]:
                line += f" ({r['graph_replays']}/{r['decode_steps']} steps replayed)"
                if r["batch"] in eager:
                    line += f", {r['decode_tok_s'] / eager[r['batch']]['decode_tok_s']:.2f}x eager"
            if floor_ms:
                ceiling = r["batch"] / floor_ms * 1e3
                line += (
                    f"; bandwidth ceiling {ceiling:.0f} tok/s ({r['decode_tok_s'] / ceiling:.0%})"
                )
            if r["batch"] in hf:
                h = hf[r["batch"]]
                line += (
                    f"; transformers {h['decode_tok_s']:.1f} tok/s "
                    f"(engine {r['decode_tok_s'] / h['decode_tok_s']:.2f}x)"
                )
            lines.append(line)
        target = [r for r in engine if r["cuda_graphs"] and r["batch"] == 1]
        if floor_ms and target:
            share = target[0]["decode_tok_s"] * floor_ms / 1e3
            verdict = "met" if share >= 0.85 else "NOT met"
            lines.append(
                f"target: batch-1 decode with graphs at >= 85% of the floor: {verdict} ({share:.0%})"
            )
    for name in ("logits", "engine", "hf"):
        if isinstance(report.get(name), dict) and "error" in report[name]:
            lines.append(f"{name}: {report[name]['error']}")
    if "engine_graphs_error" in report:
        lines.append(f"engine with CUDA graphs FAILED: {report['engine_graphs_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "gpu_out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="a checkpoint folder (default: random weights)"
    )
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    try:
        import flash_attn

        flash = flash_attn.__version__
    except ImportError:
        flash = "not installed"
    report: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "flash_attn": flash,
    }
    section(report, "logits", check_logits, device)
    section(report, "copy_bandwidth_gb_s", lambda: copy_bandwidth(device) / 1e9)

    shape = (args.model_dir, args.shape, device, batches, args.prompt_len, args.output_len)
    # transformers first: should the engine's graphs break the CUDA context, the rest is in.
    if not args.skip_hf:
        section(report, "hf", hf_generate, *shape)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    section(report, "engine", engine_decode, *shape, report)
    text = summary(report)
    print("\n" + text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_bench.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
