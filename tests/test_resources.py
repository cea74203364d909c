"""Model -> Envoy protos: names, fields, weights, localities, node groups, determinism."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from xds_server.config.reader import load_config, parse_config
from xds_server.config.types import Config
from xds_server.resources.build import build_all, build_group_resources
from xds_server.xds import typeurls

SNAPSHOTS = Path(__file__).resolve().parent.parent / "snapshots"


@pytest.fixture(scope="module")
def demo() -> Config:
    return load_config(SNAPSHOTS / "demo.yaml")


@pytest.fixture(scope="module")
def demo_resources(demo: Config) -> dict[str, dict[str, Message]]:
    return build_all(demo)["default"]


def names(resources: dict[str, dict[str, Message]]) -> dict[str, list[str]]:
    return {typeurls.SHORT_NAMES[t]: sorted(by_name) for t, by_name in resources.items()}


def test_demo_names(demo_resources) -> None:
    assert names(demo_resources) == {
        "clusters": ["_body_router", "llama-3-8b"],  # its model route turns body routing on
        "endpoints": ["llama-3-8b"],
        "listeners": ["inference"],
        "routes": ["inference"],
    }


def test_listener_uses_rds_over_ads(demo_resources) -> None:
    listener = demo_resources[typeurls.LISTENER]["inference"]
    assert listener.address.socket_address.address == "127.0.0.1"
    assert listener.address.socket_address.port_value == 10000
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    assert network_filter.name == "envoy.filters.network.http_connection_manager"
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    assert manager.stat_prefix == "inference"
    assert manager.codec_type == hcm_pb2.HttpConnectionManager.AUTO
    assert manager.rds.route_config_name == "inference"
    assert manager.rds.config_source.HasField("ads")
    assert manager.rds.config_source.resource_api_version == 2  # V3
    body_router, http_filter = manager.http_filters  # body routing: ext_proc, then the router
    assert body_router.name == "envoy.filters.http.ext_proc"
    assert http_filter.name == "envoy.filters.http.router"
    assert http_filter.typed_config.Is(router_pb2.Router.DESCRIPTOR)


def test_routes_in_order_with_timeouts(demo_resources) -> None:
    config = demo_resources[typeurls.ROUTE]["inference"]
    (host,) = config.virtual_hosts
    assert (host.name, list(host.domains)) == ("inference", ["*"])
    model, fallback = host.routes
    assert model.match.prefix == "/"
    (header,) = model.match.headers
    assert header.name == "x-gateway-model-name"
    assert header.string_match.exact == "llama-3-8b"
    assert model.route.cluster == "llama-3-8b"
    assert model.route.timeout.seconds == 300
    assert fallback.match.prefix == "/" and not fallback.match.headers
    assert fallback.route.timeout.seconds == 600


def test_cluster_is_eds_over_ads(demo_resources) -> None:
    cluster = demo_resources[typeurls.CLUSTER]["llama-3-8b"]
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    assert cluster.connect_timeout.seconds == 1
    assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert cluster.common_lb_config.HasField("locality_weighted_lb_config")
    assert not cluster.lrs_report_endpoint_metrics


def test_endpoints_grouped_by_zone(demo_resources) -> None:
    assignment = demo_resources[typeurls.ENDPOINT]["llama-3-8b"]
    assert assignment.cluster_name == "llama-3-8b"
    localities = [
        (
            locality.locality.zone,
            locality.load_balancing_weight.value,
            [
                (e.endpoint.address.socket_address.port_value, e.load_balancing_weight.value)
                for e in locality.lb_endpoints
            ],
        )
        for locality in assignment.endpoints
    ]
    assert localities == [("zone-a", 2, [(8001, 1), (8002, 1)]), ("zone-b", 1, [(8003, 1)])]


def test_weights_and_policy_of_multi_zone() -> None:
    resources = build_all(load_config(SNAPSHOTS / "multi-zone.yaml"))["default"]
    cluster = resources[typeurls.CLUSTER]["mistral-7b"]
    assert cluster.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assignment = resources[typeurls.ENDPOINT]["mistral-7b"]
    zones = [(x.locality.zone, x.load_balancing_weight.value) for x in assignment.endpoints]
    assert zones == [("zone-a", 4), ("zone-b", 3), ("zone-c", 2)]
    route = resources[typeurls.ROUTE]["inference"].virtual_hosts[0].routes[0]
    assert route.route.HasField("timeout") and route.route.timeout.ToNanoseconds() == 0


def test_orca_pool_asks_for_load_reports() -> None:
    resources = build_all(load_config(SNAPSHOTS / "two-models.yaml"))["default"]
    assert resources[typeurls.CLUSTER]["qwen-2.5-7b"].lrs_report_endpoint_metrics
    routes = resources[typeurls.ROUTE]["inference"].virtual_hosts[0].routes
    by_model = {r.match.headers[0].string_match.exact: r for r in routes if r.match.headers}
    qwen, llama = by_model["qwen-2.5-7b"], by_model["llama-3-8b"]
    assert [(h.header.key, h.header.value) for h in qwen.request_headers_to_add] == [
        ("endpoint-load-metrics-format", "TEXT")
    ]
    assert "endpoint-load-metrics" in qwen.response_headers_to_remove
    assert not llama.request_headers_to_add and not llama.response_headers_to_remove


def test_node_groups_get_their_own_resources() -> None:
    groups = build_all(load_config(SNAPSHOTS / "node-groups.yaml"))
    assert sorted(groups) == ["canary", "default"]
    assert names(groups["canary"]) == {
        "clusters": ["llama-canary", "llama-next"],
        "endpoints": ["llama-canary", "llama-next"],
        "listeners": ["inference-canary"],
        "routes": ["inference-canary"],
    }
    assert names(groups["default"]) == {
        "clusters": ["llama-stable"],
        "endpoints": ["llama-stable"],
        "listeners": ["inference"],
        "routes": ["inference"],
    }


def test_pool_without_endpoints_still_gets_an_assignment() -> None:
    config = parse_config("pools: [{name: empty}]\n", "t.yaml")
    resources = build_group_resources(config, config.node_groups[0])
    assignment = resources[typeurls.ENDPOINT]["empty"]
    assert assignment.cluster_name == "empty" and not assignment.endpoints


def test_endpoint_without_zone_has_an_empty_locality() -> None:
    config = parse_config(
        "pools: [{name: p, endpoints: [{address: '::1', port: 80, weight: 5}]}]\n", "t.yaml"
    )
    (locality,) = build_all(config)["default"][typeurls.ENDPOINT]["p"].endpoints
    assert locality.locality.zone == "" and locality.load_balancing_weight.value == 5
    assert locality.lb_endpoints[0].endpoint.address.socket_address.address == "::1"


RAW = textwrap.dedent(
    """
    listeners: [{name: inference, address: 127.0.0.1, port: 10000, routes: [{prefix: /, pool: p}]}]
    pools: [{name: p, endpoints: [{address: 127.0.0.1, port: 8001}]}]
    node_groups: [{name: canary, node_clusters: [c]}]
    envoy:
      clusters:
        - name: static-upstream
          type: STATIC
          connect_timeout: 2s
          typed_extension_protocol_options:
            envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
              "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
              explicit_http_config: {http2_protocol_options: {}}
      endpoints: [{cluster_name: static-upstream}]
      listeners: [{name: raw-listener}]
      routes: [{name: raw-routes}]
    """
)


def test_raw_resources_land_in_every_group() -> None:
    groups = build_all(parse_config(RAW, "raw.yaml"))
    for resources in groups.values():
        assert "static-upstream" in resources[typeurls.CLUSTER]
        assert "static-upstream" in resources[typeurls.ENDPOINT]
        assert "raw-listener" in resources[typeurls.LISTENER]
        assert "raw-routes" in resources[typeurls.ROUTE]
    raw = groups["default"][typeurls.CLUSTER]["static-upstream"]
    assert raw.type == cluster_pb2.Cluster.STATIC and raw.connect_timeout.seconds == 2
    assert names(groups["canary"])["clusters"] == ["static-upstream"]


def serialized(groups: dict[str, dict[str, dict[str, Message]]]) -> dict:
    return {
        group: {
            t: {n: m.SerializeToString(deterministic=True) for n, m in by_name.items()}
            for t, by_name in resources.items()
        }
        for group, resources in groups.items()
    }


@pytest.mark.parametrize("path", sorted(SNAPSHOTS.glob("*.yaml")), ids=lambda p: p.name)
def test_deterministic(path: Path) -> None:
    first = serialized(build_all(load_config(path)))
    assert first == serialized(build_all(load_config(path)))


def test_every_group_has_all_four_types(demo: Config) -> None:
    for resources in build_all(demo).values():
        assert set(resources) == set(typeurls.ORDER)


@pytest.mark.parametrize(
    ("type_url", "message_type"),
    [
        (typeurls.LISTENER, listener_pb2.Listener),
        (typeurls.CLUSTER, cluster_pb2.Cluster),
        (typeurls.ENDPOINT, endpoint_pb2.ClusterLoadAssignment),
    ],
)
def test_round_trip(demo_resources, type_url: str, message_type: type[Message]) -> None:
    for message in demo_resources[type_url].values():
        assert message_type.FromString(message.SerializeToString()) == message


def _pool_cluster(pool_yaml: str) -> cluster_pb2.Cluster:
    doc = "listeners: []\npools:\n" + textwrap.indent(textwrap.dedent(pool_yaml), "  ")
    config = parse_config(doc, "test.yaml")
    return build_all(config)["default"][typeurls.CLUSTER]["p"]


def test_load_weighted_pools_default_to_least_request_with_a_stronger_request_bias() -> None:
    endpoints = "endpoints: [{address: 10.0.0.1, port: 80}]"
    orca = _pool_cluster(f"- name: p\n  weighting: orca\n  {endpoints}\n")
    assert orca.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    bias = orca.least_request_lb_config.active_request_bias
    assert bias.default_value == 2.0 and bias.runtime_key == "xds_server.p.active_request_bias"
    tuned = _pool_cluster(
        f"- name: p\n  weighting: orca\n  orca: {{active_request_bias: 1.0}}\n  {endpoints}\n"
    )
    assert tuned.least_request_lb_config.active_request_bias.default_value == 1.0
    # Round robin has no bias, and static pools keep Envoy's own least request.
    rr = _pool_cluster(f"- name: p\n  weighting: orca\n  lb_policy: round_robin\n  {endpoints}\n")
    assert rr.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN and not rr.HasField(
        "least_request_lb_config"
    )
    static = _pool_cluster(f"- name: p\n  lb_policy: least_request\n  {endpoints}\n")
    assert not static.HasField("least_request_lb_config")
    assert _pool_cluster(f"- name: p\n  {endpoints}\n").lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
