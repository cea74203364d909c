"""Weights and reloads share one path into the cache, and neither undoes the other."""

from __future__ import annotations

from lrs.weights.signals import PoolWeights
from xds_server.config.reader import parse_config
from xds_server.resources.build import cluster_load_assignment
from xds_server.resources.publisher import Publisher
from xds_server.xds import typeurls
from xds_server.xds.cache import ResourceCache

DOC = """
listeners:
  - {name: l, port: 10000, routes: [{model: a, pool: a}, {prefix: /, pool: b}]}
pools:
  - name: a
    weighting: orca
    endpoints:
      - {address: 127.0.0.1, port: 8001, zone: z1}
      - {address: 127.0.0.1, port: 8002, zone: z1}
      - {address: 127.0.0.1, port: 8003, zone: z2}
  - name: b
    endpoints: [{address: 127.0.0.1, port: 9001}]
"""


def _versions(cache: ResourceCache) -> dict[str, str]:
    snapshot = cache.groups["default"].of_type(typeurls.ENDPOINT)
    return {name: resource.version for name, resource in snapshot.resources.items()}


def test_saturated_endpoints_move_to_priority_one_with_their_own_locality_weights():
    pool = parse_config(DOC, "t.yaml").pool("a")
    weights = PoolWeights(
        endpoints={"127.0.0.1:8001": 700, "127.0.0.1:8002": 5, "127.0.0.1:8003": 300},
        localities={"z1": 700, "z2": 300},
        saturated=frozenset({"127.0.0.1:8002"}),
    )
    assignment = cluster_load_assignment(pool, weights)
    by_priority = {
        (group.priority, group.locality.zone): (
            group.load_balancing_weight.value,
            [
                (e.endpoint.address.socket_address.port_value, e.load_balancing_weight.value)
                for e in group.lb_endpoints
            ],
        )
        for group in assignment.endpoints
    }
    assert by_priority == {
        (0, "z1"): (700, [(8001, 700)]),
        (0, "z2"): (300, [(8003, 300)]),
        (1, "z1"): (5, [(8002, 5)]),
    }


def test_without_weights_the_file_weights_apply_at_priority_zero():
    pool = parse_config(DOC, "t.yaml").pool("a")
    assignment = cluster_load_assignment(pool)
    assert {g.priority for g in assignment.endpoints} == {0}
    assert [g.load_balancing_weight.value for g in assignment.endpoints] == [2, 1]


async def test_weights_change_only_their_pool_and_survive_a_reload():
    cache = ResourceCache()
    publisher = Publisher(cache)
    seen = []
    publisher.on_config.append(seen.append)
    config = parse_config(DOC, "t.yaml")
    await publisher.publish_config(config)
    assert seen == [config]
    before = _versions(cache)
    weights = PoolWeights(
        endpoints={"127.0.0.1:8001": 10, "127.0.0.1:8002": 1, "127.0.0.1:8003": 1},
        localities={"z1": 11, "z2": 1},
    )
    publisher.publish_weights("a", weights)
    after = _versions(cache)
    assert after["a"] != before["a"] and after["b"] == before["b"]

    await publisher.publish_config(parse_config(DOC, "t.yaml"))  # a reload keeps the weights
    assert _versions(cache) == after

    static = DOC.replace("weighting: orca", "weighting: static")
    await publisher.publish_config(parse_config(static, "t.yaml"))  # no longer load-weighted
    assert _versions(cache)["a"] == before["a"] and publisher.weights == {}


async def test_weights_for_a_pool_that_left_the_config_are_dropped():
    cache = ResourceCache()
    publisher = Publisher(cache)
    await publisher.publish_config(parse_config(DOC, "t.yaml"))
    without_a = DOC.replace("{model: a, pool: a}, ", "").split("  - name: a")[0] + (
        "  - name: b\n    endpoints: [{address: 127.0.0.1, port: 9001}]\n"
    )
    await publisher.publish_config(parse_config(without_a, "t.yaml"))
    generation = cache.generation
    publisher.publish_weights("a", PoolWeights(endpoints={}, localities={}))
    assert cache.generation == generation and "a" not in publisher.weights
