"""GPU checks for a lent H100/H200, run by bench/gpu.sh; prints a summary, writes JSON.

    python bench/gpu_bench.py [--out DIR] [--shape llama3-8b] [--batch-sizes 1,64]

1. Logits: the engine against transformers on the same device, on a small random
   Llama, in fp32 (torch attention, TF32 off) and bf16 (the backend `auto`
   picks: flash_attn when it imports), for a whole prompt, chunks that straddle
   KV blocks, and one token at a time.
2. Bandwidth: a device-to-device copy; its rate (bytes read + written per
   second) gives the floor of a decode step, which must read every weight once:
   weight bytes / bandwidth.
3. Decode throughput on a Llama-3-8B-shaped random bf16 model (made by
   bench/make_bench_model.py --shape llama3-8b) at each batch size: 128 random
   prompt tokens, 128 output tokens (ignore_eos, T=0.8, top_p=0.95, top_k=50).
   Decode tok/s counts the steps after the prefill only; it is compared with
   the bandwidth floor and with transformers `generate` on the same weights.

The engine has no CUDA graphs yet: every decode step launches each layer's
kernels from Python, which costs most at batch 1 (see the gap to the floor).
`--device cpu --shape bench --batch-sizes 2` runs the same code on a CPU as a
dry run of this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT / "packages", REPO_ROOT, REPO_ROOT / "bench"):
    sys.path.insert(0, str(path))

import torch  # noqa: E402

from flashserve.config import EngineConfig  # noqa: E402
from flashserve.engine.llm_engine import LLMEngine  # noqa: E402
from flashserve.engine.sampling_params import SamplingParams  # noqa: E402

SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=50)


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


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def engine_decode(
    model_dir: Path, device: torch.device, batches: list[int], prompt_len: int, output_len: int
) -> list[dict[str, Any]]:
    config = EngineConfig(
        device=device.type, dtype="bfloat16", max_model_len=2048,
        kv_cache_memory_fraction=0.3, kv_cache_memory_gb=2.0,
    )  # fmt: skip
    engine = LLMEngine(config, model_dir)
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in [1, *batches]:  # the first run warms up
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, **SAMPLING)
        for i in range(batch):
            prompt = torch.randint(1000, vocab, (prompt_len,), generator=gen).tolist()
            engine.add_request(f"d{batch}-{i}-{len(rows)}", prompt, params)
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
        rows.append(
            {
                "batch": batch,
                "attention": engine.attention_backend,
                "prefill_s": prefilled - started,
                "decode_step_ms": (done - prefilled) / max(steps, 1) * 1e3,
                "decode_tok_s": (tokens - batch) / (done - prefilled),
                "end_to_end_tok_s": tokens / (done - started),
            }
        )
    del engine
    return rows[1:]


def hf_generate(
    model_dir: Path, device: torch.device, batches: list[int], prompt_len: int, output_len: int
) -> list[dict[str, Any]]:
    import transformers

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
            f"copy bandwidth {bw:.0f} GB/s; weights {wb / 1e9:.1f} GB -> decode step floor "
            f"{floor_ms:.2f} ms"
        )
    hf = {r["batch"]: r for r in report.get("hf", []) if isinstance(report.get("hf"), list)}
    engine = report.get("engine")
    if isinstance(engine, list):
        for r in engine:
            line = (
                f"engine batch {r['batch']:>3} ({r['attention']}): decode {r['decode_tok_s']:8.1f} "
                f"tok/s, {r['decode_step_ms']:.2f} ms/step, prefill {r['prefill_s']:.2f} s"
            )
            if floor_ms:
                ceiling = r["batch"] / floor_ms * 1e3
                line += (
                    f"; bandwidth ceiling {ceiling:.0f} tok/s ({r['decode_tok_s'] / ceiling:.0%})"
                )
            if r["batch"] in hf:
                h = hf[r["batch"]]
                line += (
                    f"; transformers decode {h['decode_tok_s']:.1f} tok/s "
                    f"(engine {r['decode_tok_s'] / h['decode_tok_s']:.2f}x), end-to-end "
                    f"{r['end_to_end_tok_s']:.1f} vs {h['end_to_end_tok_s']:.1f}"
                )
            lines.append(line)
    for name in ("logits", "model", "engine", "hf"):
        if isinstance(report.get(name), dict) and "error" in report[name]:
            lines.append(f"{name}: {report[name]['error']}")
    lines.append("note: no CUDA graphs in the engine yet; batch-1 decode is launch-bound.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "gpu_out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "build" / "gpu_model")
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

    def make_model() -> str:
        from make_bench_model import make_bench_model

        if not (args.model_dir / "model.safetensors").exists():
            make_bench_model(args.model_dir, args.shape, args.device)
        report["weight_bytes"] = weight_bytes(args.model_dir)
        return str(args.model_dir)

    section(report, "model", make_model)
    shape = (args.model_dir, device, batches, args.prompt_len, args.output_len)
    section(report, "engine", engine_decode, *shape)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_hf:
        section(report, "hf", hf_generate, *shape)
    text = summary(report)
    print("\n" + text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_bench.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
