"""/metrics moves with what happens: clients connect, ACK, NACK and leave; files reload; load."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lrs.load_store import LoadStore
from lrs.weights.signals import PoolWeights
from tests.admin_rig import (
    KV,
    TOKEN,
    Admin,
    lrs_report,
    running,
    scrape,
    snapshot_doc,
    value,
    wait_for,
    write_doc,
)
from tests.xds_client import DeltaClient, SotwClient, node
from xds_lab.envoy_rig import node_in_sync
from xds_server.app import ControlPlane
from xds_server.xds.typeurls import ENDPOINT

PORTS = [9001, 9002, 9003]
A, B, C = (f"127.0.0.1:{p}" for p in PORTS)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, Admin]]:
    doc = snapshot_doc(PORTS)
    doc["pools"][0]["weighting"] = "orca"
    doc["pools"][0]["shedding"] = True
    write_doc(tmp_path / "snapshot.yaml", doc)
    (tmp_path / "token").write_text(TOKEN)
    async with running(tmp_path / "snapshot.yaml", admin_token_file=tmp_path / "token") as pair:
        yield pair


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_protocol_metrics_follow_a_client(api: tuple[ControlPlane, Admin], protocol: str):
    plane, admin = api
    target = f"127.0.0.1:{plane.xds_port}"
    labels = {"type": "endpoints", "protocol": protocol, "group": "default"}
    sync = {"protocol": protocol, "group": "default", "type": "endpoints"}
    client_type = SotwClient if protocol == "sotw" else DeltaClient
    async with client_type(target, node("edge-1")) as client:
        client.request(ENDPOINT, ["llama"])
        first = await client.recv()
        samples = await scrape(admin)
        assert value(samples, "xds_connected_clients", protocol=protocol, group="default") == 1
        assert value(samples, "xds_responses_sent_total", **labels) == 1
        assert value(samples, "xds_client_sync", **sync, state="pending") == 1
        if protocol == "delta":
            client.ack(first)
        else:
            client.ack(first, ["llama"])
        await wait_for(lambda: node_in_sync(plane, "edge-1"))
        samples = await scrape(admin)
        assert value(samples, "xds_acks_total", **labels) == 1
        assert value(samples, "xds_push_convergence_seconds_count", **labels) == 1
        assert 0 < value(samples, "xds_push_convergence_seconds_sum", **labels) < 5
        assert value(samples, "xds_client_sync", **sync, state="in_sync") == 1

        # An API drain pushes a new version; the client rejects it.
        status, _ = await admin.call("POST", f"/api/v1/pools/llama/endpoints/{A}/drain")
        assert status == 200
        second = await client.recv()
        if protocol == "delta":
            client.nack(second, "no thanks")
        else:
            client.nack(second, "no thanks", first.version_info, ["llama"])
        await wait_for(lambda: node_in_sync(plane, "edge-1"))
        samples = await scrape(admin)
        assert value(samples, "xds_nacks_total", **labels) == 1
        assert value(samples, "xds_responses_sent_total", **labels) == 2
        assert value(samples, "xds_acks_total", **labels) == 1
        assert value(samples, "xds_client_sync", **sync, state="rejected") == 1
    await wait_for(lambda: len(plane.registry) == 0)
    samples = await scrape(admin)
    assert value(samples, "xds_connected_clients", protocol=protocol, group="default") == 0
    assert value(samples, "xds_nacks_total", **labels) == 1  # counters keep counting
    assert not any("edge-1" in str(labels) for _, labels in samples)  # never a node id


async def test_snapshot_and_reload_metrics(api: tuple[ControlPlane, Admin], tmp_path: Path):
    plane, admin = api
    samples = await scrape(admin)
    assert value(samples, "xds_snapshot_reloads_total") == 1
    assert value(samples, "xds_snapshot_last_load_ok") == 1
    assert value(samples, "xds_snapshot_resources", group="default", type="endpoints") == 1
    version = plane.cache.groups["default"].of_type(ENDPOINT).version
    assert value(samples, "xds_snapshot_version", group="default", type="endpoints") == int(
        version[:13], 16
    )
    generation = value(samples, "xds_snapshot_generation")
    (tmp_path / "snapshot.yaml").write_text("pools: [")
    await wait_for(lambda: plane.source.failures == 1)
    write_doc(tmp_path / "snapshot.yaml", snapshot_doc([*PORTS, 9004]))
    await wait_for(lambda: plane.source.reloads == 2)
    samples = await scrape(admin)
    assert value(samples, "xds_snapshot_reload_failures_total") == 1
    assert value(samples, "xds_snapshot_reloads_total") == 2
    assert value(samples, "xds_snapshot_generation") > generation
    assert value(samples, "xds_pool_endpoints", pool="llama", state="active") == 4
    assert ("xds_snapshot_watch_errors_total", frozenset()) in samples  # 0, but exposed
    plane.source.watch_errors = 2  # what the watcher counts (tests/test_config_source.py)
    assert value(await scrape(admin), "xds_snapshot_watch_errors_total") == 2


async def test_admin_requests_are_counted_by_route_and_code(api: tuple[ControlPlane, Admin]):
    _, admin = api
    await admin.get("/api/v1/pools/llama/endpoints")
    await admin.call("GET", "/api/v1/pools/nope/endpoints")
    await admin.call("POST", f"/api/v1/pools/llama/endpoints/{A}/drain", token=None)
    await admin.call("GET", "/no/such/route")
    samples = await scrape(admin)
    route = "/api/v1/pools/{pool}/endpoints"
    drain = "/api/v1/pools/{pool}/endpoints/{endpoint}/drain"
    counted = "xds_admin_requests_total"
    assert value(samples, counted, route=route, method="GET", code="200") == 1
    assert value(samples, counted, route=route, method="GET", code="404") == 1
    assert value(samples, counted, route=drain, method="POST", code="401") == 1
    assert value(samples, counted, route="unmatched", method="GET", code="404") == 1


async def test_load_and_weight_metrics_from_a_real_load_store(api: tuple[ControlPlane, Admin]):
    plane, admin = api
    samples = await scrape(admin)
    # The weight engine gives every endpoint of the orca pool the same neutral weight before
    # any report arrives.
    neutral = {value(samples, "xds_endpoint_weight", pool="llama", endpoint=e) for e in (A, B, C)}
    assert len(neutral) == 1
    assert value(samples, "xds_pool_endpoints_reporting", pool="llama") == 0

    store = LoadStore(window=5.0)
    store.set_known({"llama": [A, B, C]})
    store.ingest("envoy-1", lrs_report({9001: {KV: 0.25}, 9002: {KV: 0.75}}), time.monotonic())
    plane.observe_load(lambda pool: store.pool_load(pool, time.monotonic()), lambda: store.reports)
    plane.publisher.publish_weights(
        "llama",
        PoolWeights(
            {A: 30, B: 5, C: 10},
            {"zone-0": 40, "zone-1": 5},
            frozenset({B}),
            explain={A: {"bottleneck": "kv_cache"}},
            drop_ppm=250_000,
        ),
    )
    samples = await scrape(admin)
    ep = {"pool": "llama", "endpoint": A}
    assert value(samples, "xds_lrs_load_reports_received_total") == 1
    # The control loop: LRS pacing at the configured interval, the engine's rounds.
    assert value(samples, "xds_lrs_reporting_interval_seconds") == plane.settings.lrs_interval
    assert value(samples, "xds_lrs_ingest_cpu_budget_cores") == plane.settings.lrs_cpu_budget
    assert value(samples, "xds_lrs_ingest_cpu_cores") >= 0
    assert value(samples, "xds_weight_pushes_total", pool="llama") >= 1
    assert value(samples, "xds_weight_policy_errors_total") == 0
    assert value(samples, "xds_weight_rounds_failed_total") == 0
    assert value(samples, "xds_pool_endpoints_reporting", pool="llama") == 2
    assert value(samples, "xds_endpoint_load_metric", **ep, metric=KV) == pytest.approx(0.25)
    assert value(samples, "xds_endpoint_requests_per_second", **ep) > 0
    assert value(samples, "xds_endpoint_load_reporters", **ep) == 1
    assert value(samples, "xds_endpoint_weight", **ep) == 30
    assert value(samples, "xds_endpoint_static_weight", **ep) == 1
    assert value(samples, "xds_endpoint_saturated", pool="llama", endpoint=B) == 1
    assert value(samples, "xds_locality_weight", pool="llama", zone="zone-0") == 40
    assert value(samples, "xds_pool_drop_fraction", pool="llama") == 0.25
    # The admin API shows the same numbers.
    endpoints = await admin.endpoints()
    assert endpoints[A]["effective_weight"] == 30 and endpoints[B]["saturated"] is True
    assert endpoints[A]["explain"] == {"bottleneck": "kv_cache"} and endpoints[C]["explain"] is None
    assert endpoints[A]["load"]["metrics"][KV] == pytest.approx(0.25)
    assert endpoints[C]["load"] is None  # no report carried it
    pools = await admin.get("/api/v1/pools")
    assert pools["load_data"] is True
    llama = next(p for p in pools["pools"] if p["name"] == "llama")
    assert llama["shedding"] is True and llama["drop_fraction"] == 0.25
