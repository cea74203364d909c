"""An Envoy bootstrapped with several control-plane replicas survives losing the one it uses.

Two ControlPlanes serve the same snapshot file, alone or as replicas sharing a real
Redis; a real Envoy 1.40 has both in its xDS cluster. The replica it is connected to
drains and stops under traffic: the Envoy reconnects to the other, is in sync again
within 2 s, and no request through it fails (Envoy keeps serving its last config while
it has no control plane).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from xds_lab.envoy_process import EnvoyProcess
from xds_lab.envoy_rig import free_port, local_settings, node_in_sync, one_pool_snapshot
from xds_lab.redis_server import RedisServer
from xds_lab.upstream import Upstream
from xds_server.app import ControlPlane
from xds_server.bootstrap import envoy_bootstrap

NODE = "envoy-failover"


@pytest.mark.envoy
@pytest.mark.parametrize("shared", [False, True], ids=["alone", "redis"])
async def test_envoy_moves_to_another_replica_without_failing_a_request(
    tmp_path: Path, shared: bool
):
    listener_port = free_port()
    redis = RedisServer(tmp_path / "redis", free_port())
    if shared:
        await redis.start()
    async with Upstream("u1") as upstream:
        pool = {"name": "p", "endpoints": [{"address": "127.0.0.1", "port": upstream.port}]}
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(one_pool_snapshot(listener_port, pool)))
        settings = {"redis": redis.url, "lease_ttl": 1.0} if shared else {}
        planes = [ControlPlane(local_settings(path, **settings)) for _ in range(2)]
        for plane in planes:
            await plane.start()
        try:
            bootstrap = envoy_bootstrap(
                node_id=NODE,
                envoy_admin_port=free_port(),
                xds_addresses=[("127.0.0.1", p.xds_port) for p in planes],
            )
            async with EnvoyProcess(bootstrap, tmp_path / "envoy") as envoy:
                await envoy.wait_ready()
                [first] = [p for p in planes if p.registry.by_node(NODE)]
                [other] = [p for p in planes if p is not first]
                failures: list[str] = []
                sent = 0

                async def traffic(until: float) -> None:
                    nonlocal sent
                    url = f"http://127.0.0.1:{listener_port}/v1/models"
                    async with aiohttp.ClientSession() as session:
                        while time.monotonic() < until:
                            async with session.get(url) as response:
                                sent += 1
                                if response.status != 200:
                                    failures.append(f"{response.status} {await response.text()}")
                            await asyncio.sleep(0.01)

                load = asyncio.create_task(traffic(time.monotonic() + 4.0))
                await asyncio.sleep(0.5)
                stopped = time.monotonic()
                await first.shutdown(drain_period=0.2)
                while not node_in_sync(other, NODE):
                    assert time.monotonic() - stopped < 2.0, "not in sync with the other replica"
                    await asyncio.sleep(0.02)
                await load
                assert sent > 100 and failures == []
        finally:
            for plane in planes:
                await plane.stop(0)
            await redis.stop()
