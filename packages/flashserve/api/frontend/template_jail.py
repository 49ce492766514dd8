"""Render a request's own chat template in a forked child with hard limits.

A request may bring its own Jinja `chat_template`. The sandbox blocks private
attributes and huge ranges, but not work: nested loops, `'x' * 10**9` or
`10**10**10` (folded at compile time, in C, where no timeout can reach) stall
or kill whichever process renders them. So such templates render in a child
forked from the server, under an address-space and CPU-time limit and a wall
clock; a child that runs over is killed and the request gets a 400.

fork, not spawn: the child needs the loaded tokenizer (its special tokens and
template helpers) and must start in milliseconds. It only runs Jinja and
pure-Python code, never torch or CUDA, and leaves with os._exit, so the
parent's threads and devices are not its concern.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from collections.abc import Callable
from multiprocessing.connection import Connection

from flashserve.api.http.errors import RequestError

WALL_TIMEOUT_S = 5.0
CPU_LIMIT_S = 4
# Room the child may allocate beyond what it inherits from the server.
MEMORY_HEADROOM_BYTES = 512 << 20
_OUT_OF_MEMORY = f"it needed more than {MEMORY_HEADROOM_BYTES >> 20} MiB"


def render_isolated(
    render: Callable[[], str],
    max_chars: int,
    param: str = "chat_template",
    timeout_s: float = WALL_TIMEOUT_S,
) -> str:
    """Run `render` in a child process; its text, or a RequestError (400) naming `param`.

    Blocking: call it from a worker thread (asyncio.to_thread), never the event loop.
    """
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(writer, render, max_chars), daemon=True)
    child.start()
    writer.close()  # the parent's copy: EOF on the reader once the child is gone
    try:
        if not reader.poll(timeout_s):
            raise RequestError(
                f"The chat template took longer than {timeout_s:g} s to render", param=param
            )
        try:
            kind, payload = reader.recv()
        except EOFError:
            raise RequestError(
                "The chat template exceeded its memory or CPU limit while rendering", param=param
            ) from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        reader.close()
    if kind == "ok":
        return payload
    if kind == "request_error":
        message, error_param = payload
        raise RequestError(message, param=error_param or param)
    raise RequestError(
        f"The chat template could not render this conversation: {payload}", param=param
    )


def _child_main(writer: Connection, render: Callable[[], str], max_chars: int) -> None:
    _limit_resources()
    try:
        text = render()
        if len(text) > max_chars:
            result = (
                "error",
                f"it rendered {len(text)} characters, more than the {max_chars} allowed",
            )
        else:
            result = ("ok", text)
    except MemoryError:
        result = ("error", _OUT_OF_MEMORY)
    except RequestError as exc:
        if isinstance(exc.__cause__, MemoryError):  # render_prompt wraps every failure
            result = ("error", _OUT_OF_MEMORY)
        else:
            result = ("request_error", (exc.message, exc.param))
    except BaseException as exc:  # noqa: BLE001 - whatever the template does is the request's fault
        result = ("error", f"{type(exc).__name__}: {exc}")
    try:
        writer.send(result)
    finally:
        writer.close()
        os._exit(0)  # skip the inherited atexit handlers and finalizers of the server


def _limit_resources() -> None:
    # Relative to the inherited address space: a CUDA process maps tens of GiB it never touches.
    with open("/proc/self/statm") as statm:
        inherited = int(statm.read().split()[0]) * resource.getpagesize()
    limit = inherited + MEMORY_HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S + 1))
