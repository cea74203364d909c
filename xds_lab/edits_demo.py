"""`xds-lab demo`: the whole loop on one machine, with a real Envoy.

It serves a copy of the demo snapshot (on free ports, so it never collides with
anything running), points a real Envoy at it, sends traffic, edits the file
the way an operator would, and shows where the requests went after each edit.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from xds_lab.envoy_rig import PlaneWithEnvoy, converge, free_port, local_settings
from xds_lab.upstream import Upstream
from xds_server.cli import default_snapshot

MODEL_HEADER = "x-gateway-model-name"
NODE_ID = "demo-envoy"


def say(text: str = "") -> None:
    print(text, flush=True)


class Demo:
    """One demo run: owns its temp dir, control plane, upstreams and Envoy."""

    def __init__(self, workdir: Path, requests_per_phase: int) -> None:
        self.workdir = workdir
        self.snapshot = workdir / "snapshot.yaml"
        self.requests = requests_per_phase
        self.doc: dict[str, Any] = yaml.safe_load(default_snapshot().read_text())
        self.upstreams: dict[int, Upstream] = {}
        self.rig = PlaneWithEnvoy(
            local_settings(self.snapshot, watch_interval=0.1), workdir, NODE_ID
        )
        self.plane = self.rig.plane
        self.listener_port = free_port()

    def write(self) -> None:
        """Write the document atomically, as an editor would."""
        tmp = self.snapshot.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.doc, sort_keys=False))
        tmp.replace(self.snapshot)

    async def start(self) -> None:
        listener = self.doc["listeners"][0]
        listener["port"] = self.listener_port
        pool = self.doc["pools"][0]
        for endpoint in pool["endpoints"]:
            await self.add_upstream(endpoint)
        self.write()
        await self.rig.start()
        assert self.rig.envoy is not None
        say(
            f"control plane: xDS on 127.0.0.1:{self.plane.xds_port}, "
            f"admin on http://127.0.0.1:{self.plane.admin_port}"
        )
        say(
            f"envoy:         listener on 127.0.0.1:{self.listener_port}, "
            f"admin on {self.rig.envoy.admin_url}"
        )
        say(f"snapshot:      {self.snapshot}")

    async def add_upstream(self, endpoint: dict[str, Any]) -> None:
        """Start a local upstream for an endpoint, rewriting its port to a free one."""
        upstream = Upstream("", endpoint["address"])
        await upstream.start()
        endpoint["port"] = upstream.port
        upstream.name = f"{endpoint['address']}:{upstream.port} ({endpoint.get('zone', '-')})"
        self.upstreams[upstream.port] = upstream

    async def stop(self) -> None:
        await self.rig.stop()
        for upstream in self.upstreams.values():
            await upstream.stop()

    async def traffic(self, model: str | None) -> collections.Counter[str]:
        """Send requests through Envoy; count which upstream answered each."""
        counts: collections.Counter[str] = collections.Counter()
        headers = {MODEL_HEADER: model} if model else {}
        url = f"http://127.0.0.1:{self.listener_port}/v1/completions"
        async with aiohttp.ClientSession() as session:
            for _ in range(self.requests):
                async with session.post(url, json={"prompt": "hi"}, headers=headers) as resp:
                    counts[resp.headers.get("x-upstream", f"HTTP {resp.status}")] += 1
        return counts

    async def edit(self, what: str, change: Callable[[dict[str, Any]], None]) -> None:
        say(f"\n>>> edit: {what}")
        before = self.plane.cache.generation
        change(self.doc)
        self.write()
        took = await converge(self.plane, NODE_ID, before)
        say(f"    Envoy ACKed the new config {1000 * took:.0f} ms after the file was written")


def show(title: str, counts: collections.Counter[str]) -> None:
    total = sum(counts.values()) or 1
    say(f"\n{title}")
    for name, count in sorted(counts.items()):
        bar = "#" * round(40 * count / total)
        say(f"  {name:<32} {count:>5}  {100 * count / total:5.1f}%  {bar}")


async def run_demo(requests_per_phase: int = 300) -> int:
    """Raises EnvoyNotFound when the envoy binary is missing."""
    with tempfile.TemporaryDirectory(prefix="xds-demo-") as workdir:
        demo = Demo(Path(workdir), requests_per_phase)
        try:
            await demo.start()
            model = demo.doc["listeners"][0]["routes"][0].get("model")
            show(
                f"1. {requests_per_phase} requests for model {model!r}, equal weights:",
                await demo.traffic(model),
            )

            first = demo.doc["pools"][0]["endpoints"][0]
            await demo.edit(
                f"weight of {first['address']}:{first['port']} -> 6",
                lambda d: d["pools"][0]["endpoints"][0].update(weight=6),
            )
            show("2. after the weight edit:", await demo.traffic(model))

            last = demo.doc["pools"][0]["endpoints"][-1]
            await demo.edit(
                f"remove endpoint {last['address']}:{last['port']}",
                lambda d: d["pools"][0]["endpoints"].pop(),
            )
            show("3. after removing an endpoint:", await demo.traffic(model))

            new_endpoint = {"address": "127.0.0.1", "port": 0, "zone": "zone-c"}
            await demo.add_upstream(new_endpoint)
            await demo.edit(
                "add pool 'qwen-7b' and a route for model 'qwen-7b'",
                lambda d: _add_pool(d, "qwen-7b", new_endpoint),
            )
            show("4. requests for model 'qwen-7b':", await demo.traffic("qwen-7b"))

            say("\n>>> edit: a broken file (weight 0, which Envoy would reject)")
            demo.doc["pools"][0]["endpoints"][0]["weight"] = 0
            demo.write()
            await asyncio.sleep(0.5)
            assert demo.plane.source.last is not None
            for problem in demo.plane.source.last.problems:
                say(f"    refused: {problem}")
            show("5. still serving the last good config:", await demo.traffic(model))
            say("\ndone: cleaning up")
            return 0
        finally:
            await demo.stop()


def _add_pool(doc: dict[str, Any], name: str, endpoint: dict[str, Any]) -> None:
    doc["pools"].append({"name": name, "endpoints": [endpoint]})
    doc["listeners"][0]["routes"].insert(0, {"model": name, "pool": name})
