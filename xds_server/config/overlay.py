"""The admin API's changes to the served config, kept as data over the snapshot file.

There is one source of truth: what is served is always the file with this overlay
applied, on start-up, on every reload and after every API change, so an edit to
the file never undoes a drain and a drain never rewrites the file.

How a file edit and the overlay meet (the README's "Admin API" states the same):

* Only the API changes the overlay; a file edit never does.
* Where both name one endpoint, the file defines it (zone, weight) and the overlay
  decides whether it is served and whether it drains.
* An entry that names what the file no longer has (a pool, an endpoint) is kept,
  inert, and applies again when the file brings it back. A drained GPU node that
  an edit drops and later restores comes back drained: a drain is lifted only by
  an undrain (or a DELETE), never by accident.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from xds_server.config.reader import parse_endpoint
from xds_server.config.types import Config, Endpoint, Pool, SnapshotError

__all__ = ["FORMAT", "Overlay", "PoolOverlay", "endpoint_key"]

#: The state file's format version; a file of another version is refused, not guessed at.
FORMAT: Final = 1


def endpoint_key(text: str) -> str:
    """The normalized `address:port` key (`[v6]:port` for IPv6); ValueError if malformed.

    Normalized so that `::0001` in a URL finds the `::1` the file defines.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected ADDRESS:PORT with a port 1-65535, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 or IPv6 address (in {text!r})") from None
    return Endpoint(address, int(port)).key


@dataclass(frozen=True, slots=True)
class PoolOverlay:
    """The API's changes to one pool; keys are normalized `address:port`."""

    added: Mapping[str, Endpoint] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()
    drained: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.drained)

    def apply(self, pool: Pool) -> Pool:
        """The pool as served: file endpoints not removed, then API-added ones, drains marked
        (over a drain the pool's source already set: a terminating Kubernetes endpoint)."""
        in_file = {e.key for e in pool.endpoints}
        extra = [e for key, e in self.added.items() if key not in in_file]
        endpoints = tuple(
            replace(e, draining=e.draining or e.key in self.drained)
            for e in (*pool.endpoints, *extra)
            if e.key not in self.removed
        )
        return replace(pool, endpoints=endpoints)


@dataclass(frozen=True, slots=True)
class Overlay:
    """Every pool's changes; immutable, so a rejected request cannot leave half a change."""

    pools: Mapping[str, PoolOverlay] = field(default_factory=dict)

    def pool(self, name: str) -> PoolOverlay:
        return self.pools.get(name) or PoolOverlay()

    def _with(self, name: str, changed: PoolOverlay) -> Overlay:
        pools = {n: p for n, p in self.pools.items() if n != name}
        if changed:
            pools[name] = changed
        return Overlay(dict(sorted(pools.items())))

    def add(self, pool: str, endpoint: Endpoint, in_file: bool) -> Overlay:
        """Serve an endpoint: a file endpoint the API removed comes back as the file defines
        it; any other is recorded as added."""
        current = self.pool(pool)
        removed = current.removed - {endpoint.key}
        if in_file:
            return self._with(pool, replace(current, removed=removed))
        added = {**current.added, endpoint.key: replace(endpoint, draining=False)}
        return self._with(pool, replace(current, added=added, removed=removed))

    def remove(self, pool: str, key: str, in_file: bool) -> Overlay:
        """Stop serving an endpoint and forget its drain; a file endpoint is hidden, not edited."""
        current = self.pool(pool)
        return self._with(
            pool,
            PoolOverlay(
                added={k: e for k, e in current.added.items() if k != key},
                removed=current.removed | {key} if in_file else current.removed,
                drained=current.drained - {key},
            ),
        )

    def drain(self, pool: str, key: str, draining: bool) -> Overlay:
        current = self.pool(pool)
        drained = current.drained | {key} if draining else current.drained - {key}
        return self._with(pool, replace(current, drained=drained))

    def apply(self, config: Config) -> Config:
        """The config to serve: the file's, with each pool's changes applied."""
        if not self.pools:
            return config
        pools = tuple(
            self.pool(p.name).apply(p) if p.name in self.pools else p for p in config.pools
        )
        return replace(config, pools=pools)

    def inert(self, config: Config) -> list[dict[str, str]]:
        """Entries that change nothing in this file (kept until the file or the API moves)."""
        out = []
        file_pools = {p.name: p for p in config.pools}
        for name, changes in self.pools.items():
            pool = file_pools.get(name)
            if pool is None:
                out.append({"pool": name, "entry": "*", "reason": "the file has no such pool"})
                continue
            in_file = {e.key for e in pool.endpoints}
            served = {e.key for e in changes.apply(pool).endpoints}
            out += [
                {"pool": name, "entry": f"added {k}", "reason": "the file defines it"}
                for k in changes.added
                if k in in_file
            ]
            out += [
                {"pool": name, "entry": f"removed {k}", "reason": "the file no longer has it"}
                for k in sorted(changes.removed - in_file)
            ]
            out += [
                {"pool": name, "entry": f"drained {k}", "reason": "not served now"}
                for k in sorted(changes.drained - served)
            ]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "pools": {
                name: {
                    "added": [_endpoint_json(e) for e in p.added.values()],
                    "removed": sorted(p.removed),
                    "drained": sorted(p.drained),
                }
                for name, p in self.pools.items()
            },
        }

    @classmethod
    def from_json(cls, data: object) -> Overlay:
        """Parse what to_json wrote; ValueError naming the path of the first problem."""
        top = _mapping(data, "(document)", {"format", "pools"})
        if top.get("format") != FORMAT:
            raise ValueError(f"format: expected {FORMAT}, got {top.get('format')!r}")
        pools: dict[str, PoolOverlay] = {}
        for name, value in _mapping(top.get("pools", {}), "pools", None).items():
            path = f"pools.{name}"
            entry = _mapping(value, path, {"added", "removed", "drained"})
            added = {e.key: e for e in _endpoints(entry.get("added", []), f"{path}.added")}
            pools[name] = PoolOverlay(
                added,
                _keys(entry.get("removed", []), f"{path}.removed"),
                _keys(entry.get("drained", []), f"{path}.drained"),
            )
        return cls(dict(sorted(pools.items())))


def _endpoint_json(endpoint: Endpoint) -> dict[str, Any]:
    """The endpoint as the file would write it (a drain is kept apart, in `drained`)."""
    return {k: v for k, v in asdict(endpoint).items() if k != "draining"}


def _mapping(value: object, path: str, keys: set[str] | None) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{path}: expected a mapping")
    unknown = sorted(set(value) - keys) if keys is not None else []
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a list")
    return value


def _endpoints(value: object, path: str) -> list[Endpoint]:
    out = []
    for index, item in enumerate(_list(value, path)):
        try:
            out.append(parse_endpoint(item, f"{path}[{index}]"))
        except SnapshotError as err:
            raise ValueError(str(err.problems[0])) from None
    return out


def _keys(value: object, path: str) -> frozenset[str]:
    keys = set()
    for index, item in enumerate(_list(value, path)):
        if not isinstance(item, str):
            raise ValueError(f"{path}[{index}]: expected an ADDRESS:PORT string")
        try:
            keys.add(endpoint_key(item))
        except ValueError as err:
            raise ValueError(f"{path}[{index}]: {err}") from None
    return frozenset(keys)
