"""Spread reporting through the real LoadReportingService over real gRPC: which clusters each
stream is asked for as streams come and go, and the store's rates scaled to the fleet."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from lrs.load_reporting_service import LoadReportingService
from lrs.load_store import LoadStore
from tests.test_lrs_service import LrsClient, Rig, until
from tests.test_lrs_store import A, endpoint, report
from xds_server.grpc_server import start_grpc_server

POOLS = ["pool-a", "pool-b"]
#: The group's pools as the config has them now (a test edits it, then reloads).
served = list(POOLS)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    store = LoadStore(window=5.0)
    store.set_known({pool: [A] for pool in POOLS})
    served[:] = POOLS
    service = LoadReportingService(
        store, lambda _: served, interval=0.5, max_interval=30.0, reporters_per_pool=1
    )
    server, port = await start_grpc_server(service.handlers(), "127.0.0.1", 0)
    rig = Rig(store, service, f"127.0.0.1:{port}")
    try:
        yield rig
    finally:
        await rig.channel.close()
        await server.stop(grace=None)


async def _connect(rig: Rig, node_id: str) -> tuple[LrsClient, list[str]]:
    client = rig.client(node_id)
    await client.send()
    return client, list((await client.recv()).clusters)


async def test_two_streams_split_the_pools_and_one_takes_all_when_the_other_leaves(rig: Rig):
    first, asked = await _connect(rig, "envoy-1")
    assert asked == POOLS  # alone: asked for everything
    second, theirs = await _connect(rig, "envoy-2")
    mine = list((await first.recv()).clusters)  # gave a pool to the newcomer
    assert (
        mine and theirs and set(mine).isdisjoint(theirs) and set(mine) | set(theirs) == set(POOLS)
    )
    third, idle = await _connect(rig, "envoy-3")
    assert idle == []  # every pool has its reporter: nothing to report ...
    assert rig.service.assignment.population("pool-a") == 3
    await first.expect_silence()  # ... and nobody else was disturbed
    await second.expect_silence()

    # The holder's rate stands for all three reporters of the pool.
    await first.send(report(mine[0], endpoint(A, ok=6, in_progress=1), interval=0.5))
    await until(lambda: A in rig.store.pool_load(mine[0], time.monotonic()))
    load = rig.store.pool_load(mine[0], time.monotonic())[A]
    assert load.rps == pytest.approx(3 * 12.0)
    assert load.in_progress == pytest.approx(3.0)

    second.call.cancel()
    handed = await third.recv()  # the idle stream is the least loaded: it takes over
    assert list(handed.clusters) == theirs
    assert handed.load_reporting_interval.ToNanoseconds() == 500_000_000
    await first.expect_silence()
    third.call.cancel()
    assert list((await first.recv()).clusters) == POOLS  # the last one reports everything


async def test_an_idle_stream_is_asked_for_the_longest_interval(rig: Rig):
    await _connect(rig, "envoy-1")
    await _connect(rig, "envoy-2")
    third = rig.client("envoy-3")
    await third.send()
    idle = await third.recv()
    assert list(idle.clusters) == []
    assert idle.load_reporting_interval.ToNanoseconds() == 30_000_000_000


async def test_a_reload_moves_only_the_pools_that_came_or_went(rig: Rig):
    first, _ = await _connect(rig, "envoy-1")
    second, theirs = await _connect(rig, "envoy-2")
    mine = list((await first.recv()).clusters)
    served[:] = mine  # the pool the second stream holds leaves the config
    rig.service.clusters_changed()
    emptied = await second.recv()
    assert list(emptied.clusters) == [] and emptied.load_reporting_interval.seconds == 30
    await first.expect_silence()  # its pool stayed: it is not disturbed
    served[:] = POOLS  # ... and comes back: to the stream carrying least
    rig.service.clusters_changed()
    assert list((await second.recv()).clusters) == theirs
    await first.expect_silence()
