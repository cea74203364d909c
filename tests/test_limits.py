"""Every per-client limit, hit by real gRPC clients against a real ControlPlane on loopback.

Each test starts a plane with small limits (xds_server.admission.ClientLimits), drives a
client over one, and checks three things: the client over the limit gets RESOURCE_EXHAUSTED
with a message saying what to do, everyone else keeps being served (an open stream still
receives the next version after a snapshot edit, an honest reporter is still merged), and
the refusal is counted in /metrics (`xds_client_refused_total` by service and reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from lrs.load_reporting_service import MAX_EARLY, REPORT_BURST
from tests.admin_rig import Admin, running, scrape, snapshot_doc, value, write_doc
from tests.test_lrs_service import LrsClient
from tests.test_lrs_store import endpoint, report
from tests.xds_client import ADS, DeltaClient, SotwClient, names_of, node
from xds_server.admission import ClientLimits, peer_address
from xds_server.app import ControlPlane
from xds_server.xds.typeurls import ENDPOINT

POOL = "llama"
A, B = "127.0.0.1:9001", "127.0.0.1:9002"
REFUSED = "xds_client_refused_total"
Plane = tuple[ControlPlane, Admin]


def _doc(ports: list[int]) -> dict[str, Any]:
    """One load-weighted pool (so LRS asks for it) with endpoints on these ports."""
    doc = snapshot_doc(ports)
    doc["pools"][0]["weighting"] = "orca"
    return doc


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "snapshot.yaml"
    write_doc(path, _doc([9001, 9002]))
    return path


@contextlib.asynccontextmanager
async def plane(snapshot: Path, host: str = "127.0.0.1", **limits: Any) -> AsyncIterator[Plane]:
    async with running(snapshot, host=host, limits=ClientLimits(**limits)) as started:
        yield started


def target(started: Plane, host: str = "127.0.0.1") -> str:
    return f"{host}:{started[0].xds_port}"


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def in_progress(control: ControlPlane, key: str) -> int:
    """Requests in progress at the endpoint, as the merged load reports have it."""
    load = control.store.pool_load(POOL, time.monotonic()).get(key)
    return load.in_progress if load is not None else 0


def eds_ports(response: discovery_pb2.DiscoveryResponse) -> list[int]:
    [resource] = response.resources
    assignment = endpoint_pb2.ClusterLoadAssignment.FromString(resource.value)
    return sorted(
        lb.endpoint.address.socket_address.port_value
        for locality in assignment.endpoints
        for lb in locality.lb_endpoints
    )


async def subscribed(address: str, node_id: str) -> SotwClient:
    """A SotW client subscribed to the pool's endpoints, its first response ACKed."""
    client = SotwClient(address, node(node_id))
    client.request(ENDPOINT, [POOL])
    first = await client.recv()
    assert names_of(first) == [POOL]
    client.ack(first, [POOL])
    return client


async def refused(client: SotwClient | DeltaClient) -> str:
    """The details of the RESOURCE_EXHAUSTED that ended the client's stream."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.recv()
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value
    return raised.value.details() or ""


async def still_served(snapshot: Path, clients: list[SotwClient], ports: list[int]) -> None:
    """Edit the snapshot: every open client receives the new endpoints."""
    write_doc(snapshot, _doc(ports))
    for client in clients:
        assert eds_ports(await client.recv()) == sorted(ports)


async def refusals(admin: Admin) -> dict[tuple[str, str], float]:
    """xds_client_refused_total by (service, reason), as /metrics has it."""
    samples = await scrape(admin)
    return {
        (labels["service"], labels["reason"]): count
        for (name, label_set), count in samples.items()
        if name == REFUSED
        for labels in [dict(label_set)]
    }


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class Ads:
    """A SotW ADS call written and read directly; several may share one channel."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str) -> None:
        self.call = channel.stream_stream(
            ADS + "StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        self.node = node(node_id)
        self.first = True

    async def request(self, names: list[str], version: str = "", nonce: str = "") -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=ENDPOINT, resource_names=names, version_info=version, response_nonce=nonce
        )
        if self.first:
            request.node.CopyFrom(self.node)
            self.first = False
        await self.call.write(request)

    async def recv(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), timeout)
        assert response is not grpc.aio.EOF
        return response

    async def subscribe(self) -> discovery_pb2.DiscoveryResponse:
        await self.request([POOL])
        first = await self.recv()
        await self.request([POOL], first.version_info, first.nonce)
        return first


# ---------------------------------------------------------------------------- streams


async def test_max_streams_total(snapshot: Path):
    """xDS and LRS streams count together; the one over the limit is refused, the open
    ones are served, and a closed one's slot goes to the next client."""
    async with plane(snapshot, max_streams=3) as started:
        control, admin = started
        first = await subscribed(target(started), "n1")
        second = await subscribed(target(started), "n2")
        async with grpc.aio.insecure_channel(target(started)) as channel:
            reporter = LrsClient(channel, "envoy-1", "edge")
            await reporter.send()
            assert list((await reporter.recv()).clusters) == [POOL]
            assert control.admission.open_streams == 3

            over = SotwClient(target(started), node("n3"))
            over.request(ENDPOINT, [POOL])
            message = await refused(over)
            assert "maximum of 3 streams" in message and "another replica" in message
            await over.close()
            lrs_over = LrsClient(channel, "envoy-2", "edge")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await lrs_over.send()
                await lrs_over.recv()
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            await still_served(snapshot, [first, second], [9001, 9002, 9003])
            await first.close()
            await until(lambda: control.admission.open_streams == 2)
            third = await subscribed(target(started), "n3")
            assert control.admission.open_streams == 3
            counted = await refusals(admin)
            assert counted[("xds", "streams_total")] == 1
            assert counted[("lrs", "streams_total")] == 1
            reporter.call.cancel()
        for client in (second, third):
            await client.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="needs the IPv6 loopback (::1)")
async def test_max_streams_per_peer(snapshot: Path):
    """Peers are keyed by IP: 127.0.0.1 and ::1 each get their own allowance, and every
    connection from one address counts against the same one (also over IPv6, whose gRPC
    peer string is percent-encoded: `ipv6:%5B::1%5D:port`)."""
    assert peer_address("ipv6:%5B::1%5D:40000") == "::1"
    async with plane(snapshot, host="localhost", max_streams_per_peer=2) as started:
        control, admin = started
        v4, v6 = target(started), target(started, "[::1]")
        held = [await subscribed(address, f"{address}-{i}") for address in (v4, v6) for i in (1, 2)]
        assert control.admission.open == {"127.0.0.1": 2, "::1": 2}
        for address in (v4, v6):
            over = SotwClient(address, node("greedy"))
            over.request(ENDPOINT, [POOL])
            message = await refused(over)
            assert "already holds 2 streams" in message and "close unused streams" in message
            await over.close()

        await still_served(snapshot, held, [9001, 9003])
        await held[0].close()
        await until(lambda: control.admission.open["127.0.0.1"] == 1)
        held[0] = await subscribed(v4, "again")
        assert (await refusals(admin))[("xds", "streams_per_peer")] == 2
        for client in held:
            await client.close()


# ---------------------------------------------------------------------------- requests


async def test_max_names_per_subscription(snapshot: Path):
    names = [POOL, "other-1", "other-2"]
    async with plane(snapshot, max_names_per_subscription=3) as started:
        _, admin = started
        async with SotwClient(target(started), node("sotw-over")) as client:
            client.request(ENDPOINT, [*names, "other-3"])
            message = await refused(client)
            assert "naming 4 resources is over the limit of 3" in message
        async with SotwClient(target(started), node("sotw")) as client:
            client.request(ENDPOINT, names)
            assert names_of(await client.recv()) == [POOL]
        async with DeltaClient(target(started), node("delta-over")) as delta:
            delta.request(ENDPOINT, subscribe=[*names, "other-3"])
            assert "naming 4 resources" in await refused(delta)
        async with DeltaClient(target(started), node("delta")) as delta:
            delta.request(ENDPOINT, subscribe=names)
            assert names_of(await delta.recv()) == [POOL]
        assert (await refusals(admin))[("xds", "subscription_names")] == 2


async def test_oversized_xds_request_ends_only_its_stream(snapshot: Path):
    """Two streams on one connection: the oversized request ends its own, not the other."""
    async with plane(snapshot, max_xds_request_bytes=2048) as started:
        control, admin = started
        async with grpc.aio.insecure_channel(target(started)) as channel:
            big, small = Ads(channel, "big"), Ads(channel, "small")
            for ads in (big, small):
                await ads.subscribe()
            await big.request([POOL, "x" * 4096])
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await big.recv()
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over the limit of 2048" in (raised.value.details() or "")

            write_doc(snapshot, _doc([9001, 9004]))
            assert eds_ports(await small.recv()) == [9001, 9004]
            assert [c.node_id for c in control.registry] == ["small"]
            assert (await refusals(admin))[("xds", "message_size")] == 1
            small.call.cancel()


async def test_oversized_lrs_report_ends_only_its_stream(snapshot: Path):
    async with plane(snapshot, max_lrs_request_bytes=4096) as started:
        control, admin = started
        async with grpc.aio.insecure_channel(target(started)) as channel:
            big, small = LrsClient(channel, "big", "edge"), LrsClient(channel, "small", "edge")
            for reporter in (big, small):
                await reporter.send()
                await reporter.recv()
            await big.send(report(POOL, endpoint(A, ok=1, in_progress=7), zone="z" * 5000))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await big.recv()
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over the limit of 4096" in (raised.value.details() or "")

            await small.send(report(POOL, endpoint(B, ok=1, in_progress=5)))
            await until(lambda: in_progress(control, B) == 5)
            assert in_progress(control, A) == 0  # the oversized report was never merged
            assert control.lrs.connected_reporters == 1
            assert (await refusals(admin))[("lrs", "message_size")] == 1
            small.call.cancel()


# ---------------------------------------------------------------------------- admission


async def first_responses(address: str, count: int) -> list[float | str]:
    """Start `count` clients at once; each one's seconds to its first response, or the
    details of its RESOURCE_EXHAUSTED."""
    started = time.monotonic()

    async def one(index: int) -> float | str:
        async with SotwClient(address, node(f"storm-{index}")) as client:
            client.request(ENDPOINT, [POOL])
            try:
                await client.recv(timeout=5.0)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                return err.details() or ""
            return time.monotonic() - started

    return await asyncio.gather(*(one(i) for i in range(count)))


async def test_a_reconnect_storm_is_admitted_at_a_steady_pace(snapshot: Path):
    """60 clients at once, burst 10, 50 a second: the first 10 at once, then one every
    20 ms; the last one (N - burst) / rate = 1 s after the first, and nobody starves."""
    count, burst, rate = 60, 10, 50.0
    async with plane(snapshot, admission_burst=burst, admission_rate=rate) as started:
        control, admin = started
        results = await first_responses(target(started), count)
        times = sorted(t for t in results if isinstance(t, float))
        assert len(times) == count, [r for r in results if not isinstance(r, float)]
        spread = times[-1] - times[0]
        assert spread == pytest.approx((count - burst) / rate, abs=0.25), times
        for i, at in enumerate(times[burst:], start=1):  # the i-th past the burst
            due = i / rate
            assert due - 0.05 <= at - times[0] <= due + 0.3, (i, at - times[0], times)
        samples = await scrape(admin)
        waited = value(samples, "xds_stream_admission_wait_seconds_total")
        assert waited == pytest.approx(control.admission.waited)
        # Past the burst, the i-th waited i / rate (less the time its connection took to
        # arrive after the first): 25.5 s together at most.
        most = sum(i / rate for i in range(1, count - burst + 1))
        assert 0.5 * most < waited <= most + 1e-6
        assert not await refusals(admin)


async def test_a_storm_past_the_admission_wait_is_refused(snapshot: Path):
    """With 0.1 s of waiting allowed, burst 10 at 50 a second admits about 15 of 30 (more
    if their connections arrive spread out); the rest are told to back off, not queued."""
    count = 30
    async with plane(
        snapshot, admission_burst=10, admission_rate=50.0, admission_wait=0.1
    ) as started:
        _, admin = started
        results = await first_responses(target(started), count)
        served = [r for r in results if isinstance(r, float)]
        turned_away = [r for r in results if isinstance(r, str)]
        assert 15 <= len(served) <= 22, results
        assert all("not admitted within 0.1 s" in r and "back-off" in r for r in turned_away)
        assert max(served) < 0.1 + 0.5  # the admitted waited at most admission_wait
        assert (await refusals(admin)) == {("xds", "admission_wait"): len(turned_away)}


# ---------------------------------------------------------------------------- age


async def test_max_connection_age_recycles_an_idle_connection(snapshot: Path):
    """Age 1 s (±10 % jitter), grace 0.5 s: an idle stream ends with UNAVAILABLE no later
    than 1.1 + 0.5 s (plus slack), and the client reconnecting is served again."""
    age, grace, slack = 1.0, 0.5, 0.6
    async with plane(snapshot, max_connection_age=age, max_connection_age_grace=grace) as started:
        control, _ = started
        async with grpc.aio.insecure_channel(target(started)) as channel:
            idle = Ads(channel, "idle")
            opened = time.monotonic()
            await idle.subscribe()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await idle.recv(timeout=1.1 * age + grace + slack)
            lived = time.monotonic() - opened
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
            assert 0.9 * age + grace - 0.1 <= lived <= 1.1 * age + grace + slack, lived

            again = Ads(channel, "idle")  # the channel reconnects on its own
            assert names_of(await again.subscribe()) == [POOL]
            await until(lambda: [c.node_id for c in control.registry] == ["idle"])
            again.call.cancel()


# ---------------------------------------------------------------------------- LRS


async def test_lrs_streams_per_node(snapshot: Path):
    """A reporter is its peer plus node.id: past max_streams_per_node streams the next is
    refused, another node from the same address is not, and a closed slot is reusable."""
    async with plane(snapshot) as started:
        control, admin = started
        most = control.lrs.max_streams_per_node
        async with grpc.aio.insecure_channel(target(started)) as channel:
            held = [LrsClient(channel, "envoy-1", "edge") for _ in range(most)]
            for reporter in held:
                await reporter.send()
                await reporter.recv()
            over = LrsClient(channel, "envoy-1", "edge")
            await over.send()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await over.recv()
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"already has {most} LRS streams" in (raised.value.details() or "")

            other = LrsClient(channel, "envoy-2", "edge")
            await other.send()
            assert list((await other.recv()).clusters) == [POOL]
            held[0].call.cancel()
            await until(lambda: control.lrs.connected_reporters == most)
            again = LrsClient(channel, "envoy-1", "edge")
            await again.send()
            await again.recv()
            assert control.lrs.connected_reporters == most + 1
            assert (await refusals(admin))[("lrs", "streams_per_node")] == 1
            for reporter in (*held[1:], other, again):
                reporter.call.cancel()


async def test_lrs_flooding_reporter_is_dropped_then_closed(snapshot: Path):
    """A reporter asked for one report a second sends one every 10 ms: past its burst the
    reports are dropped unparsed and, after MAX_EARLY in a row, its stream is closed; an
    honest reporter on another stream is merged all along."""
    async with plane(snapshot) as started:
        control, admin = started
        lrs, store = control.lrs, control.store

        async with grpc.aio.insecure_channel(target(started)) as channel:
            flooder, honest = LrsClient(channel, "flood", "edge"), LrsClient(channel, "ok", "edge")
            for reporter in (flooder, honest):
                await reporter.send()
                assert (await reporter.recv()).load_reporting_interval.seconds == 1
            merged_before = store.reports
            flooded = 0

            async def flood() -> None:
                nonlocal flooded
                deadline = time.monotonic() + 3.0
                while not flooder.call.done() and time.monotonic() < deadline:
                    flooded += 1
                    stats = endpoint(A, ok=1, in_progress=100 + flooded)
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await flooder.send(report(POOL, stats))
                    await asyncio.sleep(0.01)

            flooding = asyncio.create_task(flood())
            for level in (1, 2, 3):  # within the honest reporter's burst, during the flood
                await honest.send(report(POOL, endpoint(B, ok=1, in_progress=level)))
                await until(lambda want=level: in_progress(control, B) == want, timeout=2.0)
                assert not flooding.done()
            await flooding
            assert await flooder.call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "honour load_reporting_interval" in (await flooder.call.details())

            flooder_merged = store.reports - merged_before - 3
            assert 1 <= flooder_merged <= REPORT_BURST + 1
            assert lrs.reports_early >= MAX_EARLY
            assert flooded >= lrs.reports_early + flooder_merged
            assert in_progress(control, A) == 0  # the closed reporter's level is gone

            await asyncio.sleep(0.6)  # an honest reporter's next report, on its interval
            await honest.send(report(POOL, endpoint(B, ok=1, in_progress=4)))
            await until(lambda: in_progress(control, B) == 4)
            assert lrs.connected_reporters == 1
            samples = await scrape(admin)
            assert value(samples, "xds_lrs_reports_early_total") == lrs.reports_early
            assert (await refusals(admin)) == {("lrs", "report_rate"): 1}
            honest.call.cancel()
