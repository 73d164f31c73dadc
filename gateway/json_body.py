"""The HTTP API's JSON bodies, decoded strictly by orjson: UTF-8 only, no lone UTF-16 surrogate, bounded nesting.

Python's `json`, which FastAPI uses, accepts an escape such as `"\\ud800"`
that names half of a surrogate pair: the result is a `str` no codec can
encode, and the request then failed deep in the gateway with a 500 when the
text was first written as UTF-8 (a protobuf field, a cache key). It also
accepts bodies in UTF-16 or UTF-32, `NaN`, and nesting until the interpreter's
recursion limit. orjson refuses all of these (and nests at most 1,024 deep),
with the position, as a `json.JSONDecodeError`, which FastAPI turns into a 400
before any route sees the body. Escaped pairs (`"\\ud83d\\ude00"`, how
`json.dumps` writes an emoji by default) are one character, as they should be.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import fastapi
import orjson
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


def decode(body: bytes) -> Any:
    """A request body as JSON; json.JSONDecodeError (with the position) if it is not UTF-8 JSON text that
    orjson accepts."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:  # orjson says "surrogates not allowed" at position 0: say what and where
            raise json.JSONDecodeError(f"the body is not UTF-8 (byte 0x{body[exc.start]:02x})",
                                       body.decode("utf-8", "replace"), exc.start) from None
        raise


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
