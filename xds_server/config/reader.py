"""The snapshot file: YAML in, a typed and fully validated Config out.

People edit this file by hand while a fleet serves from it, so every mistake
must be caught here, before anything reaches Envoy (which would NACK it, or
worse, accept something subtly wrong), and reported all at once with the file,
the path in the document and what to do, so one edit-validate round fixes all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, Final, TypeVar

import yaml

from lrs.contract import MAX_WEIGHT
from xds_server.config.groups import complete_groups, read_groups
from xds_server.config.kube_ref import read_kubernetes
from xds_server.config.policies import read_policy
from xds_server.config.problems import (
    BOOLEAN,
    REQUIRED,
    STRING,
    Reader,
    declared_names,
    describe,
    join,
    name_entries,
    unknown,
)
from xds_server.config.raw import read_raw
from xds_server.config.sections import Memo
from xds_server.config.shedding import read_shedding
from xds_server.config.types import (
    CSWRR,
    FAILURE_MODES,
    LB_POLICIES,
    MAX_BODY_BYTES,
    MAX_ROUTER_TIMEOUT,
    MIN_CONNECT_TIMEOUT,
    MODEL_HEADER,
    UINT32_MAX,
    WEIGHTINGS,
    BodyRouterSettings,
    Config,
    Endpoint,
    Listener,
    Pool,
    Problem,
    Route,
    SnapshotError,
    SplitTarget,
)

__all__ = ["load_config", "parse_config", "parse_endpoint"]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
K = TypeVar("K")
V = TypeVar("V")
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
    "kubernetes",
    "shedding",
)
_ROUTE_KEYS: Final = ("model", "prefix", "pool", "split", "timeout")
_SPLIT_KEYS: Final = ("pool", "weight")
_LISTENER_KEYS: Final = ("name", "port", "address", "body_routing", "routes")
_BODY_ROUTER_KEYS: Final = (
    "address",
    "port",
    "timeout",
    "failure_mode",
    "max_body_bytes",
    "tls_sds_dir",
)
_TOP_KEYS: Final = ("listeners", "pools", "node_groups", "body_router", "envoy")

_EDS_HINT: Final = "; EDS endpoints are not resolved by DNS, so give the IP address"
_WEIGHT_HINT: Final = " (Envoy rejects weight 0: remove or drain the endpoint instead)"


def _read_endpoint(r: Reader, value: object, path: str) -> Endpoint | None:
    m = r.mapping(value, path, _ENDPOINT_KEYS)
    if m is None:
        return None
    address = r.ip(m, "address", path, REQUIRED, _EDS_HINT)
    port = r.integer(m, "port", path, 1, 65535)
    zone = r.value(m, "zone", path, STRING, "")
    weight = r.integer(m, "weight", path, 1, MAX_WEIGHT, 1, _WEIGHT_HINT)
    if address is None or port is None or zone is None or weight is None:
        return None
    return Endpoint(address, port, zone, weight)


def _check_weight_sums(r: Reader, path: str, endpoints: list[Endpoint]) -> None:
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


def _read_pool(r: Reader, value: object, path: str, policy_modules: tuple[str, ...]) -> Pool | None:
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
    _check_weight_sums(r, join(path, "endpoints"), endpoints)
    policy, orca = read_policy(r, m, path, policy_modules)
    shedding_ok, shedding = read_shedding(r, m, path, weighting)
    kubernetes = None
    if m.get("kubernetes") is not None:
        kubernetes = read_kubernetes(r, m["kubernetes"], path)
        if m.get("endpoints") is not None:
            r.problem(
                join(path, "endpoints"),
                "a pool takes its endpoints from 'kubernetes' or from 'endpoints', not both",
            )
        if kubernetes is None:
            return None
    if lb_policy == CSWRR and weighting == "orca":
        r.problem(
            join(path, "weighting"),
            f"{CSWRR} computes its own weights from ORCA and ignores EDS weights: "
            "use weighting: static with it, or weighting: orca with round_robin or least_request",
        )
        return None
    if name is None or lb_policy is None or weighting is None or connect_timeout is None:
        return None
    if policy is None or orca is None or not shedding_ok:
        return None
    return Pool(
        name,
        lb_policy,
        weighting,
        tuple(endpoints),
        connect_timeout,
        policy,
        orca,
        kubernetes,
        shedding=shedding,
    )


def _read_route(r: Reader, value: object, path: str, pool_names: set[str]) -> Route | None:
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
    prefix = r.value(m, "prefix", path, STRING, None)
    if prefix is not None and not prefix.startswith("/"):
        r.problem(join(path, "prefix"), f"a path prefix starts with '/', got {prefix!r}")
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


def _pool_reference(r: Reader, m: dict[str, Any], path: str, pool_names: set[str]) -> str | None:
    pool = r.value(m, "pool", path, STRING)
    if pool is not None and pool not in pool_names:
        r.problem(join(path, "pool"), unknown("pool", pool, pool_names))
        return None
    return pool


def _read_split(
    r: Reader, m: dict[str, Any], path: str, pool_names: set[str]
) -> tuple[SplitTarget, ...]:
    """Empty when anything is wrong (a problem is recorded), so no partial split is served."""
    here = join(path, "split")
    items = m["split"]
    if not isinstance(items, list) or not items:
        r.problem(here, f"expected a non-empty list of {{pool, weight}}, got {describe(items)}")
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
    r: Reader, value: object, path: str, pool_names: set[str]
) -> SplitTarget | None:
    m = r.mapping(value, path, _SPLIT_KEYS)
    if m is None:
        return None
    pool = _pool_reference(r, m, path, pool_names)
    weight = r.integer(
        m, "weight", path, 1, MAX_WEIGHT, REQUIRED, " (a share of traffic; remove the entry for 0)"
    )
    if pool is None or weight is None:
        return None
    return SplitTarget(pool, weight)


def _read_listener(r: Reader, value: object, path: str, pool_names: set[str]) -> Listener | None:
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
    body_routing = r.value(m, "body_routing", path, BOOLEAN, has_models)
    if body_routing and not has_models:
        r.problem(
            join(path, "body_routing"),
            "body routing picks among model routes and this listener has none: add a "
            "'model' route or set body_routing: false",
        )
    if name is None or port is None or address is None or body_routing is None:
        return None
    return Listener(name, port, address, routes, body_routing)


def _read_body_router(r: Reader, top: dict[str, Any]) -> BodyRouterSettings:
    """Defaults for an absent section, and for its parts that have problems (already recorded)."""
    value = top.get("body_router")
    m = {} if value is None else r.mapping(value, "body_router", _BODY_ROUTER_KEYS) or {}
    path = "body_router"
    default = BodyRouterSettings()
    timeout = r.seconds(m, "timeout", path, default.timeout, 0.001, " (per message to the router)")
    if timeout is not None and timeout > MAX_ROUTER_TIMEOUT:
        r.problem(join(path, "timeout"), f"Envoy allows at most {MAX_ROUTER_TIMEOUT:g} seconds")
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
        tls_sds_dir=_absolute_path(r, m, "tls_sds_dir", path),
    )


def _absolute_path(r: Reader, m: dict[str, Any], key: str, path: str) -> str | None:
    value = r.value(m, key, path, STRING, None)
    if value is None or (value.startswith("/") and value.isprintable()):
        return value
    r.problem(join(path, key), f"expected an absolute path on the Envoy host, got {value!r}")
    return None


class _Items:
    """Reads a pool or a listener through the memo: its text seen before (with the same
    inputs) gives the same object without reading it again; a read that recorded no
    problem is kept for the next document."""

    def __init__(self, r: Reader, memo: Memo | None, texts: Mapping[str, tuple[str, ...]]) -> None:
        self.r = r
        self.memo = memo
        self.texts = texts

    def _text(self, section: str, index: int) -> str | None:
        texts = self.texts.get(section)
        return texts[index] if texts is not None and index < len(texts) else None

    def pool(
        self, index: int, modules: tuple[str, ...], read: Callable[[], Pool | None]
    ) -> Pool | None:
        text = self._text("pools", index)
        if self.memo is None or text is None:
            return read()
        return self._through(self.memo.pools, (text, modules), read)

    def listener(
        self, index: int, pool_names: frozenset[str], read: Callable[[], Listener | None]
    ) -> Listener | None:
        text = self._text("listeners", index)
        if self.memo is None or text is None:
            return read()
        return self._through(self.memo.listeners, (text, pool_names), read)

    def _through(self, kept: dict[K, V], key: K, read: Callable[[], V | None]) -> V | None:
        if key in kept:
            return kept[key]
        problems = len(self.r.problems)
        value = read()
        if value is not None and len(self.r.problems) == problems:
            kept[key] = value
        return value


# --------------------------------------------------------------------------- entry points


def _load_yaml(r: Reader, text: str) -> tuple[bool, Any]:
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


def _read_config(
    r: Reader, document: object, policy_modules: tuple[str, ...], memo: _Items | None = None
) -> Config | None:
    top = r.mapping(document, "", _TOP_KEYS)
    if top is None:
        return None
    pool_names = declared_names(top.get("pools"))
    listener_names = declared_names(top.get("listeners"))
    memo = memo or _Items(r, None, {})
    names = frozenset(pool_names)
    listeners = [
        (p, x)
        for i, (p, v) in enumerate(r.items(top, "listeners", ""))
        if (x := memo.listener(i, names, partial(_read_listener, r, v, p, pool_names)))
    ]
    pools = [
        (p, pool)
        for i, (p, v) in enumerate(r.items(top, "pools", ""))
        if (pool := memo.pool(i, policy_modules, partial(_read_pool, r, v, p, policy_modules)))
    ]
    entries = read_groups(r, top, listener_names, pool_names)
    raw = read_raw(r, top, {"pools": pool_names, "listeners": listener_names})
    for section in ("listeners", "pools", "node_groups"):
        r.duplicates(
            name_entries(top.get(section), section), f"{section[:-1].replace('_', ' ')} name"
        )
    pool_list = [pool for _, pool in pools]
    groups = complete_groups(r, entries, listeners, pool_list)
    body_router = _read_body_router(r, top)
    return Config(
        r.source, tuple(x for _, x in listeners), tuple(pool_list), groups, raw, body_router
    )


def parse_endpoint(value: object, source: str) -> Endpoint:
    """One endpoint in the file's own form and rules (the admin API adds endpoints with it);
    raises SnapshotError naming each problem by key (`port`, `address`, ...)."""
    r = Reader(source)
    endpoint = _read_endpoint(r, value, "")
    if r.problems or endpoint is None:
        raise SnapshotError(r.problems)
    return endpoint


def parse_config(
    text: str, source: str, *, allowed_policy_modules: Iterable[str] = (), memo: Memo | None = None
) -> Config:
    """Parse and validate a snapshot document; raises SnapshotError naming every problem.

    A custom `policy: module:Class` is imported (and so run) only if its module is in
    `allowed_policy_modules` or under one of them (xds_server.config.policies).
    `memo` (one per followed file): the sections, pools and listeners of the last document
    it saw are not parsed or validated again where their text is the same
    (xds_server.config.sections); the Config is the same as without it."""
    r = Reader(source)
    parts = memo.load(text) if memo is not None else None
    if parts is None:
        loaded, document = _load_yaml(r, text)
        items = _Items(r, memo, {})
    else:
        loaded, document = True, parts.value
        items = _Items(r, memo, parts.items)
    config = _read_config(r, document, tuple(allowed_policy_modules), items) if loaded else None
    if memo is not None:
        memo.keep_only(items.texts)
    if r.problems or config is None:
        raise SnapshotError(r.problems)
    return config


def load_config(
    path: str | os.PathLike[str], *, allowed_policy_modules: Iterable[str] = ()
) -> Config:
    """Read and validate a snapshot file (see parse_config); an unreadable file is a
    SnapshotError too."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not UTF-8 text ({err.reason})"
        raise SnapshotError([Problem(source, "(file)", f"cannot read the file: {reason}")]) from err
    return parse_config(text, source, allowed_policy_modules=allowed_policy_modules)
