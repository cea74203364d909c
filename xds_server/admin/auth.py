"""Who may change the fleet: mutating admin routes need `Authorization: Bearer <token>`.

The token comes from `--admin-token-file FILE` or, failing that, the environment
variable XDS_ADMIN_TOKEN. With neither, mutations are refused (401) even on
loopback: a drain sends a GPU node's traffic elsewhere, and any local process
(a browser tab included) can reach 127.0.0.1, so the safe default is "read-only
until someone chose a secret". Reads need no token: they only show state.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from xds_server.admin.http import Handler, error_response

__all__ = ["READ_METHODS", "TOKEN_ENV", "TokenError", "require_token", "resolve_token"]

TOKEN_ENV: Final = "XDS_ADMIN_TOKEN"
#: Methods that only read; anything else changes state and needs the token.
READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


class TokenError(Exception):
    """The token file is unusable; a start-up error that names the file."""


def resolve_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The admin token: the file's (surrounding whitespace stripped), else the environment's."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"admin token file {token_file}: cannot read it: {err}") from err
        if not token:
            raise TokenError(f"admin token file {token_file} is empty")
        return token
    return environ.get(TOKEN_ENV, "").strip() or None


def require_token(token: str | None) -> Middleware:
    """Middleware: 401 JSON for a mutating request without the right bearer token."""
    expected = token.encode() if token is not None else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in READ_METHODS or request.match_info.http_exception is not None:
            return await handler(request)  # reads, and 404/405 for what no route matches
        if expected is None:
            return _unauthorized(
                f"changes are disabled: no admin token is configured; start the server with "
                f"--admin-token-file FILE or {TOKEN_ENV} set"
            )
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return _unauthorized("this route changes state: send Authorization: Bearer <token>")
        if not hmac.compare_digest(given.strip().encode(), expected):
            return _unauthorized("wrong admin token")
        return await handler(request)

    return check


def _unauthorized(message: str) -> web.Response:
    response = error_response(401, message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="xds-server admin"'
    return response
