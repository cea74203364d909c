"""Helpers for protocol tests: a running discovery server over a hand-made cache."""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from xds_server.xds import typeurls
from xds_server.xds.cache import ResourceCache


def cluster(name: str, timeout_s: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.seconds = timeout_s
    return c


def assignment(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    locality = cla.endpoints.add()
    for port in ports:
        ep = locality.lb_endpoints.add()
        ep.endpoint.address.socket_address.address = "127.0.0.1"
        ep.endpoint.address.socket_address.port_value = port
    return cla


def listener(name: str, port: int) -> listener_pb2.Listener:
    lis = listener_pb2.Listener(name=name)
    lis.address.socket_address.address = "127.0.0.1"
    lis.address.socket_address.port_value = port
    return lis


def route(name: str, cluster_name: str) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vh = rc.virtual_hosts.add(name=name, domains=["*"])
    r = vh.routes.add()
    r.match.prefix = "/"
    r.route.cluster = cluster_name
    return rc


def group(
    clusters: Mapping[str, tuple[int, ...]] | None = None,
    listeners: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """clusters: name -> endpoint ports; listeners: name -> cluster it routes to."""
    clusters = clusters or {}
    listeners = listeners or {}
    return {
        typeurls.CLUSTER: {n: cluster(n) for n in clusters},
        typeurls.ENDPOINT: {n: assignment(n, *p) for n, p in clusters.items()},
        typeurls.LISTENER: {n: listener(n, 10000 + i) for i, n in enumerate(listeners)},
        typeurls.ROUTE: {n: route(n, c) for n, c in listeners.items()},
    }


def set_groups(
    cache: ResourceCache, groups: dict[str, dict], by_cluster: dict[str, str] | None = None
) -> None:
    mapping = by_cluster or {}
    cache.set_all(groups, lambda node_cluster: mapping.get(node_cluster, "default"))
