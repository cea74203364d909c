"""`lb_policy: client_side_weighted_round_robin`: the snapshot model and the Envoy resources.

Envoy's CS-WRR weighs endpoints itself from ORCA response headers, so the cluster carries the
typed extension (set from the pool's `orca:` parameters), the route asks the servers for ORCA,
and combining it with our own ORCA weights (which it would ignore) is refused.
"""

from __future__ import annotations

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as cswrr_pb2,
)

from lrs.contract import ORCA_FORMAT_HEADER
from xds_server.config.reader import parse_config
from xds_server.config.types import CSWRR, SnapshotError
from xds_server.resources.build import CSWRR_EXTENSION, build_all
from xds_server.xds import typeurls


def snapshot(lb_policy: str, weighting: str = "static", orca: dict | None = None) -> str:
    pool = {
        "name": "llama",
        "lb_policy": lb_policy,
        "weighting": weighting,
        "endpoints": [{"address": "127.0.0.1", "port": 8001}],
    }
    if orca is not None:
        pool["orca"] = orca
    listener = {"name": "inference", "port": 10000, "routes": [{"prefix": "/", "pool": "llama"}]}
    return yaml.safe_dump({"listeners": [listener], "pools": [pool]})


def resources(text: str):
    return build_all(parse_config(text, "s.yaml"))["default"]


def cswrr_config(cluster: cluster_pb2.Cluster) -> cswrr_pb2.ClientSideWeightedRoundRobin:
    (policy,) = cluster.load_balancing_policy.policies
    assert policy.typed_extension_config.name == CSWRR_EXTENSION
    config = cswrr_pb2.ClientSideWeightedRoundRobin()
    assert policy.typed_extension_config.typed_config.Unpack(config)
    return config


def test_cswrr_cluster_has_envoy_defaults_and_vllm_utilization() -> None:
    cluster = resources(snapshot(CSWRR))[typeurls.CLUSTER]["llama"]
    config = cswrr_config(cluster)
    assert config.blackout_period.seconds == 10
    assert config.weight_update_period.seconds == 1
    assert config.weight_expiration_period.seconds == 30
    assert config.error_utilization_penalty.value == 1.0
    assert list(config.metric_names_for_computing_utilization) == [
        "named_metrics.kv_cache_usage_perc",
        "named_metrics.kv_cache_utilization",
    ]
    # The enum and the common locality config belong to the built-in policies only.
    assert not cluster.HasField("common_lb_config")
    assert not cluster.lrs_report_endpoint_metrics  # no LRS metrics: nothing of ours reads them


def test_cswrr_takes_the_pools_orca_parameters() -> None:
    orca = {"blackout": 2.5, "expiry": 60, "push_interval": 0, "error_penalty": 0.5}
    orca["kv_cache_metrics"] = ["named_metrics.gpu_cache"]
    config = cswrr_config(resources(snapshot(CSWRR, orca=orca))[typeurls.CLUSTER]["llama"])
    assert config.blackout_period.ToMilliseconds() == 2500
    assert config.weight_expiration_period.seconds == 60
    assert config.weight_update_period.ToMilliseconds() == 100  # Envoy's floor
    assert config.error_utilization_penalty.value == 0.5
    assert list(config.metric_names_for_computing_utilization) == ["named_metrics.gpu_cache"]


@pytest.mark.parametrize(
    ("lb_policy", "weighting", "asks"),
    [(CSWRR, "static", True), ("round_robin", "orca", True), ("round_robin", "static", False)],
)
def test_routes_ask_for_orca_where_something_reads_it(
    lb_policy: str, weighting: str, asks: bool
) -> None:
    route_config = resources(snapshot(lb_policy, weighting))[typeurls.ROUTE]["inference"]
    (route,) = route_config.virtual_hosts[0].routes
    added = {option.header.key: option.header.value for option in route.request_headers_to_add}
    assert (added.get(ORCA_FORMAT_HEADER) == "TEXT") is asks
    assert ("endpoint-load-metrics" in route.response_headers_to_remove) is asks


def test_built_in_policies_keep_the_enum_and_locality_weighting() -> None:
    cluster = resources(snapshot("least_request"))[typeurls.CLUSTER]["llama"]
    assert cluster.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert cluster.common_lb_config.HasField("locality_weighted_lb_config")
    assert not cluster.HasField("load_balancing_policy")


def test_cswrr_with_our_orca_weights_is_refused() -> None:
    with pytest.raises(SnapshotError) as err:
        parse_config(snapshot(CSWRR, "orca"), "s.yaml")
    (problem,) = err.value.problems
    assert problem.path == "pools[0].weighting"
    assert "ignores EDS weights" in problem.message
