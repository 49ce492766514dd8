"""Call a locally served truss: the local counterpart of `truss predict -d`.

    python -m flashserve.predict -d '{"messages": [{"role": "user", "content": "Hi"}]}'
        [--url http://127.0.0.1:8080] [--endpoint chat|predict]

Prints the JSON answer, or, when the body has "stream": true, the content deltas
as they arrive. Error events in a stream go to stderr and make the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

ENDPOINTS = {"chat": "/v1/chat/completions", "predict": "/v1/models/model:predict"}
# Generation can take long on the CPU; only connecting should fail fast.
TIMEOUT = httpx.Timeout(600.0, connect=10.0)


def _print_json(data: Any, file: Any = sys.stdout) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False), file=file)


def _error_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def post(url: str, body: dict[str, Any]) -> int:
    response = httpx.post(url, json=body, timeout=TIMEOUT)
    if response.is_success:
        _print_json(response.json())
        return 0
    print(f"HTTP {response.status_code}", file=sys.stderr)
    _print_json(_error_body(response), file=sys.stderr)
    return 1


def stream(url: str, body: dict[str, Any]) -> int:
    status = 0
    with httpx.stream("POST", url, json=body, timeout=TIMEOUT) as response:
        if not response.is_success:
            response.read()
            print(f"HTTP {response.status_code}", file=sys.stderr)
            _print_json(_error_body(response), file=sys.stderr)
            return 1
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
            except ValueError:
                print(data, end="", flush=True)
                continue
            if isinstance(event, dict) and "error" in event:
                print(file=sys.stderr)
                _print_json(event, file=sys.stderr)
                status = 1
                continue
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    print(content, end="", flush=True)
    print()
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashserve.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-d", "--data", required=True, help="request body (JSON)")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    args = parser.parse_args(argv)
    try:
        body = json.loads(args.data)
    except ValueError as e:
        parser.error(f"-d is not valid JSON: {e}")
    if not isinstance(body, dict):
        parser.error("-d must be a JSON object")
    url = args.url.rstrip("/") + ENDPOINTS[args.endpoint]
    try:
        return stream(url, body) if body.get("stream") else post(url, body)
    except httpx.HTTPError as e:
        print(f"request to {url} failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
