"""Server-sent events: the framing, and a response that aborts generation when its client leaves."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.responses import StreamingResponse

DISCONNECT_POLL_SECONDS = 0.25


def sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    """One event; `event` names it (the `event:` line, which some APIs' clients read)."""
    head = f"event: {event}\n".encode() if event else b""
    return (
        head
        + b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its generator, so a dropped client aborts at once."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def cancel_on_disconnect(http_request: Any, task: asyncio.Task | None) -> None:
    # A non-streaming request never fails a send() when its client leaves; poll
    # for the disconnect and cancel the handler, which aborts the engine request.
    while True:
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        if await http_request.is_disconnected():
            if task is not None:
                task.cancel()
            return
