"""Model routing in the snapshot file and in the Envoy config generated from it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from xds_server.config.reader import load_config, parse_config
from xds_server.config.types import BodyRouterSettings, Config, Problem, SnapshotError, SplitTarget
from xds_server.resources.build import (
    BODY_ROUTER_CLUSTER,
    DEFAULT_BODY_ROUTER,
    LISTENER_METADATA,
    build_all,
)
from xds_server.xds import typeurls

SNAPSHOTS = Path(__file__).resolve().parent.parent / "snapshots"
MODE = processing_mode_pb2.ProcessingMode

DOC = """
listeners:
  - name: models
    port: 10000
    routes:
      - {model: llama-3-8b, pool: llama-a}
      - {model: llama3, pool: llama-a}
      - {model: qwen, split: [{pool: qwen-a, weight: 90}, {pool: qwen-b, weight: 10}]}
  - name: plain
    port: 10001
    routes: [{prefix: /, pool: llama-a}]
pools:
  - {name: llama-a}
  - {name: qwen-a}
  - {name: qwen-b, weighting: orca}
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "test.yaml")


def with_changes(**top: object) -> str:
    doc = yaml.safe_load(textwrap.dedent(DOC))
    doc.update(top)
    return yaml.safe_dump(doc)


def with_routes(*routes: dict, **listener: object) -> str:
    doc = yaml.safe_load(textwrap.dedent(DOC))
    doc["listeners"][0].update(routes=list(routes), **listener)
    return yaml.safe_dump(doc)


def problems(text: str) -> list[Problem]:
    with pytest.raises(SnapshotError) as caught:
        parse(text)
    return caught.value.problems


# --------------------------------------------------------------------------- the file


def test_routes_splits_and_defaults() -> None:
    config = parse(DOC)
    models, plain = config.listeners
    assert models.body_routing and not plain.body_routing  # on where there are model routes
    assert models.models == ("llama-3-8b", "llama3", "qwen") and not models.has_fallback
    qwen = models.routes[2]
    assert qwen.pool is None
    assert qwen.split == (SplitTarget("qwen-a", 90), SplitTarget("qwen-b", 10))
    assert qwen.pools == ("qwen-a", "qwen-b")
    assert config.body_router == BodyRouterSettings()
    assert config.node_groups[0].pools == ("llama-a", "qwen-a", "qwen-b")


def test_split_pools_join_the_node_group() -> None:
    text = with_changes(
        node_groups=[{"name": "edge", "node_clusters": ["e"], "listeners": ["models"]}]
    )
    edge = parse(text).group_for("e")
    assert edge.pools == ("llama-a", "qwen-a", "qwen-b")


def test_body_routing_can_be_turned_off() -> None:
    (listener, _) = parse(
        with_routes({"model": "m", "pool": "llama-a"}, body_routing=False)
    ).listeners
    assert not listener.body_routing


def test_body_router_section() -> None:
    section = {
        "address": "10.0.0.5",
        "port": 19001,
        "timeout": 0.25,
        "failure_mode": "open",
        "max_body_bytes": 65536,
    }
    settings = parse(with_changes(body_router=section)).body_router
    assert settings == BodyRouterSettings("10.0.0.5", 19001, 0.25, "open", 65536)
    assert settings.target(("127.0.0.1", 5)) == ("10.0.0.5", 19001)


@pytest.mark.parametrize(
    ("address", "port", "target"),
    [
        (None, None, ("127.0.0.1", 5)),  # the file names none: the control plane's router
        (None, 19001, ("127.0.0.1", 19001)),
        ("10.0.0.5", None, ("10.0.0.5", 18001)),
    ],
)
def test_router_target(address: str | None, port: int | None, target: tuple[str, int]) -> None:
    assert BodyRouterSettings(address, port).target(("127.0.0.1", 5)) == target


def test_examples_use_body_routing() -> None:
    config = load_config(SNAPSHOTS / "two-models.yaml")
    (listener,) = config.listeners
    assert listener.body_routing and listener.has_fallback
    assert any(route.split for route in listener.routes)
    assert len(set(route.pools for route in listener.routes if route.model)) < len(
        listener.models
    ), "the example should show an alias: two model names, one pool"


BAD = {
    "split and pool": (
        with_routes({"model": "m", "pool": "llama-a", "split": [{"pool": "qwen-a", "weight": 1}]}),
        "listeners[0].routes[0]",
        "exactly one of 'pool' or 'split'",
    ),
    "neither split nor pool": (
        with_routes({"model": "m"}),
        "listeners[0].routes[0]",
        "exactly one of 'pool' or 'split'",
    ),
    "empty split": (
        with_routes({"model": "m", "split": []}),
        "listeners[0].routes[0].split",
        "non-empty list",
    ),
    "split not a list": (
        with_routes({"model": "m", "split": {"pool": "qwen-a"}}),
        "listeners[0].routes[0].split",
        "non-empty list",
    ),
    "split unknown pool": (
        with_routes({"model": "m", "split": [{"pool": "qwen-c", "weight": 1}]}),
        "listeners[0].routes[0].split[0].pool",
        "unknown pool 'qwen-c'; defined pools: llama-a, qwen-a, qwen-b",
    ),
    "split weight zero": (
        with_routes({"model": "m", "split": [{"pool": "qwen-a", "weight": 0}]}),
        "listeners[0].routes[0].split[0].weight",
        "out of range 1..1000000 (a share of traffic; remove the entry for 0)",
    ),
    "split weight negative": (
        with_routes({"model": "m", "split": [{"pool": "qwen-a", "weight": -5}]}),
        "listeners[0].routes[0].split[0].weight",
        "out of range",
    ),
    "split weight missing": (
        with_routes({"model": "m", "split": [{"pool": "qwen-a"}]}),
        "listeners[0].routes[0].split[0].weight",
        "required",
    ),
    "split weight float": (
        with_routes({"model": "m", "split": [{"pool": "qwen-a", "weight": 0.5}]}),
        "listeners[0].routes[0].split[0].weight",
        "expected an integer",
    ),
    "split entry unknown key": (
        with_routes({"model": "m", "split": [{"pool": "qwen-a", "weight": 1, "wieght": 2}]}),
        "listeners[0].routes[0].split[0].wieght",
        "unknown key 'wieght'; expected one of: pool, weight",
    ),
    "split entry not a mapping": (
        with_routes({"model": "m", "split": ["qwen-a"]}),
        "listeners[0].routes[0].split[0]",
        "expected a mapping with keys pool, weight",
    ),
    "split pool twice": (
        with_routes(
            {
                "model": "m",
                "split": [{"pool": "qwen-a", "weight": 1}, {"pool": "qwen-a", "weight": 2}],
            }
        ),
        "listeners[0].routes[0].split[1]",
        "duplicate pool in the split 'qwen-a'",
    ),
    "model twice": (
        with_routes({"model": "m", "pool": "llama-a"}, {"model": "m", "pool": "qwen-a"}),
        "listeners[0].routes[1]",
        "duplicate model 'm' (first at listeners[0].routes[0])",
    ),
    "body routing without models": (
        with_routes({"prefix": "/", "pool": "llama-a"}, body_routing=True),
        "listeners[0].body_routing",
        "has none",
    ),
    "body routing not a boolean": (
        with_routes({"model": "m", "pool": "llama-a"}, body_routing="yes"),
        "listeners[0].body_routing",
        "expected true or false",
    ),
    "router unknown key": (
        with_changes(body_router={"adress": "10.0.0.1"}),
        "body_router.adress",
        "unknown key 'adress'",
    ),
    "router hostname": (
        with_changes(body_router={"address": "router.local"}),
        "body_router.address",
        "not an IPv4 or IPv6 address",
    ),
    "router port": (with_changes(body_router={"port": 0}), "body_router.port", "1..65535"),
    "router failure mode": (
        with_changes(body_router={"failure_mode": "allow"}),
        "body_router.failure_mode",
        "expected one of: closed, open",
    ),
    "router timeout zero": (
        with_changes(body_router={"timeout": 0}),
        "body_router.timeout",
        "expected seconds from 0.001",
    ),
    "router timeout over an hour": (
        with_changes(body_router={"timeout": 7200}),
        "body_router.timeout",
        "at most 3600 seconds",
    ),
    "router body limit": (
        with_changes(body_router={"max_body_bytes": 100 * 1024 * 1024}),
        "body_router.max_body_bytes",
        "out of range 1024..8388608",
    ),
    "router not a mapping": (
        with_changes(body_router=[1]),
        "body_router",
        "expected a mapping",
    ),
}


@pytest.mark.parametrize(("text", "path", "message"), BAD.values(), ids=BAD.keys())
def test_bad_routing_is_explained(text: str, path: str, message: str) -> None:
    found = problems(text)
    assert any(p.path == path and message in p.message for p in found), "\n".join(map(str, found))


def test_a_bad_split_does_not_hide_other_problems() -> None:
    text = with_routes(
        {"model": "m", "split": [{"pool": "nope", "weight": 0}]},
        {"model": "n", "pool": "gone"},
    )
    paths = {p.path for p in problems(text)}
    assert {
        "listeners[0].routes[0].split[0].pool",
        "listeners[0].routes[0].split[0].weight",
        "listeners[0].routes[1].pool",
    } <= paths


# --------------------------------------------------------------------------- Envoy config


@pytest.fixture(scope="module")
def resources():
    return build_all(parse(DOC), body_router=("127.0.0.1", 24001))["default"]


def manager_of(resources, name: str) -> hcm_pb2.HttpConnectionManager:
    listener = resources[typeurls.LISTENER][name]
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    return manager


def test_ext_proc_filter_runs_before_the_router(resources) -> None:
    manager = manager_of(resources, "models")
    assert [f.name for f in manager.http_filters] == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    processor = ext_proc_pb2.ExternalProcessor()
    assert manager.http_filters[0].typed_config.Unpack(processor)
    assert processor.grpc_service.envoy_grpc.cluster_name == BODY_ROUTER_CLUSTER
    (metadata,) = processor.grpc_service.initial_metadata
    assert (metadata.key, metadata.value) == (LISTENER_METADATA, "models")
    mode = processor.processing_mode
    assert (mode.request_header_mode, mode.request_body_mode) == (MODE.SEND, MODE.BUFFERED)
    assert (mode.response_header_mode, mode.response_body_mode) == (MODE.SKIP, MODE.NONE)
    assert (mode.request_trailer_mode, mode.response_trailer_mode) == (MODE.SKIP, MODE.SKIP)
    assert not processor.failure_mode_allow and processor.status_on_error.code == 503
    assert processor.message_timeout.ToNanoseconds() == 1_000_000_000


def test_body_limit_and_json_413(resources) -> None:
    listener = resources[typeurls.LISTENER]["models"]
    assert listener.per_connection_buffer_limit_bytes.value == 4 * 1024 * 1024
    (mapper,) = manager_of(resources, "models").local_reply_config.mappers
    assert mapper.filter.status_code_filter.comparison.value.default_value == 413
    error = mapper.body_format_override.json_format["error"]
    assert error["code"] == "request_too_large" and "4194304 bytes" in error["message"]


def test_listener_without_body_routing_is_unchanged(resources) -> None:
    manager = manager_of(resources, "plain")
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
    assert not manager.HasField("local_reply_config")
    assert not resources[typeurls.LISTENER]["plain"].HasField("per_connection_buffer_limit_bytes")


def test_router_cluster_is_static_http2(resources) -> None:
    cluster = resources[typeurls.CLUSTER][BODY_ROUTER_CLUSTER]
    assert cluster.type == cluster_pb2.Cluster.STATIC
    (locality,) = cluster.load_assignment.endpoints
    address = locality.lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 24001)
    options = http_protocol_options_pb2.HttpProtocolOptions()
    (packed,) = cluster.typed_extension_protocol_options.values()
    assert packed.Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    assert BODY_ROUTER_CLUSTER not in resources[typeurls.ENDPOINT]  # static: no EDS


def test_router_cluster_follows_the_file_or_the_default() -> None:
    named = parse(with_changes(body_router={"address": "10.1.2.3", "port": 7000}))
    for config, expected in ((named, ("10.1.2.3", 7000)), (parse(DOC), DEFAULT_BODY_ROUTER)):
        cluster = build_all(config)["default"][typeurls.CLUSTER][BODY_ROUTER_CLUSTER]
        address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
        assert (address.socket_address.address, address.socket_address.port_value) == expected


def test_failure_mode_open() -> None:
    config = parse(with_changes(body_router={"failure_mode": "open", "timeout": 0.05}))
    manager = manager_of(build_all(config)["default"], "models")
    processor = ext_proc_pb2.ExternalProcessor()
    manager.http_filters[0].typed_config.Unpack(processor)
    assert processor.failure_mode_allow and not processor.HasField("status_on_error")
    assert processor.message_timeout.ToNanoseconds() == 50_000_000


def test_groups_without_body_routing_get_no_router_cluster() -> None:
    groups = [
        {"name": "edge", "node_clusters": ["e"], "listeners": ["plain"]},
        {"name": "default", "listeners": ["models"]},
    ]
    built = build_all(parse(with_changes(node_groups=groups)))
    assert BODY_ROUTER_CLUSTER not in built["edge"][typeurls.CLUSTER]
    assert BODY_ROUTER_CLUSTER in built["default"][typeurls.CLUSTER]


def test_model_routes_alias_and_weighted_split(resources) -> None:
    llama, alias, qwen = resources[typeurls.ROUTE]["models"].virtual_hosts[0].routes
    for route, model in ((llama, "llama-3-8b"), (alias, "llama3")):
        (header,) = route.match.headers
        assert (header.name, header.string_match.exact) == ("x-gateway-model-name", model)
        assert route.route.cluster == "llama-a"
    clusters = qwen.route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in clusters] == [("qwen-a", 90), ("qwen-b", 10)]
    assert qwen.route.timeout.seconds == 300


def test_split_asks_only_orca_pools_for_load_reports(resources) -> None:
    qwen_a, qwen_b = (
        resources[typeurls.ROUTE]["models"]
        .virtual_hosts[0]
        .routes[2]
        .route.weighted_clusters.clusters
    )
    assert not qwen_a.request_headers_to_add and not qwen_a.response_headers_to_remove
    assert [(h.header.key, h.header.value) for h in qwen_b.request_headers_to_add] == [
        ("endpoint-load-metrics-format", "TEXT")
    ]
    assert "endpoint-load-metrics" in qwen_b.response_headers_to_remove
