"""W1 through the real Truss server: 64 concurrent streaming AsyncOpenAI clients."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

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


def _request_body(conversation: list[dict], work: Workload) -> dict:
    return {
        "model": "bench",
        "messages": conversation,
        "max_tokens": work.output_len,
        "temperature": work.temperature,
        "top_p": work.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_k": work.top_k,
        "ignore_eos": True,
    }


async def _openai_stream(client: Any, conversation: list[dict], work: Workload) -> tuple[int, int]:
    body = _request_body(conversation, work)
    extra = {key: body.pop(key) for key in ("top_k", "ignore_eos")}
    stream = await client.chat.completions.create(**body, extra_body=extra)
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None, "the server sent no usage chunk"
    return usage.prompt_tokens, usage.completion_tokens


async def _raw_stream(port: int, conversation: list[dict], work: Workload) -> tuple[int, int]:
    """One stream read over a bare connection, parsing only its usage event.

    About the least CPU a client can spend on a stream, so that what is left of the
    gap to offline is the server's own cost (and the kernel's, for the loopback).
    """
    body = json.dumps(_request_body(conversation, work)).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    data = await reader.read()  # to the end: the server closes after the stream
    writer.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    # Each event is one HTTP chunk, so the usage event is whole on its own line.
    line = next(x for x in reversed(data.split(b"\n")) if x.startswith(b'data: {"id"'))
    usage = json.loads(line[len(b"data: ") :])["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


async def _stream_all(
    port: int, messages: list[list[dict]], work: Workload, kind: str = "openai"
) -> tuple[int, int, list[int], float, float]:
    """Stream every conversation at once, each from its own client.

    Returns prompt and completion tokens, each request's prompt tokens, the seconds
    from the first request to the last byte, and the CPU seconds the clients took in
    that time. The openai clients are made before the clock starts: a user's client
    exists before its request.
    """
    import openai

    url = f"http://127.0.0.1:{port}/v1"
    clients = []
    if kind == "openai":  # raw readers open their connection in the clock, as a client would
        clients = [
            openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=900)
            for _ in messages
        ]
    me = psutil.Process()
    cpu, started = _cpu_seconds(me), time.perf_counter()
    if kind == "openai":
        runs = (_openai_stream(c, m, work) for c, m in zip(clients, messages))
    else:
        runs = (_raw_stream(port, m, work) for m in messages)
    counts = await asyncio.gather(*runs)
    wall, client_cpu = time.perf_counter() - started, _cpu_seconds(me) - cpu
    await asyncio.gather(*(c.close() for c in clients))
    prompts = [p for p, _ in counts]
    return sum(prompts), sum(c for _, c in counts), prompts, wall, client_cpu


def bench_server(args: argparse.Namespace, dtype: str, work: Workload, count: int) -> list[Result]:
    """One server per `--stream-intervals` value, each measured with each client kind."""
    kinds = [k for k in args.server_clients.split(",") if k]
    unknown = set(kinds) - {"openai", "raw"}
    if unknown:
        raise SystemExit(f"--server-clients: unknown {sorted(unknown)} (openai, raw)")
    me = psutil.Process()
    niceness = me.nice()
    try:
        # Load generators usually run on other machines; here they share the two
        # cores with the server, and --client-nice lets the server go first.
        me.nice(args.client_nice)
        results = []
        intervals = [int(i) for i in args.stream_intervals.split(",") if i]
        # Conversations never sent twice (the server caches prompt prefixes): a
        # warm-up pair per server, then `count` for every try of every client kind.
        tries = max(args.gate.attempts, args.gate.repeat)
        total = len(intervals) * (2 + len(kinds) * tries * count)
        unused = iter(chat_messages(args.model, total, work.prompt_len, seed=next(work.seeds)))
        for interval in intervals:
            for row in _serve_once(args, dtype, work, unused, count, interval, kinds):
                results.append(row)
                print_row(row)
        return results
    finally:
        if args.client_nice:
            me.nice(niceness)  # lowering it again needs root


def _serve_once(
    args: argparse.Namespace,
    dtype: str,
    work: Workload,
    unused: Iterator[list[dict]],
    count: int,
    stream_interval: int,
    kinds: list[str],
) -> list[Result]:
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
    results = []
    try:
        wait_until_ready(port, timeout=600, proc=proc)
        asyncio.run(_stream_all(port, list(islice(unused, 2)), work.shorter(8)))
        server = psutil.Process(proc.pid)
        for kind in kinds:

            def run(kind: str = kind) -> tuple[tuple[int, int, list[int], float, float], float]:
                messages = list(islice(unused, count))
                before = _cpu_seconds(server)
                streamed = asyncio.run(_stream_all(port, messages, work, kind))
                return streamed, _cpu_seconds(server) - before

            # The server is our child (in its own session): its CPU counts as ours.
            (streamed, server_cpu), others = measured(run, args.gate, lambda v: v[0][3])
            prompt_tokens, tokens, per_request, wall, client_cpu = streamed
            note = (
                f"stream_interval {stream_interval}; {kind} clients; prompt tokens"
                f" {min(per_request)}-{max(per_request)} (mean {prompt_tokens / count:.1f});"
                f" CPU s: server {server_cpu:.1f}, clients {client_cpu:.1f} (in the clock);"
                f" client nice {args.client_nice}"
            )
            system = "server" if kind == "openai" else "server-raw"
            results.append(
                Result(system, dtype, count, tokens, wall, others, note, server_cpu, client_cpu)
            )
    finally:
        stop_process_group(proc)
    return results


def _cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process's own threads (not its children)."""
    t = proc.cpu_times()
    return t.user + t.system
