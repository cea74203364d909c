"""Snapshot files: what valid files mean, and what users are told about broken ones."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from xds_server.config.reader import load_config, parse_config
from xds_server.config.types import (
    Config,
    Endpoint,
    Listener,
    NodeGroup,
    Pool,
    Problem,
    Route,
    SnapshotError,
)

SNAPSHOTS = Path(__file__).resolve().parent.parent / "snapshots"

MINIMAL = """
listeners:
  - name: inference
    port: 10000
    routes:
      - {model: llama, pool: llama}
      - {prefix: /, pool: llama}
pools:
  - name: llama
    endpoints:
      - {address: 127.0.0.1, port: 8001}
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "test.yaml")


def problems(text: str) -> list[Problem]:
    with pytest.raises(SnapshotError) as caught:
        parse(text)
    return caught.value.problems


def doc(**changes: object) -> str:
    """The minimal document with top-level sections replaced or added."""
    base = yaml.safe_load(MINIMAL)
    base.update(changes)
    return yaml.safe_dump(base)


def test_minimal_file_gets_defaults() -> None:
    config = parse(MINIMAL)
    assert config.source == "test.yaml"
    assert config.listeners == (
        Listener(
            "inference",
            10000,
            "0.0.0.0",
            (Route("llama", model="llama"), Route("llama", prefix="/")),
            body_routing=True,  # on by default for a listener with model routes
        ),
    )
    assert config.pools == (
        Pool("llama", "round_robin", "static", (Endpoint("127.0.0.1", 8001, "", 1),), 1.0),
    )
    assert config.node_groups == (NodeGroup("default", (), ("inference",), ("llama",)),)
    assert config.listeners[0].routes[0].timeout == 300.0
    assert config.raw.clusters == config.raw.listeners == ()


def test_demo_snapshot() -> None:
    config = load_config(SNAPSHOTS / "demo.yaml")
    assert config.source.endswith("demo.yaml")
    (listener,) = config.listeners
    assert (listener.name, listener.address, listener.port) == ("inference", "127.0.0.1", 10000)
    assert [(r.model, r.prefix) for r in listener.routes] == [("llama-3-8b", None), (None, "/")]
    pool = config.pool("llama-3-8b")
    assert [(e.key, e.zone) for e in pool.endpoints] == [
        ("127.0.0.1:8001", "zone-a"),
        ("127.0.0.1:8002", "zone-a"),
        ("127.0.0.1:8003", "zone-b"),
    ]


@pytest.mark.parametrize("path", sorted(SNAPSHOTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(path: Path) -> None:
    config = load_config(path)
    assert config.node_groups[-1].name == "default"


def test_example_set_is_complete() -> None:
    names = {p.name for p in SNAPSHOTS.glob("*.yaml")}
    assert {"demo.yaml", "multi-zone.yaml", "two-models.yaml", "node-groups.yaml"} <= names


def test_node_groups_example() -> None:
    config = load_config(SNAPSHOTS / "node-groups.yaml")
    canary, default = config.node_groups
    assert canary == NodeGroup(
        "canary", ("edge-canary",), ("inference-canary",), ("llama-canary", "llama-next")
    )
    assert default == NodeGroup("default", (), ("inference",), ("llama-stable",))
    assert config.group_for("edge-canary") is canary
    assert config.group_for("edge-1") is default
    assert config.group_for("") is default


def test_implicit_default_group_gets_everything() -> None:
    text = doc(
        pools=[
            {"name": "llama", "endpoints": [{"address": "127.0.0.1", "port": 8001}]},
            {"name": "spare"},
        ],
        node_groups=[{"name": "canary", "node_clusters": ["c"], "pools": ["spare"]}],
    )
    config = parse(text)
    assert [g.name for g in config.node_groups] == ["canary", "default"]
    assert config.node_groups[0] == NodeGroup("canary", ("c",), (), ("spare",))
    assert config.node_groups[1] == NodeGroup("default", (), ("inference",), ("llama", "spare"))


def test_explicit_default_group_is_moved_last() -> None:
    groups = [
        {"name": "default", "listeners": ["inference"]},
        {"name": "other", "node_clusters": ["x"]},
    ]
    config = parse(doc(node_groups=groups))
    assert [g.name for g in config.node_groups] == ["other", "default"]


def test_values_are_typed_and_normalized() -> None:
    config = parse(
        """
        listeners:
          - {name: v6, port: 443, address: "::", routes: [{prefix: /v1, pool: p, timeout: 0}]}
        pools:
          - name: p
            lb_policy: least_request
            weighting: orca
            connect_timeout: 0.25
            endpoints:
              - {address: "2001:DB8::0:1", port: 80, zone: z, weight: 7}
        """
    )
    (endpoint,) = config.pool("p").endpoints
    assert endpoint == Endpoint("2001:db8::1", 80, "z", 7)
    assert endpoint.key == "[2001:db8::1]:80"
    assert config.pool("p").connect_timeout == 0.25
    assert config.listeners[0].routes[0].timeout == 0.0


def test_empty_sections_are_allowed() -> None:
    config = parse("listeners: []\npools:\n")
    assert config.listeners == config.pools == ()
    assert config.node_groups == (NodeGroup("default", (), (), ()),)


def test_yaml_aliases_work() -> None:
    config = parse(
        MINIMAL.replace("{address: 127.0.0.1, port: 8001}", "&ep {address: 127.0.0.1, port: 8001}")
        + "  - {name: copy, endpoints: [*ep]}\n"
    )
    assert config.pool("copy").endpoints == config.pool("llama").endpoints


def test_pool_lookup_raises_key_error() -> None:
    with pytest.raises(KeyError):
        parse(MINIMAL).pool("nope")


def test_raw_resources_parse_with_any_types() -> None:
    http2 = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    raw = {
        "clusters": [
            {
                "name": "raw-cluster",
                "type": "STATIC",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": http2,
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
            }
        ],
        "endpoints": [{"cluster_name": "raw-cluster"}],
        "routes": [{"name": "raw-routes"}],
        "listeners": [{"name": "raw-listener"}],
    }
    config = parse(doc(envoy=raw))
    assert [c.name for c in config.raw.clusters] == ["raw-cluster"]
    assert [c.cluster_name for c in config.raw.endpoints] == ["raw-cluster"]
    assert [r.name for r in config.raw.routes] == ["raw-routes"]
    assert [x.name for x in config.raw.listeners] == ["raw-listener"]


def test_problem_formats_as_one_line() -> None:
    problem = Problem("f.yaml", "pools[0].name", "bad")
    assert str(problem) == "f.yaml: pools[0].name: bad"
    assert str(SnapshotError([problem, problem])) == f"{problem}\n{problem}"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError) as caught:
        load_config(tmp_path / "missing.yaml")
    (problem,) = caught.value.problems
    assert problem.file.endswith("missing.yaml") and "No such file" in problem.message
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SnapshotError, match="not UTF-8"):
        load_config(binary)


def ep(**fields: object) -> dict:
    return {"address": "127.0.0.1", "port": 8001, **fields}


def pools_with(*endpoints: dict, **fields: object) -> list[dict]:
    return [{"name": "llama", "endpoints": list(endpoints), **fields}]


def listener_with(*routes: dict, **fields: object) -> list[dict]:
    return [{"name": "inference", "port": 10000, "routes": list(routes), **fields}]


BAD_INPUTS = {
    "yaml syntax": ("listeners: [\n  {name: x\n", "line 3 column 1", "invalid YAML"),
    "top level not a mapping": ("- a\n- b\n", "(document)", "expected a mapping"),
    "empty file": ("", "(document)", "got null"),
    "unknown top key": (doc(listners=[]), "listners", "unknown key 'listners'"),
    "bad date value": ("when: 2001-13-01\n", "(document)", "month must be in 1..12"),
    "python tag": ("x: !!python/name:os.system\n", "line 1 column 4", "constructor"),
    "unknown endpoint key": (
        doc(pools=pools_with(ep(endpiont=1))),
        "pools[0].endpoints[0].endpiont",
        "unknown key 'endpiont'; expected one of: address, port, zone, weight",
    ),
    "port as string": (
        doc(pools=pools_with(ep(port="80"))),
        "pools[0].endpoints[0].port",
        "without quotes",
    ),
    "port as bool": (
        doc(pools=pools_with(ep(port=True))),
        "pools[0].endpoints[0].port",
        "expected an integer, got a boolean",
    ),
    "port zero": (doc(pools=pools_with(ep(port=0))), "pools[0].endpoints[0].port", "1..65535"),
    "port too big": (doc(listeners=listener_with(port=70000)), "listeners[0].port", "1..65535"),
    "missing port": (
        doc(pools=pools_with({"address": "127.0.0.1"})),
        "pools[0].endpoints[0].port",
        "required",
    ),
    "hostname endpoint": (
        doc(pools=pools_with(ep(address="model-1.local"))),
        "pools[0].endpoints[0].address",
        "not resolved by DNS",
    ),
    "listener hostname": (
        doc(listeners=listener_with(address="localhost")),
        "listeners[0].address",
        "not an IPv4 or IPv6 address",
    ),
    "weight zero": (
        doc(pools=pools_with(ep(weight=0))),
        "pools[0].endpoints[0].weight",
        "Envoy rejects weight 0",
    ),
    "weight too big": (
        doc(pools=pools_with(ep(weight=1_000_001))),
        "pools[0].endpoints[0].weight",
        "1..1000000",
    ),
    "weight float": (
        doc(pools=pools_with(ep(weight=1.5))),
        "pools[0].endpoints[0].weight",
        "expected an integer",
    ),
    "duplicate endpoint": (
        doc(pools=pools_with(ep(), ep(zone="b"))),
        "pools[0].endpoints[1]",
        "duplicate endpoint '127.0.0.1:8001'",
    ),
    "duplicate pool": (
        doc(pools=pools_with() + pools_with()),
        "pools[1].name",
        "duplicate pool name 'llama'",
    ),
    "duplicate listener": (
        doc(listeners=listener_with() + listener_with(port=1)),
        "listeners[1].name",
        "duplicate listener name",
    ),
    "bad name": (doc(pools=[{"name": "-x"}]), "pools[0].name", "invalid name '-x'"),
    "empty name": (doc(pools=[{"name": ""}]), "pools[0].name", "invalid name ''"),
    "missing name": (doc(pools=[{}]), "pools[0].name", "required"),
    "bad lb policy": (
        doc(pools=pools_with(lb_policy="random")),
        "pools[0].lb_policy",
        "expected one of: round_robin, least_request",
    ),
    "bad weighting": (
        doc(pools=pools_with(weighting="dynamic")),
        "pools[0].weighting",
        "expected one of: static, orca",
    ),
    "zero connect timeout": (
        doc(pools=pools_with(connect_timeout=0)),
        "pools[0].connect_timeout",
        "positive",
    ),
    "route both": (
        doc(listeners=listener_with({"model": "m", "prefix": "/", "pool": "llama"})),
        "listeners[0].routes[0]",
        "exactly one of 'model'",
    ),
    "route neither": (
        doc(listeners=listener_with({"pool": "llama"})),
        "listeners[0].routes[0]",
        "exactly one of 'model'",
    ),
    "prefix without slash": (
        doc(listeners=listener_with({"prefix": "v1", "pool": "llama"})),
        "listeners[0].routes[0].prefix",
        "starts with '/'",
    ),
    "unknown pool": (
        doc(listeners=listener_with({"prefix": "/", "pool": "lama"})),
        "listeners[0].routes[0].pool",
        "unknown pool 'lama'; defined pools: llama",
    ),
    "negative timeout": (
        doc(listeners=listener_with({"prefix": "/", "pool": "llama", "timeout": -1})),
        "listeners[0].routes[0].timeout",
        "0 disables",
    ),
    "infinite timeout": (
        doc(listeners=listener_with({"prefix": "/", "pool": "llama", "timeout": float("inf")})),
        "listeners[0].routes[0].timeout",
        "expected seconds",
    ),
    "routes not a list": (
        doc(listeners=[{"name": "x", "port": 1, "routes": {"a": 1}}]),
        "listeners[0].routes",
        "expected a list",
    ),
    "same bind in default group": (
        doc(listeners=[*listener_with(), {"name": "other", "port": 10000}]),
        "listeners[1]",
        "define node groups, with a 'default' group",
    ),
    "group without node clusters": (
        doc(node_groups=[{"name": "canary", "listeners": ["inference"]}]),
        "node_groups[0].node_clusters",
        "node.cluster",
    ),
    "default group with node clusters": (
        doc(node_groups=[{"name": "default", "node_clusters": ["x"]}]),
        "node_groups[0].node_clusters",
        "remove node_clusters",
    ),
    "node cluster in two groups": (
        doc(
            node_groups=[
                {"name": "a", "node_clusters": ["edge"]},
                {"name": "b", "node_clusters": ["x", "edge"]},
            ]
        ),
        "node_groups[1].node_clusters[1]",
        "duplicate node cluster 'edge'",
    ),
    "empty node cluster": (
        doc(node_groups=[{"name": "a", "node_clusters": [""]}]),
        "node_groups[0].node_clusters[0]",
        "non-empty",
    ),
    "group unknown listener": (
        doc(node_groups=[{"name": "a", "node_clusters": ["x"], "listeners": ["nope"]}]),
        "node_groups[0].listeners[0]",
        "unknown listener 'nope'",
    ),
    "group unknown pool": (
        doc(node_groups=[{"name": "a", "node_clusters": ["x"], "pools": ["nope"]}]),
        "node_groups[0].pools[0]",
        "unknown pool 'nope'",
    ),
    "duplicate group": (
        doc(
            node_groups=[
                {"name": "a", "node_clusters": ["x"]},
                {"name": "a", "node_clusters": ["y"]},
            ]
        ),
        "node_groups[1].name",
        "duplicate node group name 'a'",
    ),
    "same bind in one group": (
        doc(
            listeners=[*listener_with(), {"name": "other", "port": 10000}],
            node_groups=[{"name": "default", "listeners": ["inference", "other"]}],
        ),
        "node_groups[0].listeners",
        "both bind 0.0.0.0:10000",
    ),
    "raw not parsable": (
        doc(envoy={"clusters": [{"name": "x", "typo_field": 1}]}),
        "envoy.clusters[0]",
        'no field named "typo_field"',
    ),
    "raw unknown any type": (
        doc(
            envoy={
                "clusters": [
                    {
                        "name": "x",
                        "typed_extension_protocol_options": {
                            "a": {"@type": "type.googleapis.com/no.such.Type"}
                        },
                    }
                ]
            }
        ),
        "envoy.clusters[0]",
        "no.such.Type",
    ),
    "raw without name": (doc(envoy={"routes": [{}]}), "envoy.routes[0]", "needs a 'name'"),
    "raw cla without name": (
        doc(envoy={"endpoints": [{"endpoints": []}]}),
        "envoy.endpoints[0]",
        "needs a 'cluster_name'",
    ),
    "raw collides with pool": (
        doc(envoy={"clusters": [{"name": "llama"}]}),
        "envoy.clusters[0]",
        "already used by the cluster generated for pool 'llama'",
    ),
    "raw collides with route config": (
        doc(envoy={"routes": [{"name": "inference"}]}),
        "envoy.routes[0]",
        "generated for listener 'inference'",
    ),
    "raw unknown kind": (doc(envoy={"secrets": []}), "envoy.secrets", "unknown key 'secrets'"),
    "raw not a mapping": (doc(envoy={"clusters": ["x"]}), "envoy.clusters[0]", "proto3 JSON"),
}


@pytest.mark.parametrize(("text", "path", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_explained(text: str, path: str, message: str) -> None:
    found = problems(text)
    assert all(p.file == "test.yaml" for p in found)
    assert any(p.path == path and message in p.message for p in found), "\n".join(map(str, found))


def test_locality_weight_sum_must_fit_uint32() -> None:
    many = [ep(port=1 + i, weight=1_000_000, zone="z") for i in range(4295)]
    found = problems(doc(pools=pools_with(*many)))
    assert [(p.path, "zone 'z' sum to 4295000000" in p.message) for p in found] == [
        ("pools[0].endpoints", True)
    ]


def test_all_problems_are_reported_at_once() -> None:
    text = doc(
        listeners=listener_with({"prefix": "/", "pool": "nope"}, port="80"),
        pools=pools_with(ep(weight=0), ep(address="host", port=8002)),
        extra=1,
    )
    paths = {p.path for p in problems(text)}
    assert paths == {
        "extra",
        "listeners[0].port",
        "listeners[0].routes[0].pool",
        "pools[0].endpoints[0].weight",
        "pools[0].endpoints[1].address",
    }


def test_deep_nesting_is_a_problem_not_a_crash() -> None:
    found = problems("a: " + "[" * 100_000)
    assert found and found[0].message.startswith("invalid YAML")


def test_self_referencing_raw_resource() -> None:
    found = problems(
        MINIMAL + "envoy:\n  clusters:\n    - &c {name: x, metadata: {filter_metadata: {a: *c}}}\n"
    )
    assert [p.path for p in found] == ["envoy.clusters[0]"]
