"""Load reports that cannot be forged: what one reporter can and cannot do to the weights.

The store and the weight policy are real; reports come from scripted LRS clients over
real gRPC (with mTLS where the reporter's identity matters) or straight into the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml

from lrs.load_reporting_service import MAX_EARLY, REPORT_BURST
from lrs.load_store import MAX_ENDPOINT_RPS, LoadStore
from lrs.weights import EndpointInput, load_policy
from tests.test_lrs_service import LrsClient
from tests.test_lrs_store import KV, endpoint, report
from xds_lab.certs import Authority
from xds_lab.envoy_rig import local_settings
from xds_server.app import ControlPlane
from xds_server.tls import TlsFiles

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
EDGE_ID = "spiffe://example.org/ns/edge/sa/envoy"


def _fleet_report(kv: dict[str, float], requests: int = 20, interval: float = 1.0):
    return report(
        "pool",
        *(endpoint(k, ok=requests, metrics={KV: (requests, v * requests)}) for k, v in kv.items()),
        interval=interval,
    )


def _weights(store: LoadStore, now: float) -> dict[str, int]:
    policy = load_policy("headroom", {"blackout": 0, "ewma_alpha": 1.0, "hysteresis": 0})
    loads = store.pool_load("pool", now)
    inputs = [EndpointInput(k, "zone-a", 1, loads.get(k), 0.0) for k in (A, B, C)]
    return dict(policy.compute(inputs, now).endpoints)


def _run(forger: bool) -> tuple[dict[str, float], dict[str, int], LoadStore]:
    """Three honest Envoys report the same fleet for 4 s; a fourth may lie about A."""
    store = LoadStore(window=5.0)
    store.set_known({"pool": [A, B, C]})
    honest = {A: 0.9, B: 0.3, C: 0.3}  # A's KV cache is nearly full
    for second in range(1, 5):
        for n in range(3):
            store.ingest(f"envoy-{n}", _fleet_report(honest), second + n * 0.1)
        if forger:
            # Claims a billion requests finished on A, with an empty KV cache.
            lie = endpoint(A, ok=999_999_999, metrics={KV: (999_999_999, 0.0)})
            store.ingest("forger", report("pool", lie), second + 0.5)
    now = 4.6
    means = {k: load.metrics[KV] for k, load in store.pool_load("pool", now).items()}
    return means, _weights(store, now), store


def test_one_reporter_cannot_outvote_the_fleet_with_absurd_counts():
    honest_means, honest_weights, _ = _run(forger=False)
    means, weights, store = _run(forger=True)
    assert honest_means[A] == pytest.approx(0.9)
    # The lie weighs as one reporter of four (its count is capped at METRIC_WEIGHT_CAP per
    # report, like every honest reporter past it), not as a billion requests against 60.
    assert means[A] == pytest.approx(0.9 * 3 / 4)
    assert store.dropped_values["count_over_cap"] >= 4
    # Its claimed rate is capped at MAX_ENDPOINT_RPS over the time it really took.
    assert store.pool_load("pool", 4.6)[A].rps <= 60 + MAX_ENDPOINT_RPS
    # A stays the most loaded endpoint: it still gets the least weight.
    assert weights[A] < weights[B] and weights[A] < weights[C]
    assert honest_weights[A] < honest_weights[B]


def test_reports_for_clusters_not_asked_for_are_not_merged():
    store = LoadStore(window=5.0)
    store.set_known({"pool": [A], "other": [A]})
    store.ingest("envoy-1", report("other", endpoint(A, ok=5)), 1.0, clusters=["pool"])
    store.ingest("envoy-1", report("pool", endpoint(A, ok=5)), 1.5, clusters=["pool"])
    assert store.pool_load("other", 2.0) == {}
    assert A in store.pool_load("pool", 2.0)
    assert store.ignored["not_asked"] == 1


def test_counts_are_capped_by_the_time_the_reporter_really_took():
    """A report claiming a 1-hour interval a second after the last gets a second's cap."""
    store = LoadStore(window=5.0, max_endpoint_rps=100.0)
    store.set_known({"pool": [A]})
    store.ingest("e1", report("pool", endpoint(A, ok=50)), 1.0)
    store.ingest("e1", report("pool", endpoint(A, ok=10_000), interval=3600.0), 2.0)
    # 50 (first report, 1 s) + 100 (capped: 1 s really passed) over the 2 s they cover;
    # believed, the hour would have cut every endpoint's rate of the cluster 1,800-fold.
    assert store.pool_load("pool", 2.5)[A].rps == pytest.approx(150 / 2, rel=0.01)


# --------------------------------------------------------------------------- over gRPC


def _snapshot(path: Path) -> Path:
    document = {
        "listeners": [
            {"name": "l", "port": 10000, "routes": [{"prefix": "/", "pool": "pool"}]},
        ],
        "pools": [
            {
                "name": "pool",
                "weighting": "orca",
                "endpoints": [{"address": a.split(":")[0], "port": 8000} for a in (A, B, C)],
            },
            {
                "name": "other",
                "weighting": "orca",
                "endpoints": [{"address": "10.0.0.9", "port": 1}],
            },
        ],
        "node_groups": [
            {
                "name": "edge",
                "node_clusters": ["edge"],
                "identities": ["spiffe://example.org/ns/edge/*"],
                "pools": ["pool"],
            },
            {"name": "lab", "node_clusters": ["lab"], "pools": ["other"]},
        ],
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, grpc.ChannelCredentials]]:
    ca = Authority(tmp_path / "pki")
    server = ca.server()
    client = ca.issue("edge", uris=(EDGE_ID,))
    files = TlsFiles(server.cert, server.key, ca.cert)
    plane = ControlPlane(local_settings(_snapshot(tmp_path / "s.yaml"), tls=files))
    await plane.start()
    cert, key = client.pem()
    creds = grpc.ssl_channel_credentials(ca.cert.read_bytes(), key, cert)
    try:
        yield plane, creds
    finally:
        await plane.stop(0)


async def test_an_unauthenticated_reporter_cannot_connect(plane):
    control, _ = plane
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.xds_port}") as channel:
        client = LrsClient(channel, "anonymous", "edge")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.send()
            await client.recv()
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert control.lrs.connected_reporters == 0 and control.store.reports == 0


async def test_a_reporter_is_asked_only_for_its_groups_clusters_and_the_rest_is_dropped(plane):
    control, creds = plane
    async with grpc.aio.secure_channel(f"127.0.0.1:{control.xds_port}", creds) as channel:
        client = LrsClient(channel, "envoy-1", "edge")
        await client.send()
        asked = await client.recv()
        assert list(asked.clusters) == ["pool"]
        await asyncio.sleep(0.6)  # within the asked interval's allowance
        await client.send(report("other", endpoint("10.0.0.9:1", ok=1_000)))
        await client.send(report("pool", endpoint(A, ok=10)))
        deadline = time.monotonic() + 5
        while A not in control.store.pool_load("pool", time.monotonic()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    assert control.store.pool_load("other", time.monotonic()) == {}
    assert control.store.ignored["not_asked"] == 1
    # The reporter is the certificate's identity plus node.id, not a name it chose.
    assert any(r.startswith(f"{EDGE_ID}/envoy-1#") for r in control.store._reporters)


async def test_a_reporter_ignoring_the_interval_is_dropped_then_cut_off(plane):
    control, creds = plane
    async with grpc.aio.secure_channel(f"127.0.0.1:{control.xds_port}", creds) as channel:
        client = LrsClient(channel, "flooder", "edge")
        await client.send()
        await client.recv()  # asked for a 1 s interval
        before = time.thread_time()
        for _ in range(REPORT_BURST + MAX_EARLY):
            await client.send(report("pool", endpoint(A, ok=1)))
            await asyncio.sleep(0.005)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.recv()
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert control.lrs.reports_early >= MAX_EARLY
    assert control.lrs.refused == {"report_rate": 1}
    # Only the burst allowance was merged; the flood cost no ingest time to speak of.
    assert control.store.endpoint_stats <= REPORT_BURST
    assert control.lrs.ingest_cpu_share < 0.5
    assert time.thread_time() - before < 5
