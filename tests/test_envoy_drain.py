"""A drain through the admin API stops a real Envoy's traffic to that endpoint; undrain restores it.

Drained endpoints stay in the ClusterLoadAssignment with health_status DRAINING:
Envoy 1.40 flags them `eds_status_draining` and excludes them from load balancing
without counting them toward the panic threshold (two of three drained still sends
everything to the third). The test also measures drain-to-no-traffic: from the
moment the drain request is sent to the start of the last request Envoy still
sent to the endpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.admin_rig import TOKEN, Admin
from tests.test_envoy_integration import Rig, rig  # noqa: F401 - the real-Envoy rig fixture
from xds_lab.envoy_rig import converge

pytestmark = pytest.mark.envoy
NODE = "envoy-test"  # the rig's Envoy


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rig's control plane reads its admin token from the environment when it starts."""
    monkeypatch.setenv("XDS_ADMIN_TOKEN", TOKEN)


@pytest.fixture
async def admin(rig: Rig) -> AsyncIterator[Admin]:  # noqa: F811
    async with aiohttp.ClientSession() as session:
        yield Admin(session, f"http://127.0.0.1:{rig.plane.admin_port}")


async def set_drain(rig: Rig, admin: Admin, index: int, action: str = "drain") -> None:  # noqa: F811
    """Drain or undrain upstream `index`, and wait until the Envoy has ACKed the change."""
    before = rig.plane.cache.generation
    key = f"127.0.0.1:{rig.upstreams[index].port}"
    status, body = await admin.call("POST", f"/api/v1/pools/llama/endpoints/{key}/{action}")
    assert status == 200, body
    await converge(rig.plane, NODE, before)


async def test_drain_stops_traffic_and_undrain_restores_it(rig: Rig, admin: Admin):  # noqa: F811
    drained = rig.upstreams[1].port
    assert drained in await rig.traffic(30)
    await set_drain(rig, admin, 1)
    stats = await rig.envoy.stats(r"^cluster\.llama\.membership_")
    assert stats["cluster.llama.membership_excluded"] == 1, stats
    assert stats["cluster.llama.membership_healthy"] == 2, stats
    counts = await rig.traffic(90)
    assert drained not in counts and counts[0] == 0, counts
    await set_drain(rig, admin, 1, "undrain")
    assert (await rig.traffic(60))[drained] > 0


async def test_two_of_three_drained_sends_everything_to_the_third(rig: Rig, admin: Admin):  # noqa: F811
    """No panic mode: Envoy does not count DRAINING hosts as unhealthy ones."""
    await set_drain(rig, admin, 0)
    await set_drain(rig, admin, 1)
    assert await rig.traffic(60) == {rig.upstreams[2].port: 60}


async def test_drain_to_no_traffic_time(rig: Rig, admin: Admin):  # noqa: F811
    """Requests flow without pause while the drain is sent; measure when they stop arriving."""
    drained = rig.upstreams[0].port
    hits: list[tuple[float, int]] = []  # (request start, answering port; 0 for an error)
    stop = asyncio.Event()

    async def load() -> None:
        url = f"http://127.0.0.1:{rig.listener_port}/v1/completions"
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                started = time.monotonic()
                async with session.post(url, json={}) as resp:
                    ok = resp.status == 200
                    hits.append((started, int(resp.headers["x-upstream-port"]) if ok else 0))

    sender = asyncio.create_task(load())
    try:
        await asyncio.sleep(0.3)
        before = rig.plane.cache.generation
        sent = time.monotonic()
        status, _ = await admin.call(
            "POST", f"/api/v1/pools/llama/endpoints/127.0.0.1:{drained}/drain"
        )
        answered = time.monotonic()
        await converge(rig.plane, NODE, before)
        acked = time.monotonic()  # within the 5 ms converge() polls at
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await sender
    assert status == 200
    assert any(port == drained for at, port in hits if at < sent)  # it had traffic before
    last = max(at for at, port in hits if port == drained)
    after = [port for at, port in hits if at > acked]
    assert len(after) > 20 and drained not in after and 0 not in after
    print(
        f"\ndrain-to-no-traffic: {max(last - sent, 0) * 1000:.1f} ms "
        f"(API answered after {(answered - sent) * 1000:.1f} ms, "
        f"Envoy ACKed after {(acked - sent) * 1000:.1f} ms, "
        f"{len(after)} requests after the ACK, none to the drained endpoint)"
    )
    assert last - sent < 5.0
