"""The snapshot file: YAML in, a typed and fully validated model out.

People edit this file by hand while a fleet serves from it, so every mistake
must be caught here, before anything reaches Envoy (which would NACK it, or
worse, accept something subtly wrong), and reported all at once with the file,
the path in the document and what to do, so one edit-validate round fixes all.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import pkgutil
import re
import reprlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from lrs.params import ParamError, Params, parse_params
from lrs.policy import PolicyError, load_policy

DEFAULT_GROUP: Final = "default"
#: client_side_weighted_round_robin: Envoy weighs endpoints itself from the ORCA headers of
#: responses (qps / utilization), ignoring EDS weights.
CSWRR: Final = "client_side_weighted_round_robin"
LB_POLICIES: Final = ("round_robin", "least_request", CSWRR)
WEIGHTINGS: Final = ("static", "orca")
MODEL_HEADER: Final = "x-gateway-model-name"
#: Where Envoy finds the body router when the file names no address (`xds-server serve` runs
#: one there; `--router-port` moves it, and then the generated config follows).
BODY_ROUTER_ADDRESS: Final = "127.0.0.1"
BODY_ROUTER_PORT: Final = 18001
FAILURE_MODES: Final = ("closed", "open")
#: The router takes a whole body in one gRPC message; its server accepts 16 MiB messages.
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
#: Envoy's ext_proc message_timeout may not exceed an hour.
MAX_ROUTER_TIMEOUT: Final = 3600.0
MAX_WEIGHT: Final = 1_000_000
UINT32_MAX: Final = 2**32 - 1
#: The largest protobuf Duration, in seconds: anything above cannot be encoded.
MAX_SECONDS: Final = 315_576_000_000
#: Envoy requires connect_timeout > 0; below a millisecond it is a typo, not a setting.
MIN_CONNECT_TIMEOUT: Final = 0.001
#: Raw resources are walked by json_format; bound them so a YAML alias bomb cannot stall us.
MAX_RAW_VALUES: Final = 100_000

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_QUOTED_NUMBER = re.compile(r"\s*[-+]?\d+(\.\d*)?\s*")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model server; address is a normalized IP literal so keys compare reliably."""

    address: str
    port: int
    zone: str = ""
    weight: int = 1
    #: Set by an admin API drain (never by the file): Envoy sends it no new requests.
    draining: bool = False

    @property
    def key(self) -> str:
        """The `address:port` form the admin API uses in URLs."""
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class Pool:
    """A set of interchangeable model servers: one Envoy cluster fed over EDS."""

    name: str
    lb_policy: str
    weighting: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = 1.0
    policy: str = "headroom"  # weighting: orca only: "headroom" or "module:Class"
    orca: Params = field(default_factory=Params)  # the policy parameters (`orca:`)


@dataclass(frozen=True, slots=True)
class SplitTarget:
    """One pool of a traffic split and its relative weight (Envoy weighted_clusters)."""

    pool: str
    weight: int


@dataclass(frozen=True, slots=True)
class Route:
    """Either a model route (header match) or a prefix route; timeout 0 disables it.

    It sends to one `pool`, or (pool None) shares traffic between the pools of `split`
    by weight: canaries and LoRA-adapter rollouts of one model.
    """

    pool: str | None
    model: str | None = None
    prefix: str | None = None
    timeout: float = 300.0
    split: tuple[SplitTarget, ...] = ()

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool this route can send to."""
        return (self.pool,) if self.pool is not None else tuple(t.pool for t in self.split)


@dataclass(frozen=True, slots=True)
class Listener:
    """body_routing: Envoy asks the body router for each request's model (ext_proc)."""

    name: str
    port: int
    address: str = "0.0.0.0"
    routes: tuple[Route, ...] = ()
    body_routing: bool = False

    @property
    def models(self) -> tuple[str, ...]:
        """The model names its routes match, in file order."""
        return tuple(route.model for route in self.routes if route.model is not None)

    @property
    def has_fallback(self) -> bool:
        """Whether a prefix route catches requests that name no model."""
        return any(route.model is None for route in self.routes)


@dataclass(frozen=True, slots=True)
class BodyRouterSettings:
    """How Envoy reaches and uses the body router (the `body_router:` section).

    address/port None: the file names no router, so the control plane's own is used.
    failure_mode "closed" answers 503 while the router is unreachable; "open" lets
    requests through unrouted by body (to a header-matched or prefix route), which can
    send a request to the wrong model's pool: closed is the default for that reason.
    """

    address: str | None = None
    port: int | None = None
    timeout: float = 1.0
    failure_mode: str = FAILURE_MODES[0]
    max_body_bytes: int = 4 * 1024 * 1024

    def target(self, default: tuple[str, int]) -> tuple[str, int]:
        """The router's address, the file's where it names one, else `default`."""
        if self.address is None and self.port is None:
            return default
        return (self.address or BODY_ROUTER_ADDRESS, self.port or BODY_ROUTER_PORT)


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """What the Envoys of some node.cluster values get; pools include every routed pool."""

    name: str
    node_clusters: tuple[str, ...]
    listeners: tuple[str, ...]
    pools: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RawResources:
    """Hand-written Envoy resources from the `envoy:` escape hatch, served to every group."""

    clusters: tuple[Message, ...] = ()
    listeners: tuple[Message, ...] = ()
    routes: tuple[Message, ...] = ()
    endpoints: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """A validated snapshot file; node_groups always ends with the "default" group."""

    source: str
    listeners: tuple[Listener, ...]
    pools: tuple[Pool, ...]
    node_groups: tuple[NodeGroup, ...]
    raw: RawResources
    body_router: BodyRouterSettings = BodyRouterSettings()

    def group_for(self, node_cluster: str) -> NodeGroup:
        """Nodes whose cluster no group claims get the default group."""
        for group in self.node_groups:
            if node_cluster in group.node_clusters:
                return group
        return self.node_groups[-1]

    def pool(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    def listener(self, name: str) -> Listener:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)


class Problem(NamedTuple):
    """One thing wrong with a snapshot file, located so an editor can jump to it."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"


class SnapshotError(Exception):
    """A snapshot file that must not be served, with every problem found in it."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


# --------------------------------------------------------------------------- reading


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 2
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_TYPE_NAMES |= {list: "a list", dict: "a mapping"}


def _describe(value: object) -> str:
    if value is None:
        return "null"
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    return f"{kind} {_SHORT.repr(value)}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Kind(NamedTuple):
    label: str
    accepts: Callable[[object], bool]


def _is_int(value: object) -> bool:
    # YAML `true` is a bool, and bool is an int subclass: a port of `true` is a typo.
    return isinstance(value, int) and not isinstance(value, bool)


_STRING: Final = _Kind("a string", lambda v: isinstance(v, str))
_INTEGER: Final = _Kind("an integer", _is_int)
_NUMBER: Final = _Kind("a number", lambda v: _is_int(v) or isinstance(v, float))
_LIST: Final = _Kind("a list", lambda v: isinstance(v, list))
_BOOLEAN: Final = _Kind("true or false", lambda v: isinstance(v, bool))
_REQUIRED: Final = object()


class _Reader:
    """Reads a loosely typed YAML tree, recording every problem instead of stopping.

    Getters return the value when it is usable and None (with a problem recorded)
    when it is not, so callers build an object only from good parts.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str) -> None:
        """Keeps the one-line-per-problem contract even for messages quoting library errors."""
        message = message.replace("\n", " ")
        self.problems.append(Problem(self.source, path or "(document)", message))

    def mapping(self, value: object, path: str, keys: tuple[str, ...]) -> dict | None:
        if not isinstance(value, dict):
            self.problem(
                path, f"expected a mapping with keys {', '.join(keys)}; got {_describe(value)}"
            )
            return None
        for key in value:
            if key not in keys:
                printable = isinstance(key, str) and key.isprintable()
                where = _join(path, key) if printable else path
                self.problem(where, f"unknown key {key!r}; expected one of: {', '.join(keys)}")
        return value

    def value(self, m: dict, key: str, path: str, kind: _Kind, default: Any = _REQUIRED) -> Any:
        """An absent or null optional key means its default."""
        here = _join(path, key)
        value = m.get(key)
        if value is None:
            if default is _REQUIRED:
                self.problem(here, f"required key is missing; expected {kind.label}")
            return None if default is _REQUIRED else default
        if kind.accepts(value):
            return value
        hint = ""
        if (
            kind in (_INTEGER, _NUMBER)
            and isinstance(value, str)
            and _QUOTED_NUMBER.fullmatch(value)
        ):
            hint = "; write the number without quotes"
        self.problem(here, f"expected {kind.label}, got {_describe(value)}{hint}")
        return None

    def integer(
        self,
        m: dict,
        key: str,
        path: str,
        low: int,
        high: int,
        default: Any = _REQUIRED,
        hint: str = "",
    ) -> int | None:
        value = self.value(m, key, path, _INTEGER, default)
        if value is None or low <= value <= high:
            return value
        self.problem(_join(path, key), f"{value} is out of range {low}..{high}{hint}")
        return None

    def seconds(
        self, m: dict, key: str, path: str, default: float, low: float, hint: str
    ) -> float | None:
        value = self.value(m, key, path, _NUMBER, default)
        if value is None:
            return None
        # Compare before float(): a huge YAML int would overflow the conversion.
        if low <= value <= MAX_SECONDS:
            return float(value)
        self.problem(
            _join(path, key), f"expected seconds from {low:g} to {MAX_SECONDS}, got {value!r}{hint}"
        )
        return None

    def choice(
        self, m: dict, key: str, path: str, options: tuple[str, ...], default: str | None = None
    ) -> str | None:
        value = self.value(m, key, path, _STRING, default or options[0])
        if value is None or value in options:
            return value
        self.problem(
            _join(path, key), f"unknown value {value!r}; expected one of: {', '.join(options)}"
        )
        return None

    def name(self, m: dict, path: str) -> str | None:
        """Returns even a malformed name, so references to it do not also fail."""
        value = self.value(m, "name", path, _STRING)
        if value is not None and not _NAME.fullmatch(value):
            self.problem(
                _join(path, "name"),
                f"invalid name {value!r}: use letters, digits and _ . : - "
                "(starting with a letter or digit)",
            )
        return value

    def text(self, m: dict, key: str, path: str, default: Any = _REQUIRED) -> str | None:
        """A non-empty string that is safe in an HTTP header or a node.cluster."""
        return self.check_text(self.value(m, key, path, _STRING, default), _join(path, key))

    def check_text(self, value: str | None, path: str) -> str | None:
        if value is None or (value and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)):
            return value
        self.problem(path, f"expected a non-empty string without control characters, got {value!r}")
        return None

    def ip(self, m: dict, key: str, path: str, default: Any, hint: str) -> str | None:
        value = self.value(m, key, path, _STRING, default)
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            self.problem(_join(path, key), f"{value!r} is not an IPv4 or IPv6 address{hint}")
            return None

    def items(self, m: dict, key: str, path: str) -> Iterator[tuple[str, Any]]:
        """(path, item) for each entry of an optional list."""
        here = _join(path, key)
        for index, item in enumerate(self.value(m, key, path, _LIST, []) or ()):
            yield f"{here}[{index}]", item

    def duplicates(self, entries: Iterable[tuple[str, str]], what: str, hint: str = "") -> None:
        first: dict[str, str] = {}
        for path, key in entries:
            if key in first:
                self.problem(path, f"duplicate {what} {key!r} (first at {first[key]}){hint}")
            else:
                first[key] = path


def _name_entries(section: object, path: str) -> list[tuple[str, str]]:
    """(path, name) of each entry as written, whether or not the rest of the entry is valid."""
    if not isinstance(section, list):
        return []
    return [
        (f"{path}[{index}].name", item["name"])
        for index, item in enumerate(section)
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]


def _declared_names(section: object) -> set[str]:
    """Names as written, so references resolve even when the named entry has other errors."""
    return {name for _, name in _name_entries(section, "")}


def _unknown(what: str, name: str, known: set[str]) -> str:
    defined = ", ".join(sorted(known)) or "none"
    return f"unknown {what} {name!r}; defined {what}s: {defined}"


# --------------------------------------------------------------------------- sections

_ENDPOINT_KEYS: Final = ("address", "port", "zone", "weight")
_POOL_KEYS: Final = (
    "name",
    "lb_policy",
    "weighting",
    "connect_timeout",
    "endpoints",
    "policy",
    "orca",
)
_ROUTE_KEYS: Final = ("model", "prefix", "pool", "split", "timeout")
_SPLIT_KEYS: Final = ("pool", "weight")
_LISTENER_KEYS: Final = ("name", "port", "address", "body_routing", "routes")
_BODY_ROUTER_KEYS: Final = ("address", "port", "timeout", "failure_mode", "max_body_bytes")
_GROUP_KEYS: Final = ("name", "node_clusters", "listeners", "pools")
_TOP_KEYS: Final = ("listeners", "pools", "node_groups", "body_router", "envoy")

_EDS_HINT: Final = "; EDS endpoints are not resolved by DNS, so give the IP address"
_WEIGHT_HINT: Final = " (Envoy rejects weight 0: remove or drain the endpoint instead)"


def _read_endpoint(r: _Reader, value: object, path: str) -> Endpoint | None:
    m = r.mapping(value, path, _ENDPOINT_KEYS)
    if m is None:
        return None
    address = r.ip(m, "address", path, _REQUIRED, _EDS_HINT)
    port = r.integer(m, "port", path, 1, 65535)
    zone = r.value(m, "zone", path, _STRING, "")
    weight = r.integer(m, "weight", path, 1, MAX_WEIGHT, 1, _WEIGHT_HINT)
    if address is None or port is None or zone is None or weight is None:
        return None
    return Endpoint(address, port, zone, weight)


def _check_weight_sums(r: _Reader, path: str, endpoints: list[Endpoint]) -> None:
    """Envoy refuses an assignment whose locality or overall weight sum overflows uint32."""
    sums: dict[str, int] = {}
    for endpoint in endpoints:
        sums[endpoint.zone] = sums.get(endpoint.zone, 0) + endpoint.weight
    for zone, total in sorted(sums.items()):
        if total > UINT32_MAX:
            r.problem(
                path, f"weights in zone {zone!r} sum to {total}, over Envoy's limit {UINT32_MAX}"
            )
    if all(total <= UINT32_MAX for total in sums.values()) and sum(sums.values()) > UINT32_MAX:
        r.problem(
            path,
            f"weights sum to {sum(sums.values())} over all zones, over Envoy's limit {UINT32_MAX}",
        )


def _read_pool(r: _Reader, value: object, path: str) -> Pool | None:
    m = r.mapping(value, path, _POOL_KEYS)
    if m is None:
        return None
    name = r.name(m, path)
    weighting = r.choice(m, "weighting", path, WEIGHTINGS)
    # Load-aware weights set the shares; least request underneath steers each request
    # between two weight pushes (it measured better than round robin, bench/balance.py).
    default_lb = "least_request" if weighting == "orca" else None
    lb_policy = r.choice(m, "lb_policy", path, LB_POLICIES, default_lb)
    connect_timeout = r.seconds(
        m, "connect_timeout", path, 1.0, MIN_CONNECT_TIMEOUT, " (Envoy needs a positive timeout)"
    )
    entries = [(p, e) for p, v in r.items(m, "endpoints", path) if (e := _read_endpoint(r, v, p))]
    r.duplicates(((p, e.key) for p, e in entries), "endpoint")
    endpoints = [e for _, e in entries]
    _check_weight_sums(r, _join(path, "endpoints"), endpoints)
    policy, orca = _read_policy(r, m, path)
    if lb_policy == CSWRR and weighting == "orca":
        r.problem(
            _join(path, "weighting"),
            f"{CSWRR} computes its own weights from ORCA and ignores EDS weights: "
            "use weighting: static with it, or weighting: orca with round_robin or least_request",
        )
        return None
    if name is None or lb_policy is None or weighting is None or connect_timeout is None:
        return None
    if policy is None or orca is None:
        return None
    return Pool(name, lb_policy, weighting, tuple(endpoints), connect_timeout, policy, orca)


def _read_policy(r: _Reader, m: dict, path: str) -> tuple[str | None, Params | None]:
    """The weight policy and its parameters, checked now so a typo names its place in the
    file instead of surfacing later as a log line from the weight engine."""
    spec = r.value(m, "policy", path, _STRING, "headroom")
    raw = m.get("orca") or {}
    if not isinstance(raw, dict):
        r.problem(_join(path, "orca"), f"expected a mapping, got {_describe(raw)}")
        return spec, None
    try:
        params = parse_params(raw)
    except ParamError as err:
        for key, message in err.problems:
            r.problem(_join(_join(path, "orca"), key), message)
        return spec, None
    if spec is not None:
        try:
            load_policy(spec, params)
        except PolicyError as err:
            r.problem(_join(path, "policy"), str(err))
            return None, params
    return spec, params


def _read_route(r: _Reader, value: object, path: str, pool_names: set[str]) -> Route | None:
    m = r.mapping(value, path, _ROUTE_KEYS)
    if m is None:
        return None
    if sum(m.get(key) is not None for key in ("model", "prefix")) != 1:
        r.problem(
            path,
            f"a route needs exactly one of 'model' (matches header {MODEL_HEADER}) "
            "or 'prefix' (matches the request path)",
        )
        return None
    model = r.text(m, "model", path, None)
    prefix = r.value(m, "prefix", path, _STRING, None)
    if prefix is not None and not prefix.startswith("/"):
        r.problem(_join(path, "prefix"), f"a path prefix starts with '/', got {prefix!r}")
        prefix = None
    timeout = r.seconds(m, "timeout", path, 300.0, 0, " (0 disables the timeout)")
    if (m.get("pool") is None) == (m.get("split") is None):
        r.problem(path, "a route needs exactly one of 'pool' or 'split' (pools sharing by weight)")
        return None
    split: tuple[SplitTarget, ...] = ()
    if m.get("split") is None:
        pool = _pool_reference(r, m, path, pool_names)
        routable = pool is not None
    else:
        pool, split = None, _read_split(r, m, path, pool_names)
        routable = bool(split)
    if not routable or timeout is None or (model is None and prefix is None):
        return None
    return Route(pool, model, prefix, timeout, split)


def _pool_reference(r: _Reader, m: dict, path: str, pool_names: set[str]) -> str | None:
    pool = r.value(m, "pool", path, _STRING)
    if pool is not None and pool not in pool_names:
        r.problem(_join(path, "pool"), _unknown("pool", pool, pool_names))
        return None
    return pool


def _read_split(r: _Reader, m: dict, path: str, pool_names: set[str]) -> tuple[SplitTarget, ...]:
    """Empty when anything is wrong (a problem is recorded), so no partial split is served."""
    here = _join(path, "split")
    items = m["split"]
    if not isinstance(items, list) or not items:
        r.problem(here, f"expected a non-empty list of {{pool, weight}}, got {_describe(items)}")
        return ()
    entries: list[tuple[str, SplitTarget]] = []
    broken = False
    for index, item in enumerate(items):
        item_path = f"{here}[{index}]"
        target = _read_split_target(r, item, item_path, pool_names)
        broken |= target is None
        if target is not None:
            entries.append((item_path, target))
    r.duplicates(((p, t.pool) for p, t in entries), "pool in the split", "; merge the weights")
    pools = [t.pool for _, t in entries]
    if broken or len(set(pools)) != len(pools):
        return ()
    if sum(t.weight for _, t in entries) > UINT32_MAX:
        r.problem(here, f"weights sum over Envoy's limit {UINT32_MAX}")
        return ()
    return tuple(t for _, t in entries)


def _read_split_target(
    r: _Reader, value: object, path: str, pool_names: set[str]
) -> SplitTarget | None:
    m = r.mapping(value, path, _SPLIT_KEYS)
    if m is None:
        return None
    pool = _pool_reference(r, m, path, pool_names)
    weight = r.integer(
        m, "weight", path, 1, MAX_WEIGHT, _REQUIRED, " (a share of traffic; remove the entry for 0)"
    )
    if pool is None or weight is None:
        return None
    return SplitTarget(pool, weight)


def _read_listener(r: _Reader, value: object, path: str, pool_names: set[str]) -> Listener | None:
    m = r.mapping(value, path, _LISTENER_KEYS)
    if m is None:
        return None
    name = r.name(m, path)
    port = r.integer(m, "port", path, 1, 65535)
    address = r.ip(m, "address", path, "0.0.0.0", "")
    entries = [
        (p, route)
        for p, v in r.items(m, "routes", path)
        if (route := _read_route(r, v, p, pool_names))
    ]
    r.duplicates(
        ((p, route.model) for p, route in entries if route.model is not None),
        "model",
        "; the first route for a model takes all its requests",
    )
    routes = tuple(route for _, route in entries)
    written = m.get("routes")
    has_models = isinstance(written, list) and any(
        isinstance(route, dict) and route.get("model") is not None for route in written
    )
    body_routing = r.value(m, "body_routing", path, _BOOLEAN, has_models)
    if body_routing and not has_models:
        r.problem(
            _join(path, "body_routing"),
            "body routing picks among model routes and this listener has none: add a "
            "'model' route or set body_routing: false",
        )
    if name is None or port is None or address is None or body_routing is None:
        return None
    return Listener(name, port, address, routes, body_routing)


def _read_body_router(r: _Reader, top: dict) -> BodyRouterSettings:
    """Defaults for an absent section, and for its parts that have problems (already recorded)."""
    value = top.get("body_router")
    m = {} if value is None else r.mapping(value, "body_router", _BODY_ROUTER_KEYS) or {}
    path = "body_router"
    default = BodyRouterSettings()
    timeout = r.seconds(m, "timeout", path, default.timeout, 0.001, " (per message to the router)")
    if timeout is not None and timeout > MAX_ROUTER_TIMEOUT:
        r.problem(_join(path, "timeout"), f"Envoy allows at most {MAX_ROUTER_TIMEOUT:g} seconds")
    max_body = r.integer(
        m,
        "max_body_bytes",
        path,
        1024,
        MAX_BODY_BYTES,
        default.max_body_bytes,
        " (the router reads a whole body in one message)",
    )
    return BodyRouterSettings(
        address=r.ip(m, "address", path, None, ""),
        port=r.integer(m, "port", path, 1, 65535, None),
        timeout=timeout or default.timeout,
        failure_mode=r.choice(m, "failure_mode", path, FAILURE_MODES) or default.failure_mode,
        max_body_bytes=max_body or default.max_body_bytes,
    )


def _read_references(
    r: _Reader, m: dict, key: str, path: str, known: set[str], what: str
) -> tuple[str, ...]:
    names = []
    for item_path, item in r.items(m, key, path):
        if not isinstance(item, str):
            r.problem(item_path, f"expected a {what} name, got {_describe(item)}")
        elif item not in known:
            r.problem(item_path, _unknown(what, item, known))
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
    r: _Reader, value: object, path: str, listener_names: set[str], pool_names: set[str]
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
    here = _join(path, "node_clusters")
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
    group = NodeGroup(name, tuple(c for _, c in clusters), listeners, pools)
    return _GroupEntry(path, group, tuple(p for p, _ in clusters))


def _node_cluster(r: _Reader, value: object, path: str) -> str | None:
    if not isinstance(value, str):
        r.problem(path, f"expected a node cluster name (a string), got {_describe(value)}")
        return None
    return r.check_text(value, path)


def _read_groups(
    r: _Reader, top: dict, listener_names: set[str], pool_names: set[str]
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


def _complete_groups(
    r: _Reader, entries: list[_GroupEntry], listeners: list[tuple[str, Listener]], pools: list[Pool]
) -> tuple[NodeGroup, ...]:
    """Add routed pools to each group, add the implicit default group, and check binds."""
    by_name = {listener.name: listener for _, listener in listeners}
    groups: list[NodeGroup] = []
    for entry in entries:
        members = [by_name[name] for name in entry.group.listeners if name in by_name]
        wanted = {pool for listener in members for route in listener.routes for pool in route.pools}
        wanted.update(entry.group.pools)
        group = replace(entry.group, pools=tuple(p.name for p in pools if p.name in wanted))
        _check_binds(r, group.name, [(_join(entry.path, "listeners"), x) for x in members], "")
        groups.append(group)
    if not any(group.name == DEFAULT_GROUP for group in groups):
        names = tuple(listener.name for _, listener in listeners)
        groups.append(NodeGroup(DEFAULT_GROUP, (), names, tuple(p.name for p in pools)))
        hint = "; or define node groups, with a 'default' group for every other node"
        _check_binds(r, DEFAULT_GROUP, listeners, hint)
    groups.sort(key=lambda group: group.name == DEFAULT_GROUP)
    return tuple(groups)


def _check_binds(r: _Reader, group: str, listeners: list[tuple[str, Listener]], hint: str) -> None:
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


def _parse_message(item: dict, message: type[Message]) -> Message:
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


def _read_raw_entry(r: _Reader, item: object, path: str, kind: _RawKind) -> Message | None:
    full_name = kind.message.DESCRIPTOR.full_name
    if not isinstance(item, dict):
        r.problem(path, f"expected a {full_name} in proto3 JSON (a mapping), got {_describe(item)}")
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


def _read_raw(r: _Reader, top: dict, generated: dict[str, set[str]]) -> RawResources:
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


# --------------------------------------------------------------------------- entry points


def _load_yaml(r: _Reader, text: str) -> tuple[bool, Any]:
    try:
        return True, yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        path = f"line {mark.line + 1} column {mark.column + 1}" if mark else ""
        context = f" ({err.context})" if err.context else ""
        r.problem(path, f"invalid YAML: {err.problem}{context}")
    except yaml.YAMLError as err:
        r.problem("", f"invalid YAML: {' '.join(str(err).split())}")
    except Exception as err:  # PyYAML raises ValueError etc. for values like 2001-13-01
        r.problem("", f"invalid YAML value: {err}")
    return False, None


def _read_config(r: _Reader, document: object) -> Config | None:
    top = r.mapping(document, "", _TOP_KEYS)
    if top is None:
        return None
    pool_names = _declared_names(top.get("pools"))
    listener_names = _declared_names(top.get("listeners"))
    listeners = [
        (p, x)
        for p, v in r.items(top, "listeners", "")
        if (x := _read_listener(r, v, p, pool_names))
    ]
    pools = [(p, pool) for p, v in r.items(top, "pools", "") if (pool := _read_pool(r, v, p))]
    entries = _read_groups(r, top, listener_names, pool_names)
    raw = _read_raw(r, top, {"pools": pool_names, "listeners": listener_names})
    for section in ("listeners", "pools", "node_groups"):
        r.duplicates(
            _name_entries(top.get(section), section), f"{section[:-1].replace('_', ' ')} name"
        )
    pool_list = [pool for _, pool in pools]
    groups = _complete_groups(r, entries, listeners, pool_list)
    body_router = _read_body_router(r, top)
    return Config(
        r.source, tuple(x for _, x in listeners), tuple(pool_list), groups, raw, body_router
    )


def parse_endpoint(value: object, source: str) -> Endpoint:
    """One endpoint in the file's own form and rules (the admin API adds endpoints with it);
    raises SnapshotError naming each problem by key (`port`, `address`, ...)."""
    r = _Reader(source)
    endpoint = _read_endpoint(r, value, "")
    if r.problems or endpoint is None:
        raise SnapshotError(r.problems)
    return endpoint


def parse_config(text: str, source: str) -> Config:
    """Parse and validate a snapshot document; raises SnapshotError naming every problem."""
    r = _Reader(source)
    loaded, document = _load_yaml(r, text)
    config = _read_config(r, document) if loaded else None
    if r.problems or config is None:
        raise SnapshotError(r.problems)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a snapshot file; an unreadable file is a SnapshotError too."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not UTF-8 text ({err.reason})"
        raise SnapshotError([Problem(source, "(file)", f"cannot read the file: {reason}")]) from err
    return parse_config(text, source)
