"""Client-side helpers for the operations tests: Prometheus scrapes and raw SSE streams."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

CHAT = "/v1/chat/completions"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(base_url: str) -> dict[str, float]:
    """Every sample on /metrics as {'name{labels}': value} (the Truss server redirects to /metrics/)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10, follow_redirects=True).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            samples[name + (labels or "")] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a labelled counter not yet incremented)."""
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return samples.get(key, 0.0)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def engine_idle(base_url: str) -> bool:
    """No request holds a stream, a running slot or a KV block."""
    samples = scrape(base_url)
    return (
        sample(samples, "flashserve_kv_blocks_used") == 0
        and sample(samples, "flashserve_running_sequences") == 0
        and sample(samples, "flashserve_queue_depth") == 0
        and sample(samples, "flashserve_requests_in_flight") == 0
    )


@dataclass
class StreamResult:
    status: int
    text: str = ""
    finish_reason: str | None = None
    error: dict | None = None  # the `error` of an error event, or of a refused request's body
    done: bool = False  # `data: [DONE]` arrived
    events: int = 0
    headers: dict[str, str] = field(default_factory=dict)


async def stream_chat(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    stop_after_events: int | None = None,
    headers: dict[str, str] | None = None,
) -> StreamResult:
    """POST a streaming request and read its events; close the connection after
    `stop_after_events` events if given (a client walking away mid-stream)."""
    async with client.stream(
        "POST", CHAT, json={**body, "stream": True}, headers=headers
    ) as response:
        result = StreamResult(status=response.status_code, headers=dict(response.headers))
        if response.status_code != 200:
            result.error = json.loads(await response.aread()).get("error")
            return result
        async for line in response.aiter_lines():
            if not line:
                continue
            if stop_after_events is not None and result.events >= stop_after_events:
                break  # leaving the block closes the connection
            result.events += 1
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                result.done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                result.error = event["error"]
                continue
            for choice in event.get("choices", []):
                result.text += choice["delta"].get("content") or ""
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
        return result


def seeded(messages: list[dict[str, Any]], max_tokens: int, seed: int = 0) -> dict[str, Any]:
    """A request whose output depends on nothing but its prompt, seed and length.

    Sampled, not greedy: greedy decoding of the random-weight embedded model repeats
    one special token, which decodes to "" and would make every comparison vacuous.
    A seeded request draws from its own generator whatever else runs beside it, and
    keeping special tokens makes the text spell out every token.
    """
    return {
        "model": "m",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "ignore_eos": True,
        "skip_special_tokens": False,
    }
