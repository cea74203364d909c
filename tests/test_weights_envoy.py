"""Load-aware weights end to end: simulated model servers behind a real Envoy fed by the plane.

Envoy asks the servers for ORCA (the route adds endpoint-load-metrics-format), carries
their KV-cache and queue figures back over LRS, and the weight engine's EDS pushes move
traffic away from a server that slows down, and back when it recovers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.weights_rig import published, wait_until
from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings, one_pool_snapshot
from xds_lab.simulator.model_server import ModelServer
from xds_lab.simulator.options import SimulatorConfig
from xds_server.app import ControlPlane

pytestmark = pytest.mark.envoy

NODE = "envoy-weights"
# Small batches so a slowed server queues up within seconds under modest load.
SIM = SimulatorConfig.profile("fast", max_num_seqs=4, kv_cache_tokens=4096)


class Fleet:
    def __init__(self, plane: ControlPlane, servers: list[ModelServer], listener_port: int):
        self.plane = plane
        self.servers = servers
        self.url = f"http://127.0.0.1:{listener_port}/v1/completions"
        self.served: collections.Counter[str] = collections.Counter()
        self.errors = 0

    def key(self, server: ModelServer) -> str:
        return f"127.0.0.1:{server.port}"

    def weights(self) -> dict[str, int]:
        return published(self.plane)

    async def load(self, workers: int, stop: asyncio.Event) -> None:
        """Closed-loop clients: each sends its next request when the last one is answered."""
        body = {"prompt": "x" * 400, "max_tokens": 24}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                while not stop.is_set():
                    async with session.post(self.url, json=body) as resp:
                        await resp.read()
                        if resp.status == 200:
                            self.served[resp.headers["x-upstream-port"]] += 1
                        else:
                            self.errors += 1

            await asyncio.gather(*(worker() for _ in range(workers)))

    async def wait_for(self, predicate, timeout: float, what: str) -> float:
        return await wait_until(self.plane, predicate, timeout, what, poll=0.1)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    servers = [ModelServer(SIM, name=f"sim-{i}") for i in range(3)]
    for server in servers:
        await server.start()
    listener_port = free_port()
    pool = {
        "name": "llama",
        "weighting": "orca",
        "orca": {"blackout": 0.5, "expiry": 3, "push_interval": 0.5, "probe_after": 3},
        "endpoints": [{"address": "127.0.0.1", "port": s.port, "zone": "zone-a"} for s in servers],
    }
    doc = one_pool_snapshot(listener_port, pool)
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump(doc))
    settings = local_settings(path, lrs_interval=0.5, weight_tick=0.1)
    pair = PlaneWithEnvoy(settings, tmp_path, NODE)
    try:
        async with pair:
            yield Fleet(pair.plane, servers, listener_port)
    finally:
        for server in servers:
            await server.stop()


async def test_a_slowed_server_loses_weight_and_traffic_then_recovers(fleet: Fleet):
    slow = fleet.servers[0]
    slow_key, slow_port = fleet.key(slow), str(slow.port)
    stop = asyncio.Event()
    load = asyncio.create_task(fleet.load(workers=12, stop=stop))
    try:
        # Reports flow: every endpoint is measured and weighted.
        await fleet.wait_for(
            lambda: len(fleet.plane.store.pool_load("llama", time.monotonic())) == 3,
            timeout=10,
            what="load reports for all three endpoints",
        )
        slow.set_slowdown(6.0)

        def slow_is_light() -> bool:
            weights = fleet.weights()
            others = [w for k, w in weights.items() if k != slow_key]
            return bool(others) and weights[slow_key] * 3 < min(others)

        await fleet.wait_for(slow_is_light, timeout=15, what="the slow server's weight dropping")
        await asyncio.sleep(1.0)  # let Envoy act on the new weights before counting
        fleet.served.clear()
        await asyncio.sleep(3.0)
        share = fleet.served[slow_port] / max(1, sum(fleet.served.values()))
        assert share < 0.2, (share, fleet.served, fleet.weights())
        assert all(fleet.served[str(s.port)] > 0 for s in fleet.servers[1:])

        slow.set_slowdown(1.0)

        def recovered() -> bool:
            weights = fleet.weights()
            return weights[slow_key] * 2 >= max(weights.values())

        await fleet.wait_for(recovered, timeout=20, what="the recovered server's weight returning")
        assert fleet.errors == 0
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(load, timeout=15)


async def test_weights_go_neutral_when_reports_stop(fleet: Fleet):
    """An Envoy that stops reporting must not freeze the weights it last caused."""
    stop = asyncio.Event()
    fleet.servers[0].set_slowdown(6.0)
    load = asyncio.create_task(fleet.load(workers=12, stop=stop))
    key = fleet.key(fleet.servers[0])
    try:
        await fleet.wait_for(
            lambda: fleet.weights().get(key, 1000) * 3 < max(fleet.weights().values() or [0]),
            timeout=20,
            what="the slow server's weight dropping",
        )
    finally:
        stop.set()
        await asyncio.wait_for(load, timeout=15)
    # No traffic, no reports: after expiry every endpoint is back to one neutral weight.
    await fleet.wait_for(
        lambda: len(set(fleet.weights().values())) == 1, timeout=15, what="neutral weights"
    )
