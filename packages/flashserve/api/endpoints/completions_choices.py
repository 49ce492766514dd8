"""Several prompts, one request: their generations run at once and their pieces merge
into one iterator of (choice index, piece)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from flashserve.api.frontend.output.text_output import Piece

_END = object()


@dataclass
class ChoicePiece:
    """A piece of one choice's output."""

    index: int
    piece: Piece


async def merge_choices(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[ChoicePiece]:
    """The pieces of every stream as they come, tagged with the stream's index.

    Nothing is yielded before every stream has its first piece (or has failed), so a
    prompt the engine refuses (a full queue, a bad prompt) fails the whole request with
    a status code rather than a broken stream. Closing this closes every stream, which
    aborts their engine requests.
    """
    if len(streams) == 1:
        try:
            async for piece in streams[0]:
                yield ChoicePiece(0, piece)
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                queue.put_nowait((index, piece))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, _END))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        held: list[tuple[int, object]] = []
        started: set[int] = set()
        while len(started) < len(streams):
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            started.add(index)
            held.append((index, item))
        ended = 0
        for index, item in held:
            if item is _END:
                ended += 1
            else:
                yield ChoicePiece(index, item)  # type: ignore[arg-type]
        while ended < len(streams):
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is _END:
                ended += 1
            else:
                yield ChoicePiece(index, item)  # type: ignore[arg-type]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
