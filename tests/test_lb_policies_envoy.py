"""`lb_policy: client_side_weighted_round_robin` on the real Envoy 1.40: the generated cluster is
accepted (no NACK), the route makes the servers send ORCA, and Envoy's own weights move
traffic away from a slow server without any help from our weight engine.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import aiohttp
import yaml

from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings, one_pool_snapshot
from xds_lab.simulator.model_server import ModelServer
from xds_lab.simulator.options import SimulatorConfig
from xds_server.config.types import CSWRR

NODE = "envoy-cswrr"
# Small batches so the slowed server queues within seconds; CS-WRR needs rps_fractional.
SIM = SimulatorConfig.profile("fast", max_num_seqs=4, kv_cache_tokens=4096, orca_signals="cswrr")


async def closed_loop(url: str, workers: int, seconds: float) -> collections.Counter[str]:
    """Requests served per upstream port by `workers` back-to-back clients for `seconds`."""
    served: collections.Counter[str] = collections.Counter()
    body = {"prompt": "x" * 400, "max_tokens": 24}
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                    assert "endpoint-load-metrics" not in resp.headers  # kept from the client
                    served[resp.headers["x-upstream-port"]] += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
    return served


async def test_cswrr_is_accepted_and_moves_traffic_off_a_slow_server(tmp_path: Path) -> None:
    servers = [ModelServer(SIM, name=f"sim-{i}") for i in range(3)]
    for server in servers:
        await server.start()
    servers[0].set_slowdown(6.0)
    port = free_port()
    pool = {
        "name": "llama",
        "lb_policy": CSWRR,
        "orca": {"blackout": 1, "push_interval": 0.5},
        "endpoints": [{"address": "127.0.0.1", "port": s.port} for s in servers],
    }
    snapshot = tmp_path / "snapshot.yaml"
    snapshot.write_text(yaml.safe_dump(one_pool_snapshot(port, pool)))
    pair = PlaneWithEnvoy(local_settings(snapshot), tmp_path, NODE)
    try:
        await pair.start()  # returns once every type is ACKed at the current version
        assert pair.envoy is not None
        statuses = [s for c in pair.plane.registry for s in c.types.values()]
        assert statuses and all(s.last_nack is None for s in statuses)
        dump = await pair.envoy.config_dump("dynamic_active_clusters")
        assert CSWRR in str(dump)
        url = f"http://127.0.0.1:{port}/v1/completions"
        # Blackout (1 s) and a few weight updates; round robin would keep a third on each.
        await closed_loop(url, workers=12, seconds=4.0)
        served = await closed_loop(url, workers=12, seconds=5.0)
        share = served[str(servers[0].port)] / sum(served.values())
        assert share < 0.25, served  # round robin: 1/3; ideal: 1/13
        assert all(served[str(s.port)] > 0 for s in servers[1:])
    finally:
        await pair.stop()
        for server in servers:
            await server.stop()
