"""The validated model as Envoy resources, per node group.

Pure functions with no gRPC: the cache versions resources by content hash, so
the same model must always give byte-identical messages (no maps, no clocks,
fixed orders). The weight engine reuses `cluster_load_assignment` to publish
new weights through the same path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from lrs.signals import PoolWeights
from xds_server import typeurls
from xds_server.model import MODEL_HEADER, Config, Listener, NodeGroup, Pool, Route

HCM_FILTER: Final = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER: Final = "envoy.filters.http.router"
_LB_POLICIES: Final = {
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
}
#: vLLM sends its ORCA header only when asked, and Envoy forwards that header to
#: the client unless removed: backend load should not leak to callers.
ORCA_FORMAT_HEADER: Final = "endpoint-load-metrics-format"
ORCA_RESPONSE_HEADERS: Final = ("endpoint-load-metrics", "endpoint-load-metrics-bin")
#: ORCA reaches LRS only for the metric names a cluster lists here.
ORCA_LRS_METRICS: Final = (
    "named_metrics.*",
    "cpu_utilization",
    "mem_utilization",
    "application_utilization",
)

Resources = dict[str, dict[str, Message]]


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _socket_address(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=address, port_value=port)
    )


def listener(spec: Listener) -> listener_pb2.Listener:
    """An HTTP listener whose routes come over RDS, so route edits do not drain connections."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=spec.name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=spec.name),
        http_filters=[
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_pack(router_pb2.Router()))
        ],
    )
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=_pack(manager))]
    )
    return listener_pb2.Listener(
        name=spec.name, address=_socket_address(spec.address, spec.port), filter_chains=[chain]
    )


def _route(spec: Route, pool: Pool) -> route_components_pb2.Route:
    match = route_components_pb2.RouteMatch(prefix=spec.prefix or "/")
    if spec.model is not None:
        exact = string_pb2.StringMatcher(exact=spec.model)
        match.headers.add(name=MODEL_HEADER, string_match=exact)
    route = route_components_pb2.Route(
        match=match,
        route=route_components_pb2.RouteAction(cluster=spec.pool, timeout=_duration(spec.timeout)),
    )
    if pool.weighting == "orca":
        route.request_headers_to_add.add(
            header=base_pb2.HeaderValue(key=ORCA_FORMAT_HEADER, value="TEXT"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        route.response_headers_to_remove.extend(ORCA_RESPONSE_HEADERS)
    return route


def route_configuration(spec: Listener, config: Config) -> route_pb2.RouteConfiguration:
    """Routes in file order: Envoy takes the first match, so order is the user's priority."""
    host = route_components_pb2.VirtualHost(
        name=spec.name,
        domains=["*"],
        routes=[_route(route, config.pool(route.pool)) for route in spec.routes],
    )
    return route_pb2.RouteConfiguration(name=spec.name, virtual_hosts=[host])


def cluster(pool: Pool) -> cluster_pb2.Cluster:
    """An EDS cluster with locality weighting on, so zone weights set in EDS take effect."""
    common = cluster_pb2.Cluster.CommonLbConfig(
        locality_weighted_lb_config=cluster_pb2.Cluster.CommonLbConfig.LocalityWeightedLbConfig()
    )
    result = cluster_pb2.Cluster(
        name=pool.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_duration(pool.connect_timeout),
        lb_policy=_LB_POLICIES[pool.lb_policy],
        common_lb_config=common,
    )
    if pool.weighting == "orca":
        result.lrs_report_endpoint_metrics.extend(ORCA_LRS_METRICS)
    return result


def cluster_load_assignment(
    pool: Pool, weights: PoolWeights | None = None
) -> endpoint_pb2.ClusterLoadAssignment:
    """One locality per zone (sorted), weighted by the sum of its endpoints' weights.

    With locality weighting on, that sum keeps each endpoint's share of traffic
    exactly what its weight says, whatever the zones. `weights` are the weight
    engine's: effective endpoint weights, and saturated endpoints moved to
    priority 1, where Envoy sends traffic only when priority 0 runs short.
    """
    effective = weights.endpoints if weights is not None else {}
    saturated = weights.saturated if weights is not None else frozenset()
    zone_weights = weights.localities if weights is not None else {}
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=pool.name)
    for priority in (0, 1):
        for zone in sorted({endpoint.zone for endpoint in pool.endpoints}):
            members = [
                (e, effective.get(e.key, e.weight))
                for e in pool.endpoints
                if e.zone == zone and (e.key in saturated) == (priority == 1)
            ]
            if not members:
                continue
            total = sum(w for _, w in members)
            assignment.endpoints.add(
                locality=base_pb2.Locality(zone=zone),
                priority=priority,
                load_balancing_weight=wrappers_pb2.UInt32Value(
                    value=zone_weights.get(zone, total) if priority == 0 else total
                ),
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=_socket_address(e.address, e.port)
                        ),
                        load_balancing_weight=wrappers_pb2.UInt32Value(value=w),
                    )
                    for e, w in members
                ],
            )
    return assignment


def build_group_resources(
    config: Config, group: NodeGroup, weights: Mapping[str, PoolWeights] | None = None
) -> Resources:
    """type_url -> name -> message for one node group, raw escape-hatch resources included.

    `weights`: the weight engine's current weights per pool (pools without use the file's).
    """
    weights = weights or {}
    out: Resources = {type_url: {} for type_url in typeurls.ORDER}
    for name in group.listeners:
        spec = config.listener(name)
        out[typeurls.LISTENER][name] = listener(spec)
        out[typeurls.ROUTE][name] = route_configuration(spec, config)
    for name in group.pools:
        pool = config.pool(name)
        out[typeurls.CLUSTER][name] = cluster(pool)
        out[typeurls.ENDPOINT][name] = cluster_load_assignment(pool, weights.get(name))
    raw = config.raw
    out[typeurls.CLUSTER].update((m.name, m) for m in raw.clusters)
    out[typeurls.LISTENER].update((m.name, m) for m in raw.listeners)
    out[typeurls.ROUTE].update((m.name, m) for m in raw.routes)
    out[typeurls.ENDPOINT].update((m.cluster_name, m) for m in raw.endpoints)
    return out


def build_all(
    config: Config, weights: Mapping[str, PoolWeights] | None = None
) -> dict[str, Resources]:
    """Resources for every node group, keyed by group name."""
    return {
        group.name: build_group_resources(config, group, weights) for group in config.node_groups
    }
