"""The `envoy:` escape hatch: hand-written Envoy resources in proto3 JSON, served as given.

Parsed with protobuf's json_format into the real Envoy message types, so anything
Envoy would NACK for being malformed is refused here with its path in the file.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Any, Final, NamedTuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from xds_server.config.problems import (
    Reader,
    describe,
)
from xds_server.config.types import (
    MAX_RAW_VALUES,
    RawResources,
)

__all__ = ["read_raw"]

# --------------------------------------------------------------------------- raw resources


class _RawKind(NamedTuple):
    key: str
    message: type[Message]
    name_field: str
    generated_from: str  # the section whose names the generated resources of this type use


_RAW_KINDS: Final = (
    _RawKind("clusters", cluster_pb2.Cluster, "name", "pools"),
    _RawKind("listeners", listener_pb2.Listener, "name", "listeners"),
    _RawKind("routes", route_pb2.RouteConfiguration, "name", "listeners"),
    _RawKind("endpoints", endpoint_pb2.ClusterLoadAssignment, "cluster_name", "pools"),
)

_all_descriptors_loaded = False
_descriptor_lock = threading.Lock()


def _load_all_descriptors() -> bool:
    """Import every generated Envoy proto module so Any `@type`s in raw JSON resolve.

    Takes about a second, so it runs only when a raw resource names a type that is
    not loaded yet, once per process. Returns whether a retry could now succeed.
    """
    global _all_descriptors_loaded
    with _descriptor_lock:
        if _all_descriptors_loaded:
            return False
        for package_name in ("envoy", "xds", "udpa"):
            package = importlib.import_module(package_name)
            prefix = package_name + "."
            for info in pkgutil.walk_packages(package.__path__, prefix, onerror=lambda _: None):
                if info.name.endswith("_pb2"):
                    _import_quietly(info.name)
        _all_descriptors_loaded = True
        return True


def _import_quietly(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception:  # a broken optional module must not break validation
        pass


def _parse_message(item: dict[str, Any], message: type[Message]) -> Message:
    try:
        return json_format.ParseDict(item, message())
    except json_format.ParseError as err:
        if "Can not find message descriptor" not in str(err) or not _load_all_descriptors():
            raise
        return json_format.ParseDict(item, message())


def _too_big(value: object, budget: int) -> bool:
    """Whether the tree has more than budget values; catches alias bombs and self-references."""
    stack = [value]
    while stack:
        budget -= 1
        if budget < 0:
            return True
        current = stack.pop()
        if isinstance(current, dict):
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return False


def _read_raw_entry(r: Reader, item: object, path: str, kind: _RawKind) -> Message | None:
    full_name = kind.message.DESCRIPTOR.full_name
    if not isinstance(item, dict):
        r.problem(path, f"expected a {full_name} in proto3 JSON (a mapping), got {describe(item)}")
        return None
    if _too_big(item, MAX_RAW_VALUES):
        r.problem(path, f"more than {MAX_RAW_VALUES} values (self-referencing YAML aliases?)")
        return None
    try:
        message = _parse_message(item, kind.message)
    except Exception as err:  # json_format raises more than ParseError on odd YAML values
        first_line = str(err).partition("\n")[0]  # later lines list every field name
        r.problem(path, f"not a valid {full_name}: {first_line}")
        return None
    if not getattr(message, kind.name_field):
        r.problem(path, f"a raw resource needs a '{kind.name_field}'")
        return None
    return message


def read_raw(r: Reader, top: dict[str, Any], generated: dict[str, set[str]]) -> RawResources:
    envoy = top.get("envoy")
    keys = tuple(kind.key for kind in _RAW_KINDS)
    m = {} if envoy is None else r.mapping(envoy, "envoy", keys) or {}
    parsed: dict[str, tuple[Message, ...]] = {}
    for kind in _RAW_KINDS:
        entries = [
            (p, msg)
            for p, v in r.items(m, kind.key, "envoy")
            if (msg := _read_raw_entry(r, v, p, kind))
        ]
        named = [(p, getattr(msg, kind.name_field)) for p, msg in entries]
        r.duplicates(named, f"{kind.key[:-1]} name")
        for path, name in named:
            if name in generated[kind.generated_from]:
                r.problem(
                    path,
                    f"name {name!r} is already used by the {kind.key[:-1]} generated for "
                    f"{kind.generated_from[:-1]} {name!r}; rename one of them",
                )
        parsed[kind.key] = tuple(msg for _, msg in entries)
    return RawResources(**parsed)
