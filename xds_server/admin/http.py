"""JSON in and out of the admin API: every answer is JSON, every error `{"error": ...}`.

Scripts drive this API; a script can act on `{"error": ...}` but not on an HTML
error page, so aiohttp's own errors (unknown route, wrong method, body too large)
are turned into the same JSON shape as ours.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

__all__ = ["ApiError", "Handler", "error_response", "json_errors", "json_response", "read_json"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A refused request: status, a message for people, and optional details for scripts."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=2) + "\n")


def error_response(status: int, message: str, **details: Any) -> web.Response:
    return json_response({"error": message, **details}, status)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 400 when it is not JSON (aiohttp answers 413 when too big)."""
    try:
        text = await request.text()
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not UTF-8 text: {err.reason}") from err
    try:
        return json.loads(text)
    except ValueError as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from err


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError and aiohttp's HTTP errors become JSON; a bug becomes a logged JSON 500."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err.status, err.message, **err.details)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        response = error_response(err.status, err.reason)
        allow = err.headers.get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response
    except Exception:
        log.exception("admin API: %s %s failed", request.method, request.path)
        return error_response(500, "internal error; see the server log")
