"""W1 through the real Truss server: 64 concurrent streaming AsyncOpenAI clients."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import psutil
from _common import REPO_ROOT, measured
from w1 import Result, Workload, print_row


def chat_messages(model: Path, count: int, length: int, seed: int) -> list[list[dict]]:
    """Messages whose rendered chat prompt is `length` tokens (or just under)."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    # Whole ASCII words from the vocabulary: each is usually one token after a space.
    words = sorted(
        p[1:]
        for p in tokenizer.get_vocab()
        if p.startswith("▁") and p[1:].isalpha() and p[1:].isascii()
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
    port: int, messages: list[list[dict]], work: Workload, timed: list[float] | None = None
) -> tuple[int, int, list[int]]:
    """Stream every conversation at once, each from its own client.

    The clients are made before the clock starts (`timed` gets the seconds from the
    first request to the last byte): a user's client exists before its request.
    """
    import openai

    clients = [
        openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=900
        )
        for _ in messages
    ]

    async def one(client: openai.AsyncOpenAI, conversation: list[dict]) -> tuple[int, int]:
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
        assert usage is not None, "the server sent no usage chunk"
        return usage.prompt_tokens, usage.completion_tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(c, m) for c, m in zip(clients, messages)))
    if timed is not None:
        timed.append(time.perf_counter() - started)
    await asyncio.gather(*(c.close() for c in clients))
    return sum(p for p, _ in counts), sum(c for _, c in counts), [p for p, _ in counts]


def bench_server(args: argparse.Namespace, dtype: str, work: Workload, count: int) -> list[Result]:
    """One server per `--stream-intervals` value, each measured the same way."""
    messages = chat_messages(args.model, count, len(work.prompts[0]), seed=1)
    me = psutil.Process()
    niceness = me.nice()
    try:
        # Load generators usually run on other machines; here they share the two
        # cores with the server, and --client-nice lets the server go first.
        me.nice(args.client_nice)
        results = []
        for interval in [int(i) for i in args.stream_intervals.split(",") if i]:
            results.append(_serve_once(args, dtype, work, messages, interval))
            print_row(results[-1])
        return results
    finally:
        if args.client_nice:
            me.nice(niceness)  # lowering it again needs root


def _serve_once(
    args: argparse.Namespace,
    dtype: str,
    work: Workload,
    messages: list[list[dict]],
    stream_interval: int,
) -> Result:
    from flashserve.serve import start_local_server, wait_until_ready

    sys.path.insert(0, str(REPO_ROOT))
    from tests.server_fixture import free_port, stop_process_group

    port = free_port()
    overrides = {
        "model": str(args.model.resolve()),
        "served_model_name": "bench",
        "dtype": dtype,
        "max_model_len": 2048,
        "kv_cache_memory_gb": 2.0,
        "stream_interval": stream_interval,
    }
    if args.threads:
        overrides["cpu_threads"] = args.threads
    build_dir = REPO_ROOT / "build" / "bench_serve"
    proc = start_local_server(REPO_ROOT, port, overrides, build_dir=build_dir)
    try:
        wait_until_ready(port, timeout=600, proc=proc)
        warm = Workload(work.prompts, 8, work.temperature, work.top_p, work.top_k)
        asyncio.run(_stream_all(port, messages[:2], warm))
        server = psutil.Process(proc.pid)

        def run() -> tuple[float, tuple[int, int, list[int]], tuple[float, float]]:
            client0, server0 = _cpu_seconds(psutil.Process()), _cpu_seconds(server)
            timed: list[float] = []
            counts = asyncio.run(_stream_all(port, messages, work, timed))
            cpu = (_cpu_seconds(psutil.Process()) - client0, _cpu_seconds(server) - server0)
            return timed[0], counts, cpu

        # The server is our child (in its own session): its CPU counts as ours.
        (wall, (prompt_tokens, tokens, per_request), cpu), others = measured(
            run, args.gate, lambda v: v[0]
        )
    finally:
        stop_process_group(proc)
    count = len(messages)
    note = (
        f"stream_interval {stream_interval}; prompt tokens {min(per_request)}-{max(per_request)}"
        f" (mean {prompt_tokens / count:.1f}); CPU s: clients {cpu[0]:.1f} (incl. making"
        f" them), server {cpu[1]:.1f}; client nice {args.client_nice}"
    )
    return Result("server", dtype, count, tokens, wall, others, note)


def _cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process's own threads (not its children)."""
    t = proc.cpu_times()
    return t.user + t.system
