"""Prometheus metrics of one control plane: protocol events as they happen, state at scrape.

Every series is ours (`xds_` prefix) and lives in the control plane's own
CollectorRegistry, so many control planes in one process (the tests) never share
a counter. Labels stay bounded: resource type, protocol, node group, pool,
endpoint, zone; never a node id, a version or a request.

Two kinds of series:
* events (responses, ACKs, NACKs, push-to-ACK time) are counted by an observer
  that ClientRegistry calls as the protocol code records them;
* state (connected clients and their sync, snapshot versions, reloads, pools,
  weights, load signals) is read from the live objects at scrape time by
  collectors, so nothing has to remember to update a gauge.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lrs.load_reporting_service import LoadReportingService
from lrs.weights.engine import WeightEngine
from xds_server.admission import Admission
from xds_server.config.file_source import FileSource
from xds_server.config.types import Pool
from xds_server.control_metrics import ControlLoopCollector, ReplicaCollector, TrustCollector
from xds_server.fleet import FleetView
from xds_server.replicas.replication import Replication
from xds_server.tls import ServerTls
from xds_server.xds import typeurls
from xds_server.xds.cache import ResourceCache, Subscriber
from xds_server.xds.clients import Client, ClientRegistry, TypeStatus, sync_state

__all__ = [
    "ADMIN_REFUSALS",
    "CONVERGENCE_BUCKETS",
    "MAX_LOAD_METRICS",
    "VERSION_HISTORY",
    "LoadCollector",
    "Metrics",
    "ProtocolMetrics",
    "StateCollector",
    "VersionClock",
    "version_number",
]

#: Push-to-ACK times run from ~1 ms (one Envoy, a small change) to seconds (a big fleet).
CONVERGENCE_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)
#: ORCA named metrics come from model servers: cap how many names one scrape exposes.
MAX_LOAD_METRICS: Final = 32
#: How many past versions per group and type keep their set time (ACKs of older ones are late).
VERSION_HISTORY: Final = 64
_PROTOCOL_LABELS: Final = ("type", "protocol", "group")
#: Why the admin API refused a request before routing it (xds_admin_refused_total's reason).
ADMIN_REFUSALS: Final = ("token", "host")


def _type_name(type_url: str) -> str:
    return typeurls.SHORT_NAMES.get(type_url, "other")


def version_number(version: str) -> float:
    """A content-hash version as a gauge value: its first 13 hex digits (52 bits, exact in a
    float). Shows when a version changes and whether instances agree, without a label per
    version."""
    try:
        return float(int(version[:13], 16))
    except ValueError:
        return 0.0


class VersionClock(Subscriber):
    """When each group's version of each type was set in the cache: where push-to-ACK starts.

    Subscribed to the cache like a stream, it is told of every change as it happens.
    A version that comes back (a drain undone) restarts its clock.
    """

    def __init__(self, cache: ResourceCache) -> None:
        self.cache = cache
        self._set_at: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        self._current: dict[tuple[str, str], str] = {}
        cache.subscribe(self)
        self.notify()

    def notify(self) -> None:
        now = time.time()
        for group in self.cache.groups.values():
            for type_url, snapshot in group.types.items():
                key = (group.name, type_url)
                if self._current.get(key) == snapshot.version:
                    continue
                self._current[key] = snapshot.version
                versions = self._set_at[key]
                versions.pop(snapshot.version, None)
                versions[snapshot.version] = now
                if len(versions) > VERSION_HISTORY:
                    del versions[next(iter(versions))]

    def set_at(self, group: str, type_url: str, version: str) -> float | None:
        return self._set_at.get((group, type_url), {}).get(version)

    def close(self) -> None:
        self.cache.unsubscribe(self)


class ProtocolMetrics:
    """Counts responses, ACKs and NACKs and times push-to-ACK; a ClientRegistry observer."""

    def __init__(self, registry: CollectorRegistry, clock: VersionClock) -> None:
        self.clock = clock
        self.responses = Counter(
            "xds_responses_sent",
            "xDS responses sent to clients",
            _PROTOCOL_LABELS,
            registry=registry,
        )
        self.acks = Counter(
            "xds_acks", "responses ACKed by clients", _PROTOCOL_LABELS, registry=registry
        )
        self.nacks = Counter(
            "xds_nacks",
            "responses NACKed (rejected) by clients",
            _PROTOCOL_LABELS,
            registry=registry,
        )
        self.convergence = Histogram(
            "xds_push_convergence_seconds",
            "from a version being set in the cache (or the client connecting, if later) "
            "to the client's ACK of it",
            _PROTOCOL_LABELS,
            buckets=CONVERGENCE_BUCKETS,
            registry=registry,
        )

    def __call__(self, event: str, client: Client, type_url: str) -> None:
        labels = (_type_name(type_url), client.protocol, client.group or "none")
        if event == "response":
            self.responses.labels(*labels).inc()
        elif event == "nack":
            self.nacks.labels(*labels).inc()
        elif event == "ack":
            self.acks.labels(*labels).inc()
            self._time_ack(client, type_url, client.status(type_url), labels)

    def _time_ack(
        self, client: Client, type_url: str, status: TypeStatus, labels: tuple[str, ...]
    ) -> None:
        set_at = self.clock.set_at(client.group, type_url, status.acked_version)
        if set_at is not None:
            started = max(set_at, client.connected_at)
            self.convergence.labels(*labels).observe(max(time.time() - started, 0.0))


class StateCollector(Collector):
    """Clients, snapshot and file state, read at scrape time."""

    def __init__(self, cache: ResourceCache, registry: ClientRegistry, source: FileSource) -> None:
        self.cache = cache
        self.registry = registry
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from self._clients()
        yield from self._snapshot()
        yield from self._file()

    def _clients(self) -> Iterator[Metric]:
        connected: dict[tuple[str, ...], int] = defaultdict(int)
        sync: dict[tuple[str, ...], int] = defaultdict(int)
        for client in self.registry:
            group = client.group or "none"
            connected[(client.protocol, group)] += 1
            served = self.cache.group_for(client.node_cluster)
            for type_url, status in list(client.types.items()):
                state = sync_state(status, served.of_type(type_url).version)
                sync[(client.protocol, group, _type_name(type_url), state)] += 1
        yield _gauge(
            "xds_connected_clients",
            "connected xDS streams (one per ADS stream or per-type stream)",
            ("protocol", "group"),
            connected,
        )
        yield _gauge(
            "xds_client_sync",
            "connected streams per type by sync state: in_sync (answered at the current "
            "version), pending (a newer version not yet ACKed), rejected (latest answer a NACK)",
            ("protocol", "group", "type", "state"),
            sync,
        )

    def _snapshot(self) -> Iterator[Metric]:
        version = GaugeMetricFamily(
            "xds_snapshot_version",
            "current version per node group and type, as the number of its first 13 hex digits",
            labels=["group", "type"],
        )
        resources = GaugeMetricFamily(
            "xds_snapshot_resources",
            "resources served per node group and type",
            labels=["group", "type"],
        )
        for group in self.cache.groups.values():
            for type_url, snapshot in group.types.items():
                labels = [group.name, _type_name(type_url)]
                version.add_metric(labels, version_number(snapshot.version))
                resources.add_metric(labels, len(snapshot.resources))
        yield version
        yield resources
        yield GaugeMetricFamily(
            "xds_snapshot_generation",
            "times the served snapshot changed since start (reloads, API changes, weights)",
            value=self.cache.generation,
        )

    def _file(self) -> Iterator[Metric]:
        source = self.source
        yield CounterMetricFamily(
            "xds_snapshot_reloads", "snapshot file loads that were served", value=source.reloads
        )
        yield CounterMetricFamily(
            "xds_snapshot_reload_failures",
            "snapshot file loads refused (the last good config kept serving)",
            value=source.failures,
        )
        yield CounterMetricFamily(
            "xds_snapshot_watch_errors",
            "snapshot file reloads that failed unexpectedly (logged with a traceback; the "
            "watcher goes on and the last good config keeps serving)",
            value=source.watch_errors,
        )
        yield GaugeMetricFamily(
            "xds_snapshot_last_reload_timestamp_seconds",
            "Unix time of the last served load of the snapshot file",
            value=source.loaded_at,
        )
        ok = source.last is None or source.last.ok
        yield GaugeMetricFamily(
            "xds_snapshot_last_load_ok", "1 if the latest load attempt succeeded", value=int(ok)
        )


class LoadCollector(Collector):
    """Pools, endpoint weights and the load signals behind them, read at scrape time.

    `reports_received` (the LRS side's count of load reports) and the fleet's load
    provider are plugged in when LRS is wired; until then those series are absent.
    """

    def __init__(
        self, fleet: FleetView, reports_received: Callable[[], float] | None = None
    ) -> None:
        self.fleet = fleet
        self.reports_received = reports_received

    def collect(self) -> Iterator[Metric]:
        pl, ep = ("pool",), ("pool", "endpoint")
        families = {
            "pool_endpoints": _family(
                "xds_pool_endpoints", "endpoints served per pool and state", (*pl, "state")
            ),
            "reporting": _family(
                "xds_pool_endpoints_reporting", "endpoints of the pool with load data", pl
            ),
            "drop": _family(
                "xds_pool_drop_fraction",
                "share of the pool's requests Envoy answers with 503 itself (shedding)",
                pl,
            ),
            "static": _family("xds_endpoint_static_weight", "weight set in the file or API", ep),
            "weight": _family(
                "xds_endpoint_weight", "weight sent to Envoy (the weight engine's, else static)", ep
            ),
            "draining": _family("xds_endpoint_draining", "1 while drained through the API", ep),
            "saturated": _family(
                "xds_endpoint_saturated", "1 while moved to priority 1 as saturated", ep
            ),
            "locality": _family(
                "xds_locality_weight", "zone weight set by the weight engine", (*pl, "zone")
            ),
            "rps": _family("xds_endpoint_requests_per_second", "requests finished per second", ep),
            "errors": _family("xds_endpoint_errors_per_second", "failed requests per second", ep),
            "in_progress": _family(
                "xds_endpoint_requests_in_progress", "requests in flight (Envoy's view)", ep
            ),
            "metric": _family(
                "xds_endpoint_load_metric",
                "mean of an ORCA metric over the load window (e.g. named_metrics."
                "kv_cache_usage_perc)",
                (*ep, "metric"),
            ),
            "age": _family(
                "xds_endpoint_load_age_seconds", "seconds since the freshest report of it", ep
            ),
            "reporters": _family(
                "xds_endpoint_load_reporters", "Envoys whose reports are in the window", ep
            ),
        }
        for pool in self.fleet.pools():
            self._pool(pool, families)
        yield from families.values()
        if self.reports_received is not None:
            yield CounterMetricFamily(
                "xds_lrs_load_reports_received",
                "LRS load reports received from Envoys",
                value=self.reports_received(),
            )

    def _pool(self, pool: Pool, families: dict[str, GaugeMetricFamily]) -> None:
        views = self.fleet.endpoints(pool)
        draining = sum(v.endpoint.draining for v in views)
        families["pool_endpoints"].add_metric([pool.name, "active"], len(views) - draining)
        families["pool_endpoints"].add_metric([pool.name, "draining"], draining)
        families["reporting"].add_metric([pool.name], sum(v.load is not None for v in views))
        weights = self.fleet.weights(pool.name)
        if pool.shedding is not None:
            families["drop"].add_metric([pool.name], self.fleet.drop_fraction(pool.name))
        for zone, weight in sorted((weights.localities if weights else {}).items()):
            families["locality"].add_metric([pool.name, zone], weight)
        names = sorted({m for v in views if v.load for m in v.load.metrics})[:MAX_LOAD_METRICS]
        for view in views:
            labels = [pool.name, view.endpoint.key]
            families["static"].add_metric(labels, view.endpoint.weight)
            families["weight"].add_metric(labels, view.effective_weight)
            families["draining"].add_metric(labels, int(view.endpoint.draining))
            families["saturated"].add_metric(labels, int(view.saturated))
            load = view.load
            if load is None:
                continue
            families["rps"].add_metric(labels, load.rps)
            families["errors"].add_metric(labels, load.error_rps)
            families["in_progress"].add_metric(labels, load.in_progress)
            families["age"].add_metric(labels, load.age)
            families["reporters"].add_metric(labels, load.reporters)
            for name in names:
                if name in load.metrics:
                    families["metric"].add_metric([*labels, name], load.metrics[name])


def _family(name: str, documentation: str, labels: tuple[str, ...]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def _gauge(
    name: str, documentation: str, labels: tuple[str, ...], values: dict[tuple[str, ...], int]
) -> GaugeMetricFamily:
    family = _family(name, documentation, labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


class Metrics:
    """All xds_ series of one control plane, in its own registry, served as `/metrics`."""

    def __init__(self, cache: ResourceCache, clients: ClientRegistry, fleet: FleetView) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.clients = clients
        self.clock = VersionClock(cache)
        self.protocol = ProtocolMetrics(self.registry, self.clock)
        clients.observers.append(self.protocol)
        self.admin_requests = Counter(
            "xds_admin_requests",
            "admin API requests by route (the route's pattern, `unmatched` for none), method "
            "and status code",
            ("route", "method", "code"),
            registry=self.registry,
        )
        self.admin_refused = Counter(
            "xds_admin_refused",
            "admin API requests refused before any route ran, by reason: `token` (missing or "
            "wrong bearer token) or `host` (a Host header not allowed)",
            ("reason",),
            registry=self.registry,
        )
        for reason in ADMIN_REFUSALS:  # both series from the start: alerts see 0, not nothing
            self.admin_refused.labels(reason)
        self.load = LoadCollector(fleet)
        self.registry.register(StateCollector(cache, clients, fleet.source))
        self.registry.register(self.load)

    def observe_control_loop(self, lrs: LoadReportingService, engine: WeightEngine) -> None:
        self.registry.register(ControlLoopCollector(lrs, engine))

    def observe_replicas(self, replication: Replication) -> None:
        self.registry.register(ReplicaCollector(replication))

    def observe_trust(
        self,
        admission: Admission,
        lrs: LoadReportingService,
        tls: Callable[[], ServerTls | None],
    ) -> None:
        self.registry.register(TrustCollector(admission, self.clients, lrs, tls))

    def exposition(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)

    def close(self) -> None:
        self.clock.close()
