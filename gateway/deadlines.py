"""An HTTP request's lifetime: its deadline (the X-Request-Timeout header) and its client's disconnect.

Either ends the work upstream: the awaited call is cancelled, which cancels its generation in the mesh.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from typing import TypeVar

import fastapi
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from moemesh.services.core.errors import DeadlineExceeded, InvalidRequest

log = logging.getLogger("moemesh.gateway.openai")

T = TypeVar("T")

TIMEOUT_HEADER = "X-Request-Timeout"
# The HTTP layer gives up this long after the deadline it sent upstream, should the mesh not report it.
DEADLINE_GRACE = 1.0


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


def request_timeout(request: fastapi.Request) -> float | None:
    """Seconds from the X-Request-Timeout header (None: no deadline)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequest(TIMEOUT_HEADER, f"must be a positive number of seconds, got {raw!r}")
    return value


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, awaitable: Awaitable[T], timeout: float | None = None) -> T:
    """The result of `awaitable`, cancelled (which cancels its upstream work) when the client disconnects
    (ClientGone) or after `timeout` seconds (DeadlineExceeded)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watcher.cancel()
        await asyncio.wait({task, watcher})
    if task in done:
        return task.result()
    if watcher in done:
        raise ClientGone()
    raise DeadlineExceeded(f"no answer within the {TIMEOUT_HEADER} deadline")


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed (cancelling the generation) when the client goes away."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnected(receive, self.stream_response(send))
        except (ClientGone, OSError):
            log.info("HTTP client disconnected mid-stream")
        finally:
            await self.body_iterator.aclose()



def grace(timeout: float | None) -> float | None:
    """How long the HTTP layer waits for an answer whose deadline upstream is `timeout` (None: for ever)."""
    return None if timeout is None else timeout + DEADLINE_GRACE
