"""Node groups in the snapshot file: which Envoys (by node.cluster, and with mTLS by
certificate identity) get which listeners and pools, checked against what the file defines."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final, NamedTuple

from xds_server.config.problems import (
    Reader,
    describe,
    join,
    unknown,
)
from xds_server.config.types import (
    DEFAULT_GROUP,
    Endpoint,
    Listener,
    NodeGroup,
    Pool,
)

__all__ = ["complete_groups", "read_groups"]

_GROUP_KEYS: Final = ("name", "node_clusters", "listeners", "pools", "identities")


def _read_references(
    r: Reader, m: dict[str, Any], key: str, path: str, known: set[str], what: str
) -> tuple[str, ...]:
    names = []
    for item_path, item in r.items(m, key, path):
        if not isinstance(item, str):
            r.problem(item_path, f"expected a {what} name, got {describe(item)}")
        elif item not in known:
            r.problem(item_path, unknown(what, item, known))
        elif item in names:
            r.problem(item_path, f"{what} {item!r} is listed twice")
        else:
            names.append(item)
    return tuple(names)


class _GroupEntry(NamedTuple):
    path: str
    group: NodeGroup  # pools holds only the extra pools until _complete_groups
    cluster_paths: tuple[str, ...]


def _read_group(
    r: Reader, value: object, path: str, listener_names: set[str], pool_names: set[str]
) -> _GroupEntry | None:
    m = r.mapping(value, path, _GROUP_KEYS)
    if m is None:
        return None
    name = r.name(m, path)
    clusters = [
        (p, c) for p, v in r.items(m, "node_clusters", path) if (c := _node_cluster(r, v, p))
    ]
    listeners = _read_references(r, m, "listeners", path, listener_names, "listener")
    pools = _read_references(r, m, "pools", path, pool_names, "pool")
    identities = tuple(i for p, v in r.items(m, "identities", path) if (i := _identity(r, v, p)))
    here = join(path, "node_clusters")
    if name == DEFAULT_GROUP and m.get("node_clusters"):
        r.problem(
            here, "the 'default' group serves every node no other group lists; remove node_clusters"
        )
    elif name != DEFAULT_GROUP and not m.get("node_clusters"):
        r.problem(
            here, "required: the Envoy node.cluster values this group serves (a non-empty list)"
        )
    if name is None:
        return None
    group = NodeGroup(name, tuple(c for _, c in clusters), listeners, pools, identities)
    return _GroupEntry(path, group, tuple(p for p, _ in clusters))


def _identity(r: Reader, value: object, path: str) -> str | None:
    if isinstance(value, str) and value and value.isprintable() and len(value) <= 1024:
        return value
    r.problem(
        path,
        f"expected a certificate identity pattern such as 'spiffe://example.org/ns/edge/*' "
        f"(a non-empty string), got {describe(value)}",
    )
    return None


def _node_cluster(r: Reader, value: object, path: str) -> str | None:
    if not isinstance(value, str):
        r.problem(path, f"expected a node cluster name (a string), got {describe(value)}")
        return None
    return r.check_text(value, path)


def read_groups(
    r: Reader, top: dict[str, Any], listener_names: set[str], pool_names: set[str]
) -> list[_GroupEntry]:
    entries = [
        e
        for p, v in r.items(top, "node_groups", "")
        if (e := _read_group(r, v, p, listener_names, pool_names))
    ]
    clusters = (
        (p, c) for e in entries for p, c in zip(e.cluster_paths, e.group.node_clusters, strict=True)
    )
    r.duplicates(clusters, "node cluster", "; a node cluster belongs to one group only")
    return entries


def complete_groups(
    r: Reader, entries: list[_GroupEntry], listeners: list[tuple[str, Listener]], pools: list[Pool]
) -> tuple[NodeGroup, ...]:
    """Add routed pools to each group, add the implicit default group, and check binds."""
    by_name = {listener.name: listener for _, listener in listeners}
    groups: list[NodeGroup] = []
    for entry in entries:
        members = [by_name[name] for name in entry.group.listeners if name in by_name]
        wanted = {pool for listener in members for route in listener.routes for pool in route.pools}
        wanted.update(entry.group.pools)
        group = replace(entry.group, pools=tuple(p.name for p in pools if p.name in wanted))
        _check_binds(r, group.name, [(join(entry.path, "listeners"), x) for x in members], "")
        groups.append(group)
    if not any(group.name == DEFAULT_GROUP for group in groups):
        names = tuple(listener.name for _, listener in listeners)
        groups.append(NodeGroup(DEFAULT_GROUP, (), names, tuple(p.name for p in pools)))
        hint = "; or define node groups, with a 'default' group for every other node"
        _check_binds(r, DEFAULT_GROUP, listeners, hint)
    groups.sort(key=lambda group: group.name == DEFAULT_GROUP)
    return tuple(groups)


def _check_binds(r: Reader, group: str, listeners: list[tuple[str, Listener]], hint: str) -> None:
    """One Envoy cannot bind the same address and port twice."""
    first: dict[tuple[str, int], str] = {}
    for path, listener in listeners:
        bind = (listener.address, listener.port)
        if bind in first:
            r.problem(
                path,
                f"listeners {first[bind]!r} and {listener.name!r} both bind {Endpoint(*bind).key} "
                f"in node group {group!r}: give one of them another port{hint}",
            )
        else:
            first[bind] = listener.name
