"""Endpoints from Kubernetes through a real Envoy 1.40: where the requests really go.

The local API server (xds_lab.kube_api) holds a Service's EndpointSlices and an
InferencePool with its Pods, pointing at real upstreams on 127.0.0.1 (a slice per upstream,
each with its own port named `http`). A slice endpoint that becomes ready gets traffic; a
terminating one drains (no new requests); a 410 re-list under traffic fails no request and
re-publishes nothing; with the API server gone every request is still answered.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.kube_rig import NS, TOKEN, options, until, write_kubeconfig
from xds_lab.envoy_rig import PlaneWithEnvoy, converge, free_port, local_settings
from xds_lab.kube_api import FakeKubernetes, endpoint_slice, inference_pool, pod
from xds_lab.upstream import Upstream, start_upstreams

pytestmark = pytest.mark.envoy
NODE = "envoy-k8s"


class Rig:
    def __init__(self, api: FakeKubernetes, upstreams: list[Upstream], pair: PlaneWithEnvoy):
        self.api = api
        self.upstreams = upstreams
        self.pair = pair
        self.plane = pair.plane
        self.listener_port = 0

    def slice_(self, index: int, **conditions: Any) -> dict[str, Any]:
        upstream = self.upstreams[index]
        return endpoint_slice(
            f"vllm-{index}",
            NS,
            "vllm",
            [{"ip": "127.0.0.1", "zone": f"zone-{index % 2}", **conditions}],
            [{"name": "http", "port": upstream.port}],
        )

    async def change(self, obj: dict[str, Any]) -> None:
        """Put the object and wait until Envoy has ACKed what it changes."""
        before = self.plane.cache.generation
        self.api.put(obj)
        await converge(self.plane, NODE, before)

    async def traffic(self, n: int, path: str = "/v1/completions") -> collections.Counter[int]:
        """n requests through Envoy; counts per upstream port (0 for a failed request)."""
        counts: collections.Counter[int] = collections.Counter()
        url = f"http://127.0.0.1:{self.listener_port}{path}"
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                async with session.post(url, json={}) as resp:
                    ok = resp.status == 200
                    counts[int(resp.headers["x-upstream-port"]) if ok else 0] += 1
        return counts

    def port(self, index: int) -> int:
        return self.upstreams[index].port


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    api = FakeKubernetes(token=TOKEN)
    await api.start()
    upstreams = await start_upstreams(["u0", "u1", "u2"])
    listener_port = free_port()
    doc = {
        "listeners": [
            {
                "name": "inference",
                "address": "127.0.0.1",
                "port": listener_port,
                "routes": [
                    {"prefix": "/llama", "pool": "llama"},
                    {"prefix": "/", "pool": "vllm"},
                ],
            }
        ],
        "pools": [
            {"name": "vllm", "kubernetes": {"service": "vllm", "namespace": NS, "port": "http"}},
            {"name": "llama", "kubernetes": {"inferencePool": "llama", "namespace": NS}},
        ],
    }
    snapshot = tmp_path / "snapshot.yaml"
    snapshot.write_text(yaml.safe_dump(doc))
    settings = local_settings(snapshot, kubernetes=options(write_kubeconfig(tmp_path, api)))
    pair = PlaneWithEnvoy(settings, tmp_path, NODE)
    rig = Rig(api, upstreams, pair)
    rig.listener_port = listener_port
    api.put(rig.slice_(0))
    api.put(rig.slice_(1, ready=False))  # starting: not served yet
    api.put(inference_pool("llama", NS, {"app": "llama"}, [upstreams[2].port]))
    try:
        await pair.start()
        yield rig
    finally:
        await pair.stop()
        for upstream in upstreams:
            await upstream.stop()
        await api.stop()


async def test_ready_drain_relist_and_the_api_server_going_away(rig: Rig):
    # Only the ready endpoint gets traffic; the InferencePool has no ready Pod yet.
    assert await rig.traffic(20) == {rig.port(0): 20}
    assert set(await rig.traffic(5, "/llama")) == {0}  # no healthy upstream: 503

    # A Pod becoming ready serves its InferencePool's route; a slice endpoint too.
    await rig.change(pod("llama-0", NS, {"app": "llama"}, "127.0.0.1"))
    assert await rig.traffic(10, "/llama") == {rig.port(2): 10}
    await rig.change(rig.slice_(1))
    counts = await rig.traffic(40)
    assert counts[rig.port(0)] > 0 and counts[rig.port(1)] > 0 and not counts[0], counts

    # Terminating but still serving: drains. Envoy sends it nothing new.
    await rig.change(rig.slice_(0, ready=False, serving=True, terminating=True))
    stats = await rig.pair.envoy.stats(r"^cluster\.vllm\.membership_")
    assert stats["cluster.vllm.membership_excluded"] == 1, stats
    assert await rig.traffic(30) == {rig.port(1): 30}

    # A 410 re-list while requests flow: nothing lost, nothing re-published.
    answered: collections.Counter[int] = collections.Counter()
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            answered.update(await rig.traffic(5))

    sender = asyncio.create_task(load())
    generation = rig.plane.cache.generation
    kube = rig.plane.kubernetes
    assert kube is not None
    relists = sum(kube.counts("relists").values())
    try:
        rig.api.delay = 0.2
        rig.api.drop_watches()
        await asyncio.sleep(0.05)
        rig.api.compact()
        await until(lambda: sum(kube.counts("relists").values()) >= relists + 2, what="relists")
        rig.api.delay = 0
        await until(lambda: kube.synced and kube.connected, what="watching again")
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await sender
    assert answered[rig.port(1)] > 10 and set(answered) == {rig.port(1)}, answered
    assert rig.plane.cache.generation == generation  # the same state: no push at all

    # The API server goes away: the last known endpoints keep serving every request.
    await rig.api.stop()
    await until(lambda: not kube.connected, what="the watches failing")
    assert await rig.traffic(20) == {rig.port(1): 20}
    assert await rig.traffic(5, "/llama") == {rig.port(2): 5}
    await asyncio.sleep(0.5)  # retries back off meanwhile; still nothing changes
    assert await rig.traffic(10) == {rig.port(1): 10}
    assert rig.plane.cache.generation == generation
