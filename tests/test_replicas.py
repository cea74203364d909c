"""Replicas that agree: control planes sharing the overlay, load and weights through a real
`redis-server` started here on a loopback port (Debian's package; .ci/run installs it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.weights_rig import A, B, llama_snapshot, report_load, served
from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings, one_pool_snapshot
from xds_lab.redis_server import RedisServer
from xds_lab.upstream import Upstream
from xds_server.app import ControlPlane

TOKEN = "replica-test-token-0123456789abcdef"


class Fleet:
    def __init__(self, folder: Path, redis: RedisServer) -> None:
        self.snapshot = llama_snapshot(folder / "s.yaml")
        self.token = folder / "token"
        self.token.write_text(TOKEN)
        self.redis = redis
        self.planes: list[ControlPlane] = []

    async def replica(self) -> ControlPlane:
        settings = local_settings(
            self.snapshot,
            redis=self.redis.url,
            lease_ttl=1.0,
            lrs_interval=0.3,
            admin_token_file=self.token,
        )
        plane = ControlPlane(settings)
        await plane.start()
        self.planes.append(plane)
        return plane

    async def stop(self, plane: ControlPlane) -> None:
        self.planes.remove(plane)
        await plane.stop(0)


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with RedisServer(tmp_path / "redis", free_port()) as server:
        yield server


@pytest.fixture
async def fleet(tmp_path: Path, redis: RedisServer) -> AsyncIterator[Fleet]:
    fleet = Fleet(tmp_path, redis)
    try:
        yield fleet
    finally:
        for plane in list(fleet.planes):
            await plane.stop(0)


async def until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.005) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        await asyncio.sleep(step)
    return time.monotonic() - started


async def admin(plane: ControlPlane, method: str, path: str) -> int:
    url = f"http://127.0.0.1:{plane.admin_port}{path}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers) as response:
            return response.status


async def test_a_drain_through_one_replica_is_served_by_every_replica(fleet: Fleet):
    first, second = await fleet.replica(), await fleet.replica()
    assert await admin(first, "POST", f"/api/v1/pools/llama/endpoints/{A}/drain") == 200
    # Acknowledged only once stored; the other replica serves it within 100 ms.
    took = await until(lambda: served(second)[1][A][1] == 3)  # HealthStatus DRAINING
    assert took < 0.1, took
    assert served(first) == served(second)
    # A replica that starts later reads the overlay before it serves.
    third = await fleet.replica()
    assert served(third)[1][A][1] == 3


async def test_one_leader_and_byte_identical_weights_from_the_fleet_wide_load(fleet: Fleet):
    first, second = await fleet.replica(), await fleet.replica()
    leaders = lambda: [p for p in fleet.planes if p.replication and p.replication.lease.holder]  # noqa: E731
    await until(lambda: len(leaders()) == 1, timeout=5)
    # Each replica hears its own Envoys, which see the servers unevenly loaded (A fuller
    # through the first replica's Envoy); both replicas serve the same table all along.
    deadline = time.monotonic() + 10
    while True:
        report_load(first, "envoy-1", 0.95, 0.05)
        report_load(second, "envoy-2", 0.7, 0.2)
        one, two = served(first), served(second)
        if one == two and one[1][B][0] > 2 * one[1][A][0]:
            break
        assert time.monotonic() < deadline, (one, two)
        await asyncio.sleep(0.2)
    # Both replicas' views include both Envoys: the fleet-wide load.
    for plane in (first, second):
        replication = plane.replication
        assert replication is not None

        def both_envoys(replication=replication) -> bool:
            report_load(first, "envoy-1", 0.9, 0.1)
            report_load(second, "envoy-2", 0.9, 0.1)
            return replication.load.loads("llama", time.monotonic())[A].reporters == 2

        await until(both_envoys, timeout=5, step=0.1)


async def test_the_leader_dies_and_another_keeps_the_weights_moving(fleet: Fleet):
    for _ in range(2):
        await fleet.replica()
    await until(lambda: any(p.replication and p.replication.lease.holder for p in fleet.planes))
    [leader] = [p for p in fleet.planes if p.replication and p.replication.lease.holder]
    [other] = [p for p in fleet.planes if p is not leader]
    await fleet.stop(leader)  # released: the other takes over at once (a crash: within the TTL)
    took = await until(lambda: other.replication is not None and other.replication.lease.holder)
    assert took < 3.0
    deadline = time.monotonic() + 10
    while True:  # weights still follow the load, now computed by the other replica
        report_load(other, "envoy-2", 0.1, 0.9)
        now = served(other)[1]
        if now[A][0] > 2 * now[B][0]:
            break
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.2)


async def test_restarting_every_replica_keeps_drains_and_weights(fleet: Fleet):
    first = await fleet.replica()
    assert await admin(first, "POST", f"/api/v1/pools/llama/endpoints/{B}/drain") == 200
    deadline = time.monotonic() + 10
    while True:
        report_load(first, "envoy-1", 0.1, 0.9)
        version, now = served(first)
        if now[A][0] > 2 * now[B][0]:
            break
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.2)
    await fleet.stop(first)
    again = await fleet.replica()
    assert served(again) == (version, now)  # same weights, same drain, same bytes


async def test_redis_going_away_freezes_weights_refuses_changes_and_resyncs(
    fleet: Fleet, redis: RedisServer, tmp_path: Path
):
    first, second = await fleet.replica(), await fleet.replica()
    assert await admin(first, "POST", f"/api/v1/pools/llama/endpoints/{B}/drain") == 200
    await until(lambda: served(second)[1][B][1] == 3)
    before = served(first)
    await redis.stop()
    await until(lambda: first.replication is not None and not first.replication.link.connected)
    # Changes are refused with 503 and nothing changes; serving goes on as it was.
    assert await admin(first, "POST", f"/api/v1/pools/llama/endpoints/{B}/undrain") == 503
    report_load(first, "envoy-1", 0.9, 0.1)
    await asyncio.sleep(0.5)
    assert served(first) == before and served(second) == before  # frozen, not reset
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{first.admin_port}/healthz") as response:
            health = await response.json()
    assert health["redis"]["connected"] is False and "Redis" in health["status"]
    await redis.start()  # an empty Redis (no persistence): replicas write their state again
    await until(lambda: first.replication is not None and first.replication.link.connected)
    await until(lambda: first.replication is not None and first.replication.overlay.version > 0)
    # The drain made before Redis went away survived its empty restart...
    assert served(first)[1][B][1] == 3 and served(second)[1][B][1] == 3
    # ...and changes go through again, to every replica.
    assert await admin(first, "POST", f"/api/v1/pools/llama/endpoints/{B}/undrain") == 200
    await until(lambda: served(second)[1][B][1] == 0)


@pytest.mark.envoy
async def test_a_drain_through_one_replica_moves_traffic_through_an_envoy_on_another(
    tmp_path: Path, redis: RedisServer
):
    """Two real upstreams, an Envoy connected to replica B only; the drain goes to A."""
    listener_port = free_port()
    async with Upstream("u1") as u1, Upstream("u2") as u2:
        pool = {
            "name": "p",
            "endpoints": [
                {"address": "127.0.0.1", "port": u1.port},
                {"address": "127.0.0.1", "port": u2.port},
            ],
        }
        path = tmp_path / "envoy-snapshot.yaml"
        path.write_text(yaml.safe_dump(one_pool_snapshot(listener_port, pool)))
        token = tmp_path / "token"
        token.write_text(TOKEN)
        settings = {"redis": redis.url, "lease_ttl": 1.0, "admin_token_file": token}
        replica_a = ControlPlane(local_settings(path, **settings))
        await replica_a.start()
        try:
            rig = PlaneWithEnvoy(local_settings(path, **settings), tmp_path, "envoy-on-b")
            async with rig, aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{listener_port}/v1/models"

                async def served_by() -> set[str]:
                    names = set()
                    for _ in range(20):
                        async with session.get(url) as response:
                            assert response.status == 200
                            names.add(response.headers["x-upstream"])
                    return names

                assert await served_by() == {"u1", "u2"}
                key = f"127.0.0.1:{u1.port}"
                assert (
                    await admin(replica_a, "POST", f"/api/v1/pools/p/endpoints/{key}/drain") == 200
                )
                deadline = time.monotonic() + 5
                while await served_by() != {"u2"}:  # Envoy on B stops sending to u1
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
        finally:
            await replica_a.stop(0)


async def test_a_crashed_leader_is_replaced_within_the_lease_time(fleet: Fleet):
    """No release: the leader just stops renewing (as a killed process does)."""
    for _ in range(2):
        await fleet.replica()
    await until(lambda: any(p.replication and p.replication.lease.holder for p in fleet.planes))
    [leader] = [p for p in fleet.planes if p.replication and p.replication.lease.holder]
    [other] = [p for p in fleet.planes if p is not leader]
    assert leader.replication is not None and other.replication is not None
    for task in leader.replication._tasks:  # its lease, writer and load exchange stop
        task.cancel()
    took = await until(lambda: other.replication is not None and other.replication.lease.holder)
    assert took < 1.0 + 1.0 / 3 + 0.5  # the TTL, one attempt, slack
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{other.admin_port}/metrics") as response:
            metrics = await response.text()
    assert "xds_replica_leader 1.0" in metrics and "xds_redis_connected 1.0" in metrics
    assert "xds_replica_elections_total 1.0" in metrics
