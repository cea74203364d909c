"""drop_overloads with a real Envoy 1.40: the fraction the plane publishes is refused at the edge.

The pool sheds (`shedding:`), and the test sets the fraction itself through the publisher
(the weight engine ticks once an hour here, so nothing overwrites it): Envoy answers about
that share of requests with its own 503 (`x-envoy-drop-overload: true`, body "drop
overload"), none of them reaches an upstream, its stats count them as upstream 503s (there
is no drop counter) and it reports them over LRS under the category;
another fraction takes over, and a fraction of 0 removes the entry and every request is
served again, with the endpoints' weights unchanged throughout.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from envoy.service.load_stats.v3 import lrs_pb2

from lrs.weights.signals import PoolWeights
from xds_lab.envoy_rig import PlaneWithEnvoy, converge, free_port, local_settings, one_pool_snapshot
from xds_lab.upstream import Upstream, start_upstreams

pytestmark = pytest.mark.envoy

NODE = "envoy-shedding"
REQUESTS = 600


class Edge:
    def __init__(self, pair: PlaneWithEnvoy, upstreams: list[Upstream], port: int) -> None:
        self.pair = pair
        self.upstreams = upstreams
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        #: Per category, what the Envoy reported dropping over LRS.
        self.lrs_drops: collections.Counter[str] = collections.Counter()
        self.lrs_total_dropped = 0

    async def set_drop(self, ppm: int) -> None:
        plane = self.pair.plane
        keys = [f"127.0.0.1:{u.port}" for u in self.upstreams]
        before = plane.cache.generation
        plane.publisher.publish_weights(
            "llama", PoolWeights(dict.fromkeys(keys, 1), {"zone-a": 2}, drop_ppm=ppm)
        )
        await converge(plane, NODE, before)
        assert not self.pair.rejections()

    async def send(self, count: int) -> collections.Counter[str]:
        """`count` requests, 20 at a time: how many were served, dropped by Envoy, other."""
        outcome: collections.Counter[str] = collections.Counter()
        async with aiohttp.ClientSession() as session:

            async def one() -> None:
                async with session.post(self.url, json={"prompt": "hi"}) as resp:
                    body = await resp.text()
                    if resp.status == 200:
                        outcome["served"] += 1
                    elif resp.status == 503 and resp.headers.get("x-envoy-drop-overload"):
                        assert body == "drop overload", body
                        outcome["dropped"] += 1
                    else:
                        outcome[f"{resp.status} {body[:60]}"] += 1

            for _ in range(count // 20):
                await asyncio.gather(*(one() for _ in range(20)))
        return outcome


def _spy_on_reports(edge: Edge) -> None:
    """Read what the store ingests for the drop counts (its trimmed view keeps them as
    unknown fields, so the full message parses them back)."""
    store = edge.pair.plane.store
    ingest_steps = store.ingest_steps

    def spy(reporter: str, request: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
        full = lrs_pb2.LoadStatsRequest.FromString(request.SerializeToString())
        for stats in full.cluster_stats:
            if stats.cluster_name == "llama":
                edge.lrs_total_dropped += stats.total_dropped_requests
                for dropped in stats.dropped_requests:
                    edge.lrs_drops[dropped.category] += dropped.dropped_count
        return ingest_steps(reporter, request, *args, **kwargs)

    store.ingest_steps = spy  # type: ignore[method-assign]


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    upstreams = await start_upstreams(["a", "b"])
    port = free_port()
    pool = {
        "name": "llama",
        "weighting": "orca",
        "shedding": {"max_drop": 0.9},
        "endpoints": [
            {"address": "127.0.0.1", "port": u.port, "zone": "zone-a"} for u in upstreams
        ],
    }
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump(one_pool_snapshot(port, pool)))
    settings = local_settings(path, lrs_interval=0.2, weight_tick=3600)
    pair = PlaneWithEnvoy(settings, tmp_path, NODE)
    try:
        async with pair:
            edge = Edge(pair, upstreams, port)
            _spy_on_reports(edge)
            yield edge
    finally:
        for upstream in upstreams:
            await upstream.stop()


async def test_envoy_drops_the_published_fraction_at_the_edge_and_stops_when_it_is_removed(
    edge: Edge,
) -> None:
    assert (await edge.send(100))["served"] == 100

    await edge.set_drop(300_000)
    reached = sum(u.requests for u in edge.upstreams)
    outcome = await edge.send(REQUESTS)
    assert set(outcome) <= {"served", "dropped"}, outcome
    # 30 % of 600 is 180, with a binomial spread of about 11: 3.5 of them either way.
    assert 140 <= outcome["dropped"] <= 220, outcome
    assert sum(u.requests for u in edge.upstreams) - reached == outcome["served"]  # at the edge
    envoy = edge.pair.envoy
    assert envoy is not None
    # Envoy 1.40 has no counter of its own for them: they count as upstream 503s (no
    # upstream answered any) and not as upstream requests.
    stats = await envoy.stats(r"^cluster\.llama\.upstream_rq_(503|total)$")
    assert stats["cluster.llama.upstream_rq_503"] == outcome["dropped"], stats
    assert stats["cluster.llama.upstream_rq_total"] == 100 + outcome["served"], stats
    async with aiohttp.ClientSession() as session:
        dump_url = f"{envoy.admin_url}/config_dump?include_eds&resource=dynamic_endpoint_configs"
        async with session.get(dump_url) as resp:
            dump = await resp.text()
    # Envoy shows the fraction it applies as parts per million.
    assert '"numerator": 300000' in dump and '"category": "overload"' in dump, dump

    # LRS carries the drops per category and in total.
    async def reported() -> bool:
        return edge.lrs_total_dropped >= outcome["dropped"]

    for _ in range(50):
        if await reported():
            break
        await asyncio.sleep(0.1)
    assert edge.lrs_total_dropped == outcome["dropped"] == edge.lrs_drops["overload"]

    # A new fraction with the same weights takes effect too (Envoy 1.40 needs a host change
    # for that: the build marks the first endpoint's metadata with the fraction).
    await edge.set_drop(600_000)
    outcome = await edge.send(400)
    assert 200 <= outcome["dropped"] <= 280, outcome  # 240, spread about 10

    await edge.set_drop(0)
    assert await edge.send(200) == {"served": 200}
