"""The validated model as Envoy resources, per node group.

Pure functions with no gRPC: the cache versions resources by content hash, so
the same model must always give byte-identical messages (no maps, no clocks,
fixed orders). The weight engine reuses `cluster_load_assignment` to publish
new weights through the same path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as cswrr_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from lrs.contract import ORCA_FORMAT_HEADER, ORCA_RESPONSE_HEADERS
from lrs.weights.params import Params
from lrs.weights.shedding import DROP_CATEGORY
from lrs.weights.signals import PPM, PoolWeights
from xds_server.bootstrap import tls_transport_socket
from xds_server.config.types import (
    BODY_ROUTER_ADDRESS,
    BODY_ROUTER_PORT,
    CSWRR,
    MODEL_HEADER,
    BodyRouterSettings,
    Config,
    Listener,
    NodeGroup,
    Pool,
    Route,
    SplitTarget,
)
from xds_server.xds import typeurls

__all__ = [
    "BODY_ROUTER_CLUSTER",
    "CSWRR_EXTENSION",
    "CSWRR_MIN_UPDATE",
    "DEFAULT_BODY_ROUTER",
    "DROP_METADATA",
    "EXT_PROC_FILTER",
    "HCM_FILTER",
    "LISTENER_METADATA",
    "ORCA_LRS_METRICS",
    "ROUTER_FILTER",
    "Resources",
    "body_router_cluster",
    "build_all",
    "build_group_resources",
    "cluster",
    "cluster_load_assignment",
    "listener",
    "route_configuration",
]

HCM_FILTER: Final = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER: Final = "envoy.filters.http.router"
EXT_PROC_FILTER: Final = "envoy.filters.http.ext_proc"
#: The body router's cluster; no pool can take the name (pool names start with a letter or digit).
BODY_ROUTER_CLUSTER: Final = "_body_router"
#: gRPC metadata naming the listener on each ext_proc stream: the router's key to its routes.
LISTENER_METADATA: Final = "x-xds-listener"
#: Where the generated config points Envoy when the file names no router and none runs here.
DEFAULT_BODY_ROUTER: Final = (BODY_ROUTER_ADDRESS, BODY_ROUTER_PORT)
_HTTP_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_MODE = processing_mode_pb2.ProcessingMode
_LB_POLICIES: Final = {
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
}
#: vLLM sends its ORCA header only when asked, and Envoy forwards that header to
#: the client unless removed: backend load should not leak to callers.
#: ORCA reaches LRS only for the metric names a cluster lists here.
ORCA_LRS_METRICS: Final = (
    "named_metrics.*",
    "cpu_utilization",
    "mem_utilization",
    "application_utilization",
)

CSWRR_EXTENSION: Final = "envoy.load_balancing_policies.client_side_weighted_round_robin"
#: Envoy raises a shorter weight_update_period to this.
CSWRR_MIN_UPDATE: Final = 0.1
#: The endpoint metadata namespace that carries a shedding pool's drop fraction.
DROP_METADATA: Final = "xds_server.shedding"

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


def listener(
    spec: Listener, body_router: BodyRouterSettings | None = None
) -> listener_pb2.Listener:
    """An HTTP listener whose routes come over RDS, so route edits do not drain connections.

    With body routing, the ext_proc filter runs before the router and Envoy buffers
    request bodies up to the router's limit (larger ones get a JSON 413).
    """
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=spec.name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=spec.name),
        http_filters=[
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_pack(router_pb2.Router()))
        ],
    )
    result = listener_pb2.Listener(name=spec.name, address=_socket_address(spec.address, spec.port))
    if spec.body_routing:
        settings = body_router or BodyRouterSettings()
        manager.http_filters.insert(0, _ext_proc_filter(spec.name, settings))
        manager.local_reply_config.CopyFrom(_too_large_reply(settings.max_body_bytes))
        # The stream buffer limit: ext_proc holds the whole body, so this caps its size.
        result.per_connection_buffer_limit_bytes.value = settings.max_body_bytes
    result.filter_chains.add().filters.add(name=HCM_FILTER, typed_config=_pack(manager))
    return result


def _ext_proc_filter(listener_name: str, settings: BodyRouterSettings) -> hcm_pb2.HttpFilter:
    """Envoy sends the router the request headers, then the whole body (BUFFERED: the
    headers wait for it, so a header set from the body still picks the route).

    STREAMED cannot route: headers leave for the upstream before the first chunk is seen.
    Responses are not sent at all, so server-sent events stream through unbuffered.
    """
    mode = _MODE(
        request_header_mode=_MODE.SEND,
        request_body_mode=_MODE.BUFFERED,
        request_trailer_mode=_MODE.SKIP,
        response_header_mode=_MODE.SKIP,
        response_body_mode=_MODE.NONE,
        response_trailer_mode=_MODE.SKIP,
    )
    closed = settings.failure_mode == "closed"
    processor = ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=BODY_ROUTER_CLUSTER),
            initial_metadata=[base_pb2.HeaderValue(key=LISTENER_METADATA, value=listener_name)],
        ),
        failure_mode_allow=not closed,
        processing_mode=mode,
        message_timeout=_duration(settings.timeout),
        stat_prefix="body_router",
    )
    if closed:  # Envoy's default is 500, but the fault is an unavailable dependency
        processor.status_on_error.code = http_status_pb2.ServiceUnavailable
    return hcm_pb2.HttpFilter(name=EXT_PROC_FILTER, typed_config=_pack(processor))


def _too_large_reply(max_body_bytes: int) -> hcm_pb2.LocalReplyConfig:
    """Envoy's own 413 (body over the buffer limit) as an OpenAI-style JSON error.

    Only 413: the router's JSON answers are local replies too and must pass unchanged.
    """
    status = accesslog_pb2.StatusCodeFilter(
        comparison=accesslog_pb2.ComparisonFilter(
            op=accesslog_pb2.ComparisonFilter.EQ,
            value=base_pb2.RuntimeUInt32(default_value=413, runtime_key="xds_server.too_large"),
        )
    )
    body = struct_pb2.Struct()
    body.update(
        {
            "error": {
                "message": f"request body larger than {max_body_bytes} bytes",
                "type": "invalid_request_error",
                "code": "request_too_large",
            }
        }
    )
    mapper = hcm_pb2.ResponseMapper(
        filter=accesslog_pb2.AccessLogFilter(status_code_filter=status),
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=body
        ),
    )
    return hcm_pb2.LocalReplyConfig(mappers=[mapper])


def _http2_options() -> http_protocol_options_pb2.HttpProtocolOptions:
    """Upstream connections speak HTTP/2 (cleartext h2c without a transport socket)."""
    return http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )


def body_router_cluster(
    target: tuple[str, int], tls_sds_dir: str | None = None
) -> cluster_pb2.Cluster:
    """The router as a static gRPC (HTTP/2) cluster: it is one well-known address; over mTLS
    with the Envoy host's SDS files in `tls_sds_dir` (the ones its bootstrap uses)."""
    address, port = target
    http2 = _http2_options()
    result = cluster_pb2.Cluster(
        name=BODY_ROUTER_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_duration(1.0),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=BODY_ROUTER_CLUSTER),
    )
    result.load_assignment.endpoints.add().lb_endpoints.add(
        endpoint=endpoint_components_pb2.Endpoint(address=_socket_address(address, port))
    )
    result.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(_pack(http2))
    if tls_sds_dir is not None:
        folder = Path(tls_sds_dir)
        socket = tls_transport_socket(folder, folder, address)
        context = {k: v for k, v in socket["typed_config"].items() if k != "@type"}
        result.transport_socket.name = socket["name"]
        result.transport_socket.typed_config.CopyFrom(
            _pack(json_format.ParseDict(context, tls_pb2.UpstreamTlsContext()))
        )
    return result


def _ask_for_orca(
    target: route_components_pb2.Route | route_components_pb2.WeightedCluster.ClusterWeight,
    pool: Pool,
) -> None:
    """A Route or a ClusterWeight of a pool weighted by ORCA (ours, or Envoy's CS-WRR) asks its
    servers for load reports and keeps them from the client."""
    if pool.weighting == "orca" or pool.lb_policy == CSWRR:
        target.request_headers_to_add.add(
            header=base_pb2.HeaderValue(key=ORCA_FORMAT_HEADER, value="TEXT"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        target.response_headers_to_remove.extend(ORCA_RESPONSE_HEADERS)


def _weighted(
    target: SplitTarget, pool: Pool
) -> route_components_pb2.WeightedCluster.ClusterWeight:
    weighted = route_components_pb2.WeightedCluster.ClusterWeight(
        name=target.pool, weight=wrappers_pb2.UInt32Value(value=target.weight)
    )
    _ask_for_orca(weighted, pool)
    return weighted


def _route(spec: Route, config: Config) -> route_components_pb2.Route:
    match = route_components_pb2.RouteMatch(prefix=spec.prefix or "/")
    if spec.model is not None:
        exact = string_pb2.StringMatcher(exact=spec.model)
        match.headers.add(name=MODEL_HEADER, string_match=exact)
    action = route_components_pb2.RouteAction(timeout=_duration(spec.timeout))
    route = route_components_pb2.Route(match=match)
    if spec.pool is not None:
        action.cluster = spec.pool
        _ask_for_orca(route, config.pool(spec.pool))
    else:
        action.weighted_clusters.clusters.extend(
            _weighted(target, config.pool(target.pool)) for target in spec.split
        )
    route.route.CopyFrom(action)
    return route


def route_configuration(spec: Listener, config: Config) -> route_pb2.RouteConfiguration:
    """Routes in file order: Envoy takes the first match, so order is the user's priority."""
    host = route_components_pb2.VirtualHost(
        name=spec.name, domains=["*"], routes=[_route(route, config) for route in spec.routes]
    )
    return route_pb2.RouteConfiguration(name=spec.name, virtual_hosts=[host])


def _cswrr_policy(params: Params) -> cluster_pb2.LoadBalancingPolicy:
    """Envoy weighs each endpoint by qps / utilization from its responses' ORCA headers.

    The pool's `orca:` parameters that mean the same thing in both weightings set it, so one
    vocabulary (and one set of defaults: blackout 10 s and a 1 s update as Envoy's) serves
    both: blackout, expiry (weight_expiration_period), push_interval (weight_update_period),
    error_penalty, and kv_cache_metrics, the named metrics whose max is the utilization when a
    report has no application_utilization (vLLM sends none).
    """
    config = cswrr_pb2.ClientSideWeightedRoundRobin(
        blackout_period=_duration(params.blackout),
        weight_expiration_period=_duration(params.expiry),
        weight_update_period=_duration(max(CSWRR_MIN_UPDATE, params.push_interval)),
        error_utilization_penalty=wrappers_pb2.FloatValue(value=params.error_penalty),
        metric_names_for_computing_utilization=params.kv_cache_metrics,
    )
    policy = cluster_pb2.LoadBalancingPolicy()
    policy.policies.add().typed_extension_config.CopyFrom(
        extension_pb2.TypedExtensionConfig(name=CSWRR_EXTENSION, typed_config=_pack(config))
    )
    return policy


def cluster(pool: Pool) -> cluster_pb2.Cluster:
    """An EDS cluster with locality weighting on, so zone weights set in EDS take effect.

    CS-WRR pools get Envoy's extension instead: it weighs endpoints (and ignores EDS weights)
    from the ORCA headers of their responses.
    """
    result = cluster_pb2.Cluster(
        name=pool.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_duration(pool.connect_timeout),
    )
    if pool.lb_policy == CSWRR:
        result.load_balancing_policy.CopyFrom(_cswrr_policy(pool.orca))
    else:
        result.lb_policy = _LB_POLICIES[pool.lb_policy]
        common = result.common_lb_config
        common.locality_weighted_lb_config.SetInParent()
    if pool.http2:  # an InferencePool's appProtocol kubernetes.io/h2c
        result.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(_pack(_http2_options()))
    if pool.weighting == "orca":
        result.lrs_report_endpoint_metrics.extend(ORCA_LRS_METRICS)
        if pool.lb_policy == "least_request":
            bias = result.least_request_lb_config.active_request_bias
            bias.default_value = pool.orca.active_request_bias
            bias.runtime_key = f"xds_server.{pool.name}.active_request_bias"
    return result


def cluster_load_assignment(
    pool: Pool, weights: PoolWeights | None = None
) -> endpoint_pb2.ClusterLoadAssignment:
    """One locality per zone (sorted), weighted by the sum of its endpoints' weights.

    With locality weighting on, that sum keeps each endpoint's share of traffic
    exactly what its weight says, whatever the zones. `weights` are the weight
    engine's: effective endpoint weights, and saturated endpoints moved to
    priority 1, where Envoy sends traffic only when priority 0 runs short.
    Drained endpoints (admin API) stay, marked DRAINING: Envoy 1.40 excludes them
    from load balancing without counting them toward its panic threshold.
    A pool that sheds (`shedding:`) carries the engine's drop fraction, capped at its
    `max_drop`, as the one drop_overloads entry Envoy accepts.
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
                        health_status=health_check_pb2.DRAINING
                        if e.draining
                        else health_check_pb2.UNKNOWN,
                    )
                    for e, w in members
                ],
            )
    drop = _drop_ppm(pool, weights)
    if drop:
        assignment.policy.drop_overloads.add(
            category=DROP_CATEGORY,
            drop_percentage=percent_pb2.FractionalPercent(
                numerator=drop, denominator=percent_pb2.FractionalPercent.MILLION
            ),
        )
        if assignment.endpoints:
            # Envoy 1.40 hands a new drop fraction to its workers only with a host change
            # (ENVOY-NOTES): the fraction in the first endpoint's metadata is one, and its
            # going away is one when shedding stops. Load balancing does not read it.
            marker = assignment.endpoints[0].lb_endpoints[0].metadata.filter_metadata
            marker[DROP_METADATA].update({"drop_ppm": drop})
    return assignment


def _drop_ppm(pool: Pool, weights: PoolWeights | None) -> int:
    """The share of requests Envoy should refuse, in parts per million: only for a pool whose
    config sheds now (weights restored or shared from before an edit may carry a fraction)."""
    if pool.shedding is None or weights is None:
        return 0
    return min(weights.drop_ppm, round(pool.shedding.max_drop * PPM))


def build_group_resources(
    config: Config,
    group: NodeGroup,
    weights: Mapping[str, PoolWeights] | None = None,
    body_router: tuple[str, int] = DEFAULT_BODY_ROUTER,
) -> Resources:
    """type_url -> name -> message for one node group, raw escape-hatch resources included.

    `weights`: the weight engine's current weights per pool (pools without use the file's).
    `body_router`: the router's address when the file names none (the control plane's own).
    """
    weights = weights or {}
    out: Resources = {type_url: {} for type_url in typeurls.ORDER}
    for name in group.listeners:
        spec = config.listener(name)
        out[typeurls.LISTENER][name] = listener(spec, config.body_router)
        out[typeurls.ROUTE][name] = route_configuration(spec, config)
        if spec.body_routing:
            target = config.body_router.target(body_router)
            out[typeurls.CLUSTER][BODY_ROUTER_CLUSTER] = body_router_cluster(
                target, config.body_router.tls_sds_dir
            )
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
    config: Config,
    weights: Mapping[str, PoolWeights] | None = None,
    body_router: tuple[str, int] = DEFAULT_BODY_ROUTER,
) -> dict[str, Resources]:
    """Resources for every node group, keyed by group name."""
    return {
        group.name: build_group_resources(config, group, weights, body_router)
        for group in config.node_groups
    }
