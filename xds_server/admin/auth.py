"""Who may change the fleet, and optionally who may read it: `Authorization: Bearer <token>`.

The admin token comes from `--admin-token-file FILE` or, failing that, the
environment variable XDS_ADMIN_TOKEN. With neither, mutations are refused (401)
even on loopback: a drain sends a GPU node's traffic elsewhere, and any local
process (a browser tab included) can reach 127.0.0.1, so the safe default is
"read-only until someone chose a secret".

Reads need no token unless a read token is set (`--admin-read-token-file FILE` or
XDS_ADMIN_READ_TOKEN): then every route but the probes (/healthz, /readyz) needs
the read token or the admin token, which reads too. A read token cannot change
anything (403).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from xds_server.admin.http import Handler, error_response

__all__ = [
    "MIN_TOKEN_LENGTH",
    "PROBE_PATHS",
    "READ_METHODS",
    "READ_TOKEN_ENV",
    "TOKEN_ENV",
    "TokenError",
    "require_token",
    "resolve_read_token",
    "resolve_token",
]

TOKEN_ENV: Final = "XDS_ADMIN_TOKEN"
READ_TOKEN_ENV: Final = "XDS_ADMIN_READ_TOKEN"
#: Methods that only read; anything else changes state and needs the admin token.
READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: Open even when reads need a token: load balancers and the kubelet probe without secrets.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz"})
#: A bearer token is the only thing between whoever reaches the port and a drain of real
#: traffic, and nothing limits how fast a caller may guess. Tokens people type (a word, a
#: date, "changeme") fall to a dictionary; 32 characters is what `openssl rand -hex 16`
#: gives (128 random bits), which no online guessing gets through. The length cannot
#: prove randomness, but it refuses the short, typed secrets that are the real risk.
MIN_TOKEN_LENGTH: Final = 32


class TokenError(Exception):
    """The token file is unusable; a start-up error that names the file."""


def resolve_token(
    token_file: Path | None,
    environ: Mapping[str, str] = os.environ,
    *,
    env: str = TOKEN_ENV,
    what: str = "admin token",
) -> str | None:
    """The admin token: the file's (surrounding whitespace stripped), else the environment's.

    TokenError for a file that cannot be read, is empty, or holds a token shorter than
    MIN_TOKEN_LENGTH (a short token in the environment is refused too)."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"{what} file {token_file}: cannot read it: {err}") from err
        if not token:
            raise TokenError(f"{what} file {token_file} is empty")
        _check_length(token, f"{what} file {token_file}", f"openssl rand -hex 32 > {token_file}")
        return token
    token = environ.get(env, "").strip()
    if not token:
        return None
    _check_length(token, f"${env}", f"export {env}=$(openssl rand -hex 32)")
    return token


def resolve_read_token(
    token_file: Path | None, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The read token (`--admin-read-token-file`, else $XDS_ADMIN_READ_TOKEN); None: reads
    are open. The same rules as the admin token."""
    return resolve_token(token_file, environ, env=READ_TOKEN_ENV, what="admin read token")


def _check_length(token: str, source: str, remedy: str) -> None:
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(
            f"{source} holds a token of {len(token)} characters; tokens need at least "
            f"{MIN_TOKEN_LENGTH} so they cannot be guessed: make a random one, e.g. `{remedy}`"
        )


def _bearer(request: web.Request) -> bytes | None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    return given.encode() if scheme.lower() == "bearer" and given else None


def _matches(given: bytes, expected: bytes | None) -> bool:
    return expected is not None and hmac.compare_digest(given, expected)


def require_token(
    token: str | None,
    read_token: str | None = None,
    on_refused: Callable[[], None] = lambda: None,
) -> Middleware:
    """Middleware: 401 JSON for a mutating request without the admin token; with a read
    token, 401 for any request but the probes without the read or the admin token, and 403
    for a change asked with the read token. `on_refused` is called for each refusal."""
    write = token.encode() if token is not None else None
    read = read_token.encode() if read_token is not None else None

    def refuse(status: int, message: str) -> web.Response:
        on_refused()
        if status == 403:
            return error_response(403, message)
        response = error_response(401, message)
        response.headers["WWW-Authenticate"] = 'Bearer realm="xds-server admin"'
        return response

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        reading = request.method in READ_METHODS
        if reading and request.path in PROBE_PATHS:
            return await handler(request)
        given = _bearer(request)
        is_admin = given is not None and _matches(given, write)
        if read is not None:  # every other request needs a token, unmatched ones included
            if given is None:
                return refuse(
                    401,
                    "this admin API needs a token to read: send Authorization: Bearer "
                    "<read token or admin token>",
                )
            if not is_admin and not _matches(given, read):
                return refuse(401, "wrong token")
        if reading or request.match_info.http_exception is not None:
            return await handler(request)  # reads, and 404/405 for what no route matches
        if write is None:
            return refuse(
                401,
                f"changes are disabled: no admin token is configured; start the server with "
                f"--admin-token-file FILE or {TOKEN_ENV} set",
            )
        if given is None:
            return refuse(401, "this route changes state: send Authorization: Bearer <token>")
        if not is_admin:
            if read is not None:  # it passed above: the read token
                return refuse(403, "the read token cannot change state: send the admin token")
            return refuse(401, "wrong admin token")
        return await handler(request)

    return check
