"""One control plane and N real Envoys in front of the same pool, for the balancing benchmark.

The case the weights exist for: each Envoy's least request sees only the requests that Envoy
sent, while the control plane's weights come from every Envoy's load reports. Each Envoy has
its own listener port (so the load generator chooses the Envoy), given to it by a node group
of its own (`edge-<i>`, from its bootstrap's node.cluster); all of them route to one pool.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from xds_lab.envoy_process import EnvoyProcess
from xds_lab.envoy_rig import converge, free_port, local_settings, rejections
from xds_lab.lifecycle import StartStop
from xds_server.app import ControlPlane
from xds_server.bootstrap import envoy_bootstrap

__all__ = ["POOL", "PlaneWithEnvoys", "snapshot_document"]

POOL = "llama"


def snapshot_document(pool: dict[str, Any], ports: list[int]) -> dict[str, Any]:
    """A snapshot: one listener per Envoy port, each in the node group `edge-<i>`, every
    listener sending everything to `pool` without a route timeout (long generations)."""
    listeners = [
        {
            "name": f"inference-{index}",
            "address": "127.0.0.1",
            "port": port,
            "body_routing": False,
            "routes": [{"prefix": "/", "pool": pool["name"], "timeout": 0}],
        }
        for index, port in enumerate(ports)
    ]
    groups = [
        {"name": f"edge-{index}", "node_clusters": [f"edge-{index}"], "listeners": [spec["name"]]}
        for index, spec in enumerate(listeners)
    ]
    return {"listeners": listeners, "pools": [pool], "node_groups": groups}


class PlaneWithEnvoys(StartStop):
    """`plane` and `envoys` (index i serves `ports[i]`) once started; stopped in reverse."""

    def __init__(self, snapshot: Path, workdir: Path, count: int, lrs_interval: float) -> None:
        self.workdir = workdir
        self.count = count
        self.plane = ControlPlane(local_settings(snapshot, lrs_interval=lrs_interval))
        self.envoys: list[EnvoyProcess] = []

    @staticmethod
    def node_id(index: int) -> str:
        return f"bench-envoy-{index}"

    async def start(self) -> None:
        await self.plane.start()
        try:
            for index in range(self.count):
                bootstrap = envoy_bootstrap(
                    node_id=self.node_id(index),
                    node_cluster=f"edge-{index}",
                    xds_port=self.plane.xds_port,
                    envoy_admin_port=free_port(),
                )
                self.envoys.append(EnvoyProcess(bootstrap, self.workdir / f"envoy-{index}"))
            await asyncio.gather(*(envoy.start() for envoy in self.envoys))
            await asyncio.gather(*(envoy.wait_ready() for envoy in self.envoys))
            for index in range(self.count):
                await converge(self.plane, self.node_id(index), 0)
            rejected = self.rejections()
            if rejected:  # converge counts a NACK as an answer; a first config must be taken
                raise RuntimeError(f"an Envoy rejected its first config: {'; '.join(rejected)}")
        except BaseException:
            await self.stop()
            raise

    def rejections(self) -> list[str]:
        return [
            f"{self.node_id(index)} {nack}"
            for index in range(self.count)
            for nack in rejections(self.plane, self.node_id(index))
        ]

    async def host_weights(self) -> list[dict[str, Any]]:
        """Per Envoy, the weight it uses for each upstream port of the pool (admin /clusters):
        for CS-WRR the weights Envoy computed itself from ORCA, else the ones we pushed. A
        record, not a measurement: an Envoy too busy to answer gets `{"error": ...}`."""
        found: list[dict[str, Any]] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for envoy in self.envoys:
                try:
                    async with session.get(f"{envoy.admin_url}/clusters?format=json") as resp:
                        doc = await resp.json()
                except (aiohttp.ClientError, TimeoutError) as err:
                    found.append({"error": repr(err)})
                    continue
                weights = {}
                for cluster in doc.get("cluster_statuses", []):
                    if cluster.get("name") != POOL:
                        continue
                    for host in cluster.get("host_statuses", []):
                        port = host["address"]["socket_address"]["port_value"]
                        weights[str(port)] = int(host.get("weight", 1))
                found.append(weights)
        return found

    async def stop(self) -> None:
        await asyncio.gather(*(envoy.stop() for envoy in self.envoys), return_exceptions=True)
        await self.plane.stop(0)
