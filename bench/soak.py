"""Soak: a long, mixed load on the real Truss server, checking that nothing drifts or leaks.

    python bench/soak.py [--duration 300] [--concurrency 128] [--max-tokens 32]
        [--set kv_cache_memory_gb=0.002 ...] [--url http://127.0.0.1:8080 --pid PID]
        [--markdown bench/RESULTS.md]

Without --url it starts the server itself (flashserve.serve, the embedded model on
the CPU) with the --set engine overrides. `concurrency` workers then loop until
the duration is over, each picking a request kind at random:

  stream    seeded sampling, streamed; its text must equal the prompt's reference text
  json      the same, not streamed
  drop      streamed, and the client walks away after a few events
  deadline  streamed with `x-request-timeout: 0.3` and a long max_tokens; must end
            with a timeout (an SSE error event, or a 504 before the first token)
  hostile   a malformed body (bad UTF-8, deep nesting, a huge stop list...); must be a 400

Reference texts come from running each prompt alone first. Every second the
server's /metrics (queue, running, KV blocks, in flight) and its RSS are sampled.
At the end the server must go idle (no KV block, stream or slot held). Reported:
counts by kind and outcome, wrong texts, 5xx answers, client-side TTFT and ITL
percentiles, tokens/s, and RSS after warm-up, at its peak and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, ContentionMeter, machine, percentile, today  # noqa: E402

CHAT = "/v1/chat/completions"
KINDS = {"stream": 50, "json": 15, "drop": 15, "deadline": 10, "hostile": 10}
HOSTILE = [
    b'{"model": "m", "messages": [{"role": "user", "content": "\xff"}]}',
    b"[" * 50_000 + b"]" * 50_000,
    json.dumps({"model": "m", "messages": [], "stop": ["s"] * 5000}).encode(),
    b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
    json.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "chat_template": "{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}",
        }
    ).encode(),
]


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    wrong_text: int = 0
    server_errors: int = 0  # 5xx answers and error events other than timeouts

    def add(self, kind: str, outcome: str) -> None:
        self.outcomes[(kind, outcome)] += 1


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Soak prompt {i}: " + "and then " * (i % 7 + 1)}]


def seeded(i: int, max_tokens: int) -> dict:
    # Seeded sampling, not greedy: greedy text from the random embedded model is one
    # special token repeated (""); a seed gives varied text that nothing else changes.
    return {
        "model": "m",
        "messages": prompt(i),
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": i,
        "ignore_eos": True,
        "skip_special_tokens": False,
    }


async def read_stream(
    client: httpx.AsyncClient,
    body: dict,
    tally: Tally,
    stop_after: int | None = None,
    headers: dict | None = None,
) -> tuple[int, str, dict | None, bool]:
    """(status, text, error, done); records TTFT, ITL and tokens."""
    started = last = time.perf_counter()
    text, error, done, events = "", None, False, 0
    async with client.stream("POST", CHAT, json={**body, "stream": True}, headers=headers) as r:
        if r.status_code != 200:
            return r.status_code, "", json.loads(await r.aread()).get("error"), False
        async for line in r.aiter_lines():
            if not line:
                continue
            if stop_after is not None and events >= stop_after:
                break
            events += 1
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                error = event["error"]
                continue
            delta = "".join(c["delta"].get("content") or "" for c in event.get("choices", []))
            if delta:
                now = time.perf_counter()
                if text:
                    tally.itl.append(now - last)
                else:
                    tally.ttft.append(now - started)
                last = now
                tally.tokens += 1  # one token per content event on this server
                text += delta
    return 200, text, error, done


async def one_request(
    client: httpx.AsyncClient,
    kind: str,
    i: int,
    args: argparse.Namespace,
    refs: list[str],
    tally: Tally,
) -> None:
    if kind == "stream":
        status, text, error, done = await read_stream(client, seeded(i, args.max_tokens), tally)
        ok = status == 200 and done and error is None
        tally.wrong_text += ok and text != refs[i]
        outcome = "ok" if ok else f"failed {status} {error and error.get('code')}"
    elif kind == "json":
        r = await client.post(CHAT, json=seeded(i, args.max_tokens))
        ok = r.status_code == 200
        tally.wrong_text += ok and r.json()["choices"][0]["message"]["content"] != refs[i]
        outcome = "ok" if ok else f"failed {r.status_code}"
        status = r.status_code
    elif kind == "drop":
        status, *_ = await read_stream(
            client, seeded(i, 2000), tally, stop_after=random.randrange(8)
        )
        outcome = "dropped" if status == 200 else f"failed {status}"
    elif kind == "deadline":
        status, _, error, _ = await read_stream(
            client, seeded(i, 2000), tally, headers={"x-request-timeout": "0.3"}
        )
        timed_out = error is not None and error.get("code") == "timeout"
        outcome = "timed out" if timed_out else f"failed {status} {error and error.get('code')}"
        if timed_out:
            status = 200  # the answer asked for (a 504 before the first token), not a fault
    else:
        r = await client.post(
            CHAT, content=random.choice(HOSTILE), headers={"content-type": "application/json"}
        )
        status = r.status_code
        outcome = "refused" if status == 400 else f"failed {status}"
    tally.server_errors += status >= 500
    tally.add(kind, outcome)


async def worker(
    url: str, stop_at: float, args: argparse.Namespace, refs: list[str], tally: Tally
) -> None:
    kinds, weights = zip(*KINDS.items())
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as client:
        while time.monotonic() < stop_at:
            kind = random.choices(kinds, weights)[0]
            try:
                await one_request(client, kind, random.randrange(args.prompts), args, refs, tally)
            except (httpx.HTTPError, ValueError) as exc:
                tally.add(kind, f"client error {type(exc).__name__}")


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10, follow_redirects=True).text
    out = {}
    for line in text.splitlines():
        if line.startswith("flashserve_") and "{" not in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def sampler(url: str, pid: int | None, stop_at: float, samples: list[dict]) -> None:
    while time.monotonic() < stop_at:
        try:
            row = await asyncio.to_thread(scrape, url)
        except httpx.HTTPError:
            row = {}
        if pid:
            row["rss_mib"] = psutil.Process(pid).memory_info().rss / (1 << 20)
        samples.append(row)
        await asyncio.sleep(1.0)


def idle(url: str) -> bool:
    m = scrape(url)
    return all(
        m.get(k, 0) == 0
        for k in (
            "flashserve_kv_blocks_used",
            "flashserve_running_sequences",
            "flashserve_queue_depth",
            "flashserve_requests_in_flight",
        )
    )


def start_server(overrides: dict) -> tuple[str, subprocess.Popen]:
    from flashserve.serve import start_local_server, wait_until_ready

    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    build = Path(tempfile.mkdtemp(prefix="soak-"))
    proc = start_local_server(REPO_ROOT, port, overrides, build / "server.log", build)
    wait_until_ready(port, 300, proc=proc)
    print(f"server on :{port}, log {build / 'server.log'}", flush=True)
    return f"http://127.0.0.1:{port}", proc


def references(url: str, args: argparse.Namespace) -> list[str]:
    refs = []
    for i in range(args.prompts):
        r = httpx.post(f"{url}{CHAT}", json=seeded(i, args.max_tokens), timeout=300)
        r.raise_for_status()
        refs.append(r.json()["choices"][0]["message"]["content"])
    return refs


def report(
    args, tally: Tally, samples: list[dict], went_idle: bool, wall: float, others: float
) -> str:
    def peak(key: str) -> float:
        return max((s.get(key, 0) for s in samples), default=0)

    rss = [s["rss_mib"] for s in samples if "rss_mib" in s]
    lines = [
        f"## Soak (bench/soak.py), {today()}, {machine()}",
        "",
        f"`python bench/soak.py --duration {args.duration} --concurrency {args.concurrency} "
        f"--max-tokens {args.max_tokens}" + "".join(f" --set {s}" for s in args.set) + "`"
        f" (embedded model, CPU). Other processes used {others:.0%} of the machine meanwhile.",
        "",
        "| kind | outcome | requests |",
        "|---|---|---:|",
        *(f"| {k} | {o} | {n} |" for (k, o), n in sorted(tally.outcomes.items())),
        "",
        f"- requests: {sum(tally.outcomes.values())} in {wall:.0f} s; "
        f"streamed tokens {tally.tokens} ({tally.tokens / wall:.0f}/s)",
        f"- wrong texts: {tally.wrong_text}; 5xx answers or server error events: {tally.server_errors}",
    ]
    if tally.ttft:
        lines.append(
            f"- client TTFT p50 {percentile(tally.ttft, 50) * 1000:.0f} ms, "
            f"p99 {percentile(tally.ttft, 99) * 1000:.0f} ms; ITL p50 "
            f"{percentile(tally.itl or [0], 50) * 1000:.0f} ms, "
            f"p99 {percentile(tally.itl or [0], 99) * 1000:.0f} ms"
        )
    lines += [
        f"- peaks: queue {peak('flashserve_queue_depth'):.0f}, running "
        f"{peak('flashserve_running_sequences'):.0f}, KV blocks "
        f"{peak('flashserve_kv_blocks_used'):.0f} of {peak('flashserve_kv_blocks_total'):.0f}, "
        f"in flight {peak('flashserve_requests_in_flight'):.0f}, preemptions "
        f"{peak('flashserve_preemptions_total'):.0f}",
        f"- idle afterwards (no KV block, slot or stream held): {'yes' if went_idle else 'NO'}",
    ]
    if rss:
        warm = rss[min(len(rss) - 1, 10)]  # after ten seconds of load
        lines.append(
            f"- server RSS: {warm:.0f} MiB after 10 s, peak {max(rss):.0f} MiB, "
            f"end {rss[-1]:.0f} MiB"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="its process id, for RSS (with --url)")
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--markdown", type=Path, help="append the report to this file")
    args = parser.parse_args(argv)
    random.seed(args.seed)

    proc = None
    url, pid = args.url, args.pid
    if url is None:
        from flashserve.serve import parse_set

        url, proc = start_server({"cpu_threads": 1, **parse_set(args.set)})
        pid = proc.pid
    try:
        refs = references(url, args)
        tally, samples = Tally(), []
        meter = ContentionMeter()
        meter.start()
        started = time.monotonic()
        stop_at = started + args.duration

        async def run() -> None:
            await asyncio.gather(
                sampler(url, pid, stop_at, samples),
                *(worker(url, stop_at, args, refs, tally) for _ in range(args.concurrency)),
            )

        asyncio.run(run())
        wall = time.monotonic() - started
        deadline = time.monotonic() + 30
        while not (went_idle := idle(url)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid:
            samples.append({"rss_mib": psutil.Process(pid).memory_info().rss / (1 << 20)})
        text = report(args, tally, samples, went_idle, wall, meter.stop())
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    print(text)
    if args.markdown:
        with args.markdown.open("a") as out:
            out.write("\n" + text)
    healthy = went_idle and not tally.wrong_text and not tally.server_errors
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
