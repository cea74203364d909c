"""Which Host headers the admin API answers: the defence against DNS rebinding.

A web page can make a browser send requests to 127.0.0.1 through a name of its own
that first resolves to the attacker's server and then to 127.0.0.1; the browser
then treats the admin API as that page's own origin and lets it read the answers.
The request still carries the attacker's name in `Host`, so refusing names the
operator did not list stops it. The defaults: bound to a loopback address, only
`localhost`, `127.0.0.1` and `[::1]` (any port); bound to anything else with no
list, any Host (operators behind load balancers), with a warning at start.

A Host that is the IP literal of the address the connection reached is always
accepted: rebinding needs a name, and probes (the kubelet sends the pod's IP) and
`curl http://10.0.0.5:8080/` use the address itself.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from xds_server.admin.http import Handler, error_response

__all__ = [
    "ANY_HOST",
    "HOST_FLAG",
    "LOOPBACK_NAMES",
    "allowed_hosts",
    "check_host",
    "host_name",
    "normalize_host",
]

log = logging.getLogger(__name__)

HOST_FLAG: Final = "--admin-allowed-host"
#: Given as the list, accepts any Host (and says so without a warning).
ANY_HOST: Final = "*"
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def normalize_host(value: str) -> str:
    """A name as the allow-list keeps it: lower case, an IPv6 literal without brackets.
    ValueError for what is not a bare host name or IP literal (a port, a URL, a path)."""
    name = value.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        return str(ipaddress.IPv6Address(name[1:-1]))  # ValueError unless a literal
    if name == ANY_HOST:
        return name
    if ":" in name:
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            raise ValueError(f"expected a host name without a port, got {value!r}") from None
    if not name or any(c in name for c in "/@?#* \t") or not name.isascii():
        raise ValueError(f"expected a host name or IP address, got {value!r}")
    return name


def host_name(header: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]:port`); None when malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        name, rest = header[1:end], header[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    name, sep, port = header.partition(":")
    if not name or (sep and not port.isdigit()):
        return None
    return name


def _is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, given: Iterable[str] = ()) -> frozenset[str] | None:
    """The accepted names for an admin server bound to `bind`; None accepts any Host.

    ValueError for a malformed name in `given`; a warning when a non-loopback bind
    leaves the list open without the operator saying so."""
    names = frozenset(normalize_host(name) for name in given)
    if ANY_HOST in names:
        return None
    if names:
        return names
    if _is_loopback(bind):
        return LOOPBACK_NAMES
    log.warning(
        "the admin API on %s accepts requests for any Host name: a web page can reach it "
        "through DNS rebinding. List the names clients use with %s HOST (repeatable), or "
        "%s '%s' to accept any without this warning",
        bind or "all addresses",
        HOST_FLAG,
        HOST_FLAG,
        ANY_HOST,
    )
    return None


def _shown(name: str) -> str:
    return f"[{name}]" if ":" in name else name


def check_host(
    allowed: frozenset[str] | None, on_refused: Callable[[], None] = lambda: None
) -> Middleware:
    """Middleware: 421 JSON for a request whose Host is not allowed (None: all are)."""
    listed = ", ".join(sorted(_shown(name) for name in allowed or ()))

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if allowed is None:
            return await handler(request)
        header = request.headers.get("Host", "")
        name = host_name(header)
        if name is not None and (name in allowed or _is_local_address(request, name)):
            return await handler(request)
        on_refused()
        shown = header[:100] if header else "(none)"
        return error_response(
            421,
            f"Host {shown!r} is not allowed: this admin API answers requests for {listed} "
            f"(DNS rebinding protection); the server's operator can add names with "
            f"{HOST_FLAG} HOST",
            host=shown,
        )

    return check


def _is_local_address(request: web.Request, name: str) -> bool:
    """The Host is the IP literal of the local address this connection reached."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not sockname:
        return False
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(sockname[0])
    except ValueError:
        return False
