"""LoadReportingService over real gRPC: handshake, reports into the store, pushes, disconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc
import pytest
from envoy.service.load_stats.v3 import lrs_pb2

from lrs.contract import raw_bytes
from lrs.load_reporting_service import METHOD, REASK_AFTER, SERVICE, LoadReportingService
from lrs.load_store import LoadStore
from lrs.pacing import IntervalGovernor
from tests.test_lrs_store import KV, endpoint, report
from xds_lab.envoy_process import EnvoyProcess
from xds_lab.envoy_rig import free_port
from xds_lab.upstream import Upstream
from xds_server.bootstrap import XDS_CLUSTER, envoy_bootstrap
from xds_server.config.reader import parse_config
from xds_server.grpc_server import start_grpc_server
from xds_server.resources.build import build_all
from xds_server.xds.cache import ResourceCache
from xds_server.xds.clients import ClientRegistry
from xds_server.xds.services import DiscoveryServices

A = "127.0.0.1:9001"
GROUPS = {"edge": ["pool-a", "pool-b"]}


class LrsClient:
    """One StreamLoadStats call; every request repeats the node, as Envoy's do."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, node_cluster: str) -> None:
        self.call = channel.stream_stream(
            f"/{SERVICE}/{METHOD}",
            request_serializer=raw_bytes,
            response_deserializer=lrs_pb2.LoadStatsResponse.FromString,
        )()
        self.node_id = node_id
        self.node_cluster = node_cluster
        self._pending: asyncio.Future[lrs_pb2.LoadStatsResponse] | None = None

    async def send(self, request: lrs_pb2.LoadStatsRequest | None = None) -> None:
        message = lrs_pb2.LoadStatsRequest()
        if request is not None:
            message.CopyFrom(request)
        message.node.id, message.node.cluster = self.node_id, self.node_cluster
        await self.call.write(message.SerializeToString())

    async def recv(self, timeout: float = 5.0) -> lrs_pb2.LoadStatsResponse:
        """The next response; a read left pending by expect_silence is the one to finish."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.call.read())
        response = await asyncio.wait_for(asyncio.shield(self._pending), timeout)
        self._pending = None
        return response

    async def expect_silence(self, seconds: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            await self.recv(seconds)


class Rig:
    def __init__(self, store: LoadStore, service: LoadReportingService, target: str) -> None:
        self.store = store
        self.service = service
        self.groups = dict(GROUPS)
        self.channel = grpc.aio.insecure_channel(target)

    def client(self, node_id: str = "envoy-1", node_cluster: str = "edge") -> LrsClient:
        return LrsClient(self.channel, node_id, node_cluster)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    store = LoadStore(window=5.0)
    store.set_known({"pool-a": [A], "pool-b": [A]})
    groups: dict[str, list[str]] = dict(GROUPS)
    service = LoadReportingService(store, lambda c: groups.get(c, ["pool-a"]), interval=0.5)
    server, port = await start_grpc_server(service.handlers(), "127.0.0.1", 0)
    rig = Rig(store, service, f"127.0.0.1:{port}")
    rig.groups = groups
    try:
        yield rig
    finally:
        await rig.channel.close()
        await server.stop(grace=None)


async def test_first_response_names_the_groups_clusters_interval_and_granularity(rig: Rig):
    edge, other = rig.client("e1", "edge"), rig.client("e2", "somewhere")
    await edge.send()
    await other.send()
    first = await edge.recv()
    assert list(first.clusters) == ["pool-a", "pool-b"]
    assert not first.send_all_clusters
    assert first.load_reporting_interval.ToNanoseconds() == 500_000_000
    assert first.report_endpoint_granularity
    assert list((await other.recv()).clusters) == ["pool-a"]
    assert rig.service.connected_reporters == 2


async def test_reports_land_in_the_store(rig: Rig):
    client = rig.client()
    await client.send()
    await client.recv()
    stats = endpoint(A, ok=6, in_progress=2, metrics={KV: (6, 4.2)})
    await client.send(report("pool-a", stats, interval=0.5))
    await until(lambda: A in rig.store.pool_load("pool-a", time.monotonic()))
    load = rig.store.pool_load("pool-a", time.monotonic())[A]
    assert load.rps == pytest.approx(12.0)
    assert load.metrics[KV] == pytest.approx(0.7)
    assert load.in_progress == 2
    assert rig.service.reports_received == 2
    assert rig.service.endpoint_stats_ingested == 1


async def test_same_node_on_two_streams_counts_as_two_reporters(rig: Rig):
    first, second = rig.client("e1"), rig.client("e1")
    for client in (first, second):
        await client.send()
        await client.recv()
        await client.send(report("pool-a", endpoint(A, ok=1, in_progress=3)))
    await until(lambda: rig.store.pool_load("pool-a", time.monotonic()).get(A) is not None)
    await until(lambda: rig.store.pool_load("pool-a", time.monotonic())[A].in_progress == 6)


async def test_reconnect_first_message_with_stats_is_ingested(rig: Rig):
    client = rig.client()
    await client.send(report("pool-b", endpoint(A, ok=4)))
    await client.recv()
    await until(lambda: A in rig.store.pool_load("pool-b", time.monotonic()))


async def test_clusters_changed_pushes_only_where_the_list_changed(rig: Rig):
    edge, other = rig.client("e1", "edge"), rig.client("e2", "core")
    for client in (edge, other):
        await client.send()
        await client.recv()
    rig.service.clusters_changed()  # nothing changed
    await edge.expect_silence()
    rig.groups["edge"] = ["pool-b"]
    rig.service.clusters_changed()
    pushed = await edge.recv()
    assert list(pushed.clusters) == ["pool-b"] and pushed.report_endpoint_granularity
    await other.expect_silence()


async def test_disconnect_forgets_the_reporters_in_progress(rig: Rig):
    stays, leaves = rig.client("stays"), rig.client("leaves")
    for client, level in ((stays, 1), (leaves, 5)):
        await client.send()
        await client.recv()
        await client.send(report("pool-a", endpoint(A, ok=2, in_progress=level)))
    await until(lambda: rig.store.pool_load("pool-a", time.monotonic())[A].in_progress == 6)
    leaves.call.cancel()
    await until(lambda: rig.service.connected_reporters == 1)
    load = rig.store.pool_load("pool-a", time.monotonic())[A]
    assert load.in_progress == 1 and load.reporters == 1
    assert load.rps > 0  # what it reported still counts until the window passes


async def test_first_message_without_node_id_ends_the_stream(rig: Rig):
    client = rig.client(node_id="")
    await client.send()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await client.recv()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rig.service.reports_rejected == 1
    await until(lambda: not rig.service._streams)


async def test_unparseable_report_is_counted_and_the_stream_goes_on(rig: Rig):
    client = rig.client()
    await client.send()
    await client.recv()
    await client.call.write(b"\x12\xff\xff")  # cluster_stats with a length past the end
    await client.send(report("pool-a", endpoint(A, ok=1)))
    await until(lambda: A in rig.store.pool_load("pool-a", time.monotonic()))
    assert rig.service.reports_rejected == 1
    assert rig.service.connected_reporters == 1


async def test_clusters_left_out_of_reports_are_asked_for_again_after_a_while(rig: Rig):
    """An Envoy asked for a cluster it did not have yet never reports it; reports without
    any cluster stats at all (none of the asked-for clusters existed) count too."""
    client = rig.client()  # group "edge": pool-a and pool-b
    await client.send()
    await client.recv()
    await client.send(report("pool-a", endpoint(A, ok=1)))
    await client.expect_silence(0.2)  # too soon to ask again
    await asyncio.sleep(REASK_AFTER)
    await client.send()  # a report with no cluster stats
    again = await client.recv()
    assert list(again.clusters) == ["pool-a", "pool-b"]
    assert rig.service.clusters_reasked == 1


def test_interval_must_be_positive():
    with pytest.raises(ValueError):
        LoadReportingService(LoadStore(), lambda c: [], interval=0)


# --------------------------------------------------------------------------- real Envoy

ORCA_HEADER = {"endpoint-load-metrics": f"TEXT {KV}=0.7"}


def _orca_snapshot(listener_port: int, ports: list[int]) -> str:
    endpoints = "\n".join(
        f"      - {{address: 127.0.0.1, port: {port}, zone: zone-{i % 2}}}"
        for i, port in enumerate(ports)
    )
    return f"""\
listeners:
  - name: inference
    address: 127.0.0.1
    port: {listener_port}
    routes:
      - prefix: /
        pool: llama
pools:
  - name: llama
    weighting: orca
    endpoints:
{endpoints}
"""


@pytest.mark.envoy
async def test_real_envoy_reports_per_endpoint_rates_and_orca_means(tmp_path):
    upstreams = [Upstream(f"u{i}", headers=ORCA_HEADER) for i in range(2)]
    for upstream in upstreams:
        await upstream.start()
    listener_port = free_port()
    config = parse_config(_orca_snapshot(listener_port, [u.port for u in upstreams]), "test")
    cache, registry = ResourceCache(), ClientRegistry()
    cache.set_all(build_all(config), lambda c: config.group_for(c).name)
    store = LoadStore(window=5.0)
    store.set_known({p.name: [e.key for e in p.endpoints] for p in config.pools})
    lrs = LoadReportingService(store, lambda c: config.group_for(c).pools, interval=0.5)
    handlers = DiscoveryServices(cache, registry).handlers() + lrs.handlers()
    server, port = await start_grpc_server(handlers, "127.0.0.1", 0)
    bootstrap = envoy_bootstrap("envoy-lrs", xds_port=port, envoy_admin_port=free_port())
    [service] = bootstrap["cluster_manager"]["load_stats_config"]["grpc_services"]
    assert service["envoy_grpc"]["cluster_name"] == XDS_CLUSTER
    envoy = EnvoyProcess(bootstrap, tmp_path)
    try:
        await envoy.start()
        await envoy.wait_ready()
        keys = {e.key for e in config.pools[0].endpoints}
        url = f"http://127.0.0.1:{listener_port}/v1/completions"
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as session:
            while True:
                for _ in range(20):
                    async with session.post(url, json={}) as response:
                        assert response.status == 200
                        # Envoy must not leak backend load to callers.
                        assert "endpoint-load-metrics" not in response.headers
                loads = store.pool_load("llama", time.monotonic())
                if set(loads) == keys and all(KV in load.metrics for load in loads.values()):
                    break
                assert time.monotonic() < deadline, f"no full LRS view: {loads}"
                await asyncio.sleep(0.1)
        for load in loads.values():
            assert load.rps > 0 and load.reporters == 1
            assert load.metrics[KV] == pytest.approx(0.7)
        assert set(store.locality_load("llama", time.monotonic())) == {"zone-0", "zone-1"}
        assert store.ignored["unknown_cluster"] == 0  # the xds cluster is not asked for
        assert lrs.reports_rejected == 0 and lrs.connected_reporters == 1
    finally:
        await envoy.stop()
        await server.stop(grace=None)
        for upstream in upstreams:
            await upstream.stop()


# --------------------------------------------------------------------------- back-pressure


def test_governor_raises_the_interval_over_budget_and_lowers_it_when_load_falls():
    governor = IntervalGovernor(base=1.0, budget=0.5, max_interval=60.0, horizon=5.0)
    for t in range(7):  # 0.9 cores of ingest for the first full history (5 s + 2 intervals)
        governor.record(0.9, float(t))
        assert governor.review(t + 0.5) is None
    assert governor.usage(7.0) == pytest.approx(0.9)
    assert governor.review(7.0) == pytest.approx(2.2)  # 1 s * 0.9 / (0.8 * 0.5), rounded
    assert governor.usage(7.0) == 0.0  # history restarts at the new interval
    for t in range(8, 17):  # the fleet now reports half as often: ~0.4 cores, in budget
        governor.record(0.4, float(t))
        assert governor.review(t + 0.5) is None
    for t in range(17, 40):  # then the fleet shrinks: hardly any ingest
        governor.record(0.01, float(t))
    assert governor.review(40.0) == 1.0  # back to the configured interval, not below
    assert governor.changes == 2


def test_governor_caps_the_interval_and_lowers_it_in_proportion():
    governor = IntervalGovernor(base=1.0, budget=0.5, max_interval=10.0, horizon=1.0)
    for t in range(4):
        governor.record(50.0, float(t))
    assert governor.review(4.0) == 10.0  # 100 cores' worth wants 250 s: capped
    for t in range(5, 26):
        governor.record(1.9, float(t))  # still over budget at the cap: nothing to do
    assert governor.review(26.0) is None and governor.interval == 10.0
    for t in range(26, 48):
        governor.record(0.18, float(t))  # 0.36 of the budget: lower, aiming at 0.8 of it
    assert governor.review(48.0) == 4.5
    with pytest.raises(ValueError):
        IntervalGovernor(base=1.0, max_interval=0.5)


async def test_ingest_over_budget_sends_a_longer_interval_and_widens_the_window():
    store = LoadStore(window=2.0)
    store.set_known({"pool-a": [A]})
    governor = IntervalGovernor(base=0.1, budget=1e-9, max_interval=0.5, horizon=0.05)
    service = LoadReportingService(store, lambda c: ["pool-a"], interval=0.1, governor=governor)
    server, port = await start_grpc_server(service.handlers(), "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = LrsClient(channel, "e1", "edge")
            await client.send()
            assert (await client.recv()).load_reporting_interval.ToNanoseconds() == 100_000_000
            deadline = time.monotonic() + 10
            while (response := await _report_until_answered(client)) is None:
                assert time.monotonic() < deadline, "no new interval"
            assert response.load_reporting_interval.ToNanoseconds() == 500_000_000
            assert list(response.clusters) == ["pool-a"]
        assert service.reporting_interval == 0.5 and store.window == pytest.approx(10.0)
        assert service.cpu_budget == 1e-9 and service.budget_use >= 0.0
    finally:
        await server.stop(grace=None)


async def _report_until_answered(client: LrsClient) -> lrs_pb2.LoadStatsResponse | None:
    await client.send(report("pool-a", endpoint(A, ok=1)))
    try:
        return await client.recv(0.05)
    except TimeoutError:
        return None


async def test_a_large_report_is_merged_in_slices_with_the_loop_running_between():
    store = LoadStore()
    keys = [f"10.0.0.{i}:8000" for i in range(1, 201)]
    store.set_known({"pool-a": keys})
    service = LoadReportingService(store, lambda c: ["pool-a"], slice_stats=10)
    server, port = await start_grpc_server(service.handlers(), "127.0.0.1", 0)
    seen: set[int] = set()  # endpoint stats merged so far, as other tasks saw it

    async def watch() -> None:
        while True:
            seen.add(store.endpoint_stats)
            await asyncio.sleep(0)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = LrsClient(channel, "e1", "edge")
            await client.send()
            await client.recv()
            watcher = asyncio.create_task(watch())
            await client.send(report("pool-a", *(endpoint(k, ok=1) for k in keys)))
            await until(lambda: store.endpoint_stats == 200)
            watcher.cancel()
        # Another task ran between the slices of 10: it saw the report partly merged.
        assert set(range(10, 200, 10)) <= seen
    finally:
        await server.stop(grace=None)
