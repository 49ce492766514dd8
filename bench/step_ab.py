"""A/B of one engine change at a time, step by step, in one process and one engine.

    python bench/step_ab.py [--change decode_kernel] [--dtype auto] [--threads 2] [--busy 1]
                            [--requests 64] [--prompt-len 128] [--steps 40] [--prefills 3]

Made for a shared machine: "before" and "after" alternate step by step on the
same engine, so both see the same load and nearly the same state (a decode step
adds one token to every row, so neighbouring steps read contexts one token
apart). Decode: the W1 batch (64 rows, top_p 0.95 alone, T 0.8) after its
prefill, the variants taking turns for --steps steps each. Prefill: --prefills
fresh W1 batches per variant, alternating, each aborted after its prefill step.
Reported: medians of wall and of CPU time (this process) per step, and their
ratios. With --w1 N, also whole W1 runs (64 fresh prompts of 128 tokens, 128
output tokens each, top_p 0.95 alone), N per variant, alternating. Each change
is a context manager that switches the engine back to what it did before.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODEL, machine, make_engine, today  # noqa: E402
from w1 import Workload, run_engine  # noqa: E402


def _flag_off(
    module_name: str, flag: str
) -> Callable[[Any], contextlib.AbstractContextManager[None]]:
    """A change a module-level switch turns off: the module's `flag` False for the "before"."""
    return _set(module_name, flag, False)


@contextlib.contextmanager
def _overlap_off(engine: Any) -> Iterator[None]:
    """Steps without async scheduling (the "after" forces it on, even on a CPU)."""
    engine.async_scheduling = False
    try:
        yield
    finally:
        engine.async_scheduling = True


@contextlib.contextmanager
def _overlap_on(engine: Any) -> Iterator[None]:
    engine.async_scheduling = True
    yield


@contextlib.contextmanager
def _at_least_by_where(engine: Any = None) -> Iterator[None]:
    """certainly_kept's masked row as before: torch.where over the probabilities."""
    import torch

    from flashserve.engine import truncation

    saved = truncation._at_least
    truncation._at_least = lambda probs, floor: torch.where(probs >= floor, probs, 0.0)
    try:
        yield
    finally:
        truncation._at_least = saved


def _set(
    module_name: str, name: str, value: Any
) -> Callable[[Any], contextlib.AbstractContextManager[None]]:
    """A change a module-level setting undoes: the module's `name` = value for the "before"."""

    @contextlib.contextmanager
    def switched(engine: Any = None) -> Iterator[None]:
        module = importlib.import_module(module_name)
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, saved)

    return switched


def _threading(mode: int) -> Callable[[Any], contextlib.AbstractContextManager[None]]:
    """The CPU kernels' jobs run one way (csrc/thread_pool.c: 0 adaptive, 1 always OpenMP
    regions, 2 always the pool's workers), then back to adaptive."""

    @contextlib.contextmanager
    def switched(engine: Any = None) -> Iterator[None]:
        from flashserve.layers import native

        native.thread_pool().flashserve_pool_mode(mode)
        try:
            yield
        finally:
            native.thread_pool().flashserve_pool_mode(0)

    return switched


def _redraw_by_full_noise(kept: Any, seqs: list[Any]) -> Any:
    """The sampler's redraw before it raced in two rounds: a uniform for every token."""
    import torch

    noise = torch.empty_like(kept).uniform_()
    for r, seq in enumerate(seqs):
        if seq.generator is not None:
            noise[r].uniform_(generator=seq.generator)
    return torch.div(kept, noise.log_(), out=noise).argmin(dim=-1)


# change name -> what switches it off (the "before"), given the engine
CHANGES: dict[str, Callable[[Any], contextlib.AbstractContextManager[None]]] = {
    # decode attention as before: gather the blocks (index_select), then SDPA
    "decode_kernel": _flag_off("flashserve.layers.cpu_decode_attention", "enabled"),
    "async_scheduling": _overlap_off,
    # Identical work on both sides: the noise band of a pair on this machine.
    "none": lambda engine=None: contextlib.nullcontext(),
    "certainly_kept_keys": _at_least_by_where,
    # certainly_kept's mass by torch passes (mask, then row_sums), not csrc/mass_at_least.c
    "mass_kernel": _flag_off("flashserve.engine.truncation", "mass_kernel_enabled"),
    # the unsure rows' min-p, top-k and nucleus as torch passes (_truncate_probs), not
    # csrc/truncate_rows.c
    "truncate_kernel": _flag_off("flashserve.engine.truncation", "truncate_kernel_enabled"),
    # the unsure rows' redraw with a uniform for every token, not the two-round race
    "redraw_race": _set("flashserve.engine.sampler", "redraw", _redraw_by_full_noise),
    # RMSNorm, silu(gate) * up and rope as torch ops, not csrc/elementwise.c
    "elementwise": _flag_off("flashserve.layers.cpu_elementwise", "enabled"),
    # the residual add as a torch op before RMSNorm's kernel, not in the kernel's pass
    "add_norm": _set("flashserve.layers.cpu_elementwise", "add_rms_norm", lambda *args: None),
    # the sampler's logits copied to fp32 and divided by the temperature in two passes
    # before the race, not read raw (bf16) and divided by the race kernel as it goes
    "raw_race": _set("flashserve.engine.sampler", "_raced_raw", lambda *args: False),
    # the sampler's softmax, block sums, race and nucleus mass as torch passes, not
    # csrc/vocab_race.c
    "vocab_race": _flag_off("flashserve.engine.vocab_race", "enabled"),
    # prompt chunks longer than SHORT_CHUNK attend through SDPA, not through the paged
    # kernel one row per query
    "rows_per_query": _set("flashserve.layers.attention", "PER_QUERY_MAX_KV_BYTES", 0),
    # a prefill's MLP over all its rows at once, not in tiles of CPU_ROW_TILE rows
    "mlp_row_tiles": _set("flashserve.layers.mlp", "CPU_ROW_TILE", 1 << 62),
    # bf16 products through F.linear (oneDNN repacks the weight every call), not
    # through the weights packed once (layers/onednn_linear.py)
    "onednn_packed": _flag_off("flashserve.layers.onednn_linear", "enabled"),
    # fp32 products through torch's F.linear, not csrc/packed_gemm.c
    "packed_gemm": _flag_off("flashserve.layers.packed_gemm", "enabled"),
    # the kernels' jobs always as OpenMP regions (as before csrc/thread_pool.c), against
    # adaptive ("pool_always": against always the pool's workers)
    "adaptive_threading": _threading(1),
    "pool_always": _threading(1),
}
# change name -> what switches it on (the "after"), where the engine's default is off
AFTER: dict[str, Callable[[Any], contextlib.AbstractContextManager[None]]] = {
    "async_scheduling": _overlap_on,
    "pool_always": _threading(2),
}


def _params(work: Workload, max_tokens: int):
    from flashserve.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=work.temperature,
        top_p=work.top_p,
        top_k=work.top_k,
        ignore_eos=True,
    )


def _timed(step: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def _variant(change: str, before: bool, engine: Any) -> contextlib.AbstractContextManager[None]:
    if before:
        return CHANGES[change](engine)
    return AFTER[change](engine) if change in AFTER else contextlib.nullcontext()


def run(args: argparse.Namespace) -> dict[str, dict[str, list[tuple[float, ...]]]]:
    engine = make_engine(args.model, dtype=args.dtype, cpu_threads=args.threads)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    work = Workload(args.prompt_len, vocab, 0, 0.8, 0.95, -1)
    times: dict[str, dict[str, list[tuple[float, ...]]]] = {
        "prefill": {"before": [], "after": []},
        "decode": {"before": [], "after": []},
    }

    def add_batch(tag: str, max_tokens: int) -> list[str]:
        ids = []
        for i, prompt in enumerate(work.fresh_prompts(args.requests)):
            ids.append(f"{tag}-{i}")
            engine.add_request(ids[-1], prompt, _params(work, max_tokens))
        return ids

    # Warm-up: both variants once (first calls build kernels, allocate buffers).
    for before in (True, False):
        with _variant(args.change, before, engine):
            add_batch(f"warm-{before}", 4)
            while engine.has_work():
                engine.step()

    for rep in range(args.prefills):
        for label in ("before", "after") if rep % 2 == 0 else ("after", "before"):
            ids = add_batch(f"prefill-{rep}-{label}", 2)
            with _variant(args.change, label == "before", engine):
                times["prefill"][label].append(_timed(engine.step))
            for rid in ids:
                engine.abort(rid)

    times["W1"] = {"before": [], "after": []}
    w1 = dataclasses.replace(work, output_len=128)
    for rep in range(args.w1):
        for label in ("before", "after") if rep % 2 == 0 else ("after", "before"):
            with _variant(args.change, label == "before", engine):
                cpu = time.process_time()
                tokens, wall = run_engine(engine, w1, args.requests)
                times["W1"][label].append((wall, time.process_time() - cpu, tokens))
            print(
                f"  W1 {label}: {tokens} tokens in {wall:.1f} s, {tokens / wall:.0f} tok/s",
                flush=True,
            )

    add_batch("decode", 10**6)
    engine.step()  # the prefill
    for i in range(2 * args.steps):
        label = ("before", "after")[(i + i // 2) % 2]  # ABBA order: neither always goes first
        with _variant(args.change, label == "before", engine):
            times["decode"][label].append(_timed(engine.step))
    return times


@contextlib.contextmanager
def _busy_processes(count: int) -> Iterator[None]:
    import subprocess

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--change", choices=sorted(CHANGES), default="decode_kernel")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="decode steps per variant")
    parser.add_argument("--prefills", type=int, default=3, help="prefill steps per variant")
    parser.add_argument("--w1", type=int, default=0, help="whole W1 runs per variant")
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="processes that spin on the CPU meanwhile (another program wanting the cores)",
    )
    args = parser.parse_args(argv)

    with _busy_processes(args.busy):
        times = run(args)
    print(f"{today()}  {machine()}  change: {args.change}  dtype {args.dtype}, ", end="")
    print(f"{args.threads} threads, {args.requests} x {args.prompt_len}-token prompts", end="")
    print(f", {args.busy} busy processes meanwhile" if args.busy else "")
    print("| phase | steps each | before ms (wall) | after ms (wall) | wall ratio "
          "| before ms (CPU) | after ms (CPU) | CPU ratio |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for phase, by_label in times.items():
        if not by_label["after"]:
            continue
        if phase == "W1":
            continue
        med = {
            label: [statistics.median(t[k] for t in runs) * 1e3 for k in (0, 1)]
            for label, runs in by_label.items()
        }
        (bw, bc), (aw, ac) = med["before"], med["after"]
        print(
            f"| {phase} | {len(by_label['after'])} | {bw:.1f} | {aw:.1f} | {bw / aw:.2f}x "
            f"| {bc:.1f} | {ac:.1f} | {bc / ac:.2f}x |"
        )
    w1 = times["W1"]
    if w1["after"]:
        rates = {label: statistics.median(t[2] / t[0] for t in runs) for label, runs in w1.items()}
        cpu = {label: statistics.median(t[1] for t in runs) for label, runs in w1.items()}
        print(
            f"\nW1 (64 x 128 in, 128 out; median of {len(w1['after'])} per variant): "
            f"before {rates['before']:.0f} tok/s, after {rates['after']:.0f} tok/s, "
            f"{rates['after'] / rates['before']:.2f}x; CPU s before {cpu['before']:.1f}, "
            f"after {cpu['after']:.1f}, {cpu['before'] / cpu['after']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
