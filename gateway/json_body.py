"""The HTTP API's JSON bodies decoded strictly: UTF-8 only, and no lone UTF-16 surrogate in a string.

Python's `json` accepts both a body in UTF-16 or UTF-32 and an escape such as
`"\\ud800"` that names half of a surrogate pair, which becomes a `str` that no
codec can encode: the request then failed deep in the gateway, with a 500, when
the text was first written as UTF-8 (a protobuf field, a cache key). Here such
a body is refused where it is read, as malformed JSON at the offending
position, before any route sees it. Escaped pairs (`"\\ud83d\\ude00"`, how
`json.dumps` writes an emoji by default) are valid and pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

import fastapi
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Every escape of a JSON text, in order: a \uXXXX (its code unit captured) or a one-character escape (\\, \", ...).
# Outside strings a valid JSON text has no backslash, so a scan of a text `json.loads` accepted sees only these.
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)")


def lone_surrogate(text: str) -> int | None:
    """The position in JSON text `text` (already accepted by `json.loads`) of the first \\u escape that is half
    of a surrogate pair without its other half; None if there is none."""
    if not _SURROGATE_ESCAPE.search(text):
        return None  # the common case: one search, no scan
    high: re.Match | None = None  # a high surrogate escape still waiting for its low half
    for escape in _ESCAPE.finditer(text):
        unit = int(escape.group(1), 16) if escape.group(1) else None
        is_low = unit is not None and 0xDC00 <= unit <= 0xDFFF
        if high is not None:
            if is_low and escape.start() == high.end():
                high = None
                continue
            return high.start()
        if unit is not None and 0xD800 <= unit <= 0xDBFF:
            high = escape
        elif is_low:
            return escape.start()
    return None if high is None else high.start()


def decode(body: bytes) -> Any:
    """A request body as JSON; json.JSONDecodeError (with a position) if it is not UTF-8 JSON text whose strings
    are all Unicode."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 (byte 0x{body[exc.start]:02x})",
                                   body.decode("utf-8", "replace"), exc.start) from None
    value = json.loads(text)
    position = lone_surrogate(text)
    if position is not None:
        raise json.JSONDecodeError(f"{text[position:position + 6]} is half of a UTF-16 surrogate pair without the "
                                   "other half, not a character", text, position)
    return value


class StrictJSONRequest(Request):
    """A request whose `json()` is `decode`'s."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = decode(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route that reads its JSON body with `decode` (FastAPI turns its JSONDecodeError into a 400)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def router(**kwargs: Any) -> fastapi.APIRouter:
    """An APIRouter whose routes read JSON bodies with `decode`."""
    return fastapi.APIRouter(route_class=StrictJSONRoute, **kwargs)
