"""Prometheus series of the Kubernetes source, read from the live watches at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xds_server.kubernetes.source import KubernetesSource

__all__ = ["KubernetesCollector"]

_RESOURCES = ("endpointslices", "pods", "inferencepools")


class KubernetesCollector(Collector):
    """Is the API server there, how often did watches fail or re-list, what was written."""

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        source = self.source
        yield GaugeMetricFamily(
            "xds_kubernetes_connected",
            "1 while every watch has its API server; 0: serving the last known endpoints",
            value=1 if source.connected else 0,
        )
        yield GaugeMetricFamily(
            "xds_kubernetes_synced", "1 once every watch has listed", value=int(source.synced)
        )
        for name, what, text in (
            ("xds_kubernetes_watch_errors", "errors", "failed lists and watches (then back-off)"),
            ("xds_kubernetes_relists", "relists", "lists again after 410 Gone"),
        ):
            family = CounterMetricFamily(name, text, labels=("resource",))
            counts = source.counts(what)
            for resource in _RESOURCES:
                family.add_metric([resource], counts[resource])
            yield family
        events = CounterMetricFamily(
            "xds_kubernetes_watch_events", "watch events received", labels=("resource", "type")
        )
        for kind in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"):
            counts = source.counts(f"event:{kind}")
            for resource in _RESOURCES:
                events.add_metric([resource, kind], counts[resource])
        yield events
        objects = GaugeMetricFamily(
            "xds_kubernetes_objects", "objects held by the watches", labels=("resource",)
        )
        held = {resource: 0 for resource in _RESOURCES}
        for watch in source.watches:
            held[watch.resource.plural] += len(watch.objects)
        for resource, count in held.items():
            objects.add_metric([resource], count)
        yield objects
        yield CounterMetricFamily(
            "xds_kubernetes_publishes",
            "configs published because Kubernetes changed",
            value=source.publishes,
        )
        status = source.status
        writes = CounterMetricFamily(
            "xds_kubernetes_status_writes",
            "InferencePool status patches, by result",
            labels=("result",),
        )
        for result, count in (
            ("written", status.written if status else 0),
            ("conflict", status.conflicts if status else 0),
            ("error", status.errors if status else 0),
        ):
            writes.add_metric([result], count)
        yield writes
