"""Metrics of the control loop and the trust boundary, read from live objects at scrape time.

The load-to-weights loop (LRS pacing, the weight engine's rounds) and who was kept out
(limits, certificate identities, early reports, TLS rotation); `xds_server.metrics`
registers them next to the protocol and state series.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lrs.load_reporting_service import LoadReportingService
from lrs.weights.engine import WeightEngine
from xds_server.admission import Admission
from xds_server.replicas.replication import Replication
from xds_server.tls import ServerTls
from xds_server.xds.clients import ClientRegistry

__all__ = ["ControlLoopCollector", "ReplicaCollector", "TrustCollector"]


class TrustCollector(Collector):
    """Who was kept out and why: limits, certificate identities, early LRS reports, and
    the TLS files' rotation. A rising refusal count names its reason (and the log line
    the refused client's identity)."""

    def __init__(
        self,
        admission: Admission,
        clients: ClientRegistry,
        lrs: LoadReportingService,
        tls: Callable[[], ServerTls | None],
    ) -> None:
        self.admission = admission
        self.clients = clients
        self.lrs = lrs
        self.tls = tls

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "xds_client_refused",
            "streams refused or ended by a limit or a certificate identity, by reason",
            labels=("service", "reason"),
        )
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for key, count in self.admission.refused.items():
            counts[key] += count
        for reason, count in self.clients.refused.items():
            counts[("xds", reason)] += count
        for reason, count in self.lrs.refused.items():
            counts[("lrs", reason)] += count
        for (service, reason), count in sorted(counts.items()):
            refused.add_metric([service, reason], count)
        yield refused
        yield GaugeMetricFamily(
            "xds_open_streams", "xDS and LRS streams open", value=self.admission.open_streams
        )
        yield CounterMetricFamily(
            "xds_stream_admission_wait_seconds",
            "time new streams spent waiting for admission (the reconnect pacing), summed",
            value=self.admission.waited,
        )
        yield CounterMetricFamily(
            "xds_lrs_reports_early",
            "load reports dropped unparsed: sooner than the asked interval allows",
            value=self.lrs.reports_early,
        )
        tls = self.tls()
        if tls is not None:
            yield CounterMetricFamily(
                "xds_tls_reloads", "new TLS files taken on the gRPC ports", value=tls.reloads
            )
            yield CounterMetricFamily(
                "xds_tls_reload_failures",
                "changed TLS files that could not be used (the previous ones kept serving)",
                value=tls.reload_failures,
            )


class ControlLoopCollector(Collector):
    """The load-to-weights loop: LRS pacing (back-pressure) and the weight engine's rounds.

    An operator sees here why weights react slowly (a raised reporting interval under
    ingest load) or not at all (a failing custom policy)."""

    def __init__(self, lrs: LoadReportingService, engine: WeightEngine) -> None:
        self.lrs = lrs
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        lrs = self.lrs
        yield GaugeMetricFamily(
            "xds_lrs_reporting_interval_seconds",
            "load_reporting_interval sent to Envoys (raised above lrs_interval under ingest load)",
            value=lrs.reporting_interval,
        )
        yield GaugeMetricFamily(
            "xds_lrs_ingest_cpu_cores",
            "CPU spent merging load reports, in cores, recently",
            value=lrs.ingest_cpu_share,
        )
        yield GaugeMetricFamily(
            "xds_lrs_ingest_cpu_budget_cores",
            "ingest CPU above which reporters are asked to report less often",
            value=lrs.cpu_budget,
        )
        pushes = CounterMetricFamily(
            "xds_weight_pushes", "EDS pushes of engine-computed weights", labels=["pool"]
        )
        for name, state in self.engine.pools.items():
            pushes.add_metric([name], state.pushes)
        yield pushes
        yield CounterMetricFamily(
            "xds_weight_policy_errors",
            "weight policy calls that failed or gave invalid weights (weights kept)",
            value=self.engine.policy_errors,
        )
        yield CounterMetricFamily(
            "xds_weight_rounds_failed",
            "weight engine rounds that failed",
            value=self.engine.step_errors,
        )


class ReplicaCollector(Collector):
    """Replicas sharing state through Redis: is Redis there, who leads, what it costs."""

    def __init__(self, replication: Replication) -> None:
        self.replication = replication

    def collect(self) -> Iterator[Metric]:
        r = self.replication
        yield GaugeMetricFamily(
            "xds_redis_connected",
            "1 while Redis is reachable; 0: serving the last known overlay and weights",
            value=1 if r.link.connected else 0,
        )
        yield CounterMetricFamily(
            "xds_redis_failures",
            "Redis commands that failed because Redis was unreachable",
            value=r.link.failures,
        )
        yield GaugeMetricFamily(
            "xds_replica_leader", "1 while this replica computes weights", value=int(r.lease.holder)
        )
        yield CounterMetricFamily(
            "xds_replica_elections", "times this replica took the lease", value=r.lease.elections
        )
        yield CounterMetricFamily(
            "xds_replica_fenced_writes",
            "weight writes refused because this replica's lease had moved on",
            value=r.weights.refused,
        )
        yield GaugeMetricFamily(
            "xds_replicas", "replicas publishing load (this one included)", value=r.load.replicas
        )
        traffic = CounterMetricFamily(
            "xds_replica_load_bytes",
            "bytes of load windows written to and read from Redis",
            labels=("direction",),
        )
        traffic.add_metric(["written"], r.load.bytes_written)
        traffic.add_metric(["read"], r.load.bytes_read)
        yield traffic
