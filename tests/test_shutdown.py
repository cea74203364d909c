"""Readiness and graceful shutdown: unready first, no new streams, the open ones closed
spread over the drain period (so a fleet reconnects to other replicas gradually)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml

from tests.xds_client import SotwClient, node
from xds_lab.envoy_rig import free_port, local_settings
from xds_server.app import ControlPlane
from xds_server.xds import typeurls

SNAPSHOT = {
    "listeners": [{"name": "l", "port": 10000, "routes": [{"prefix": "/", "pool": "p"}]}],
    "pools": [{"name": "p", "endpoints": [{"address": "127.0.0.1", "port": 9000}]}],
}


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SNAPSHOT))
    return path


@pytest.fixture
async def plane(snapshot: Path) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(local_settings(snapshot))
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop(0)


async def _readyz(port: int) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
            return response.status


async def _ended_at(client: SotwClient) -> float:
    """When the server ended the client's stream (it must be UNAVAILABLE)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.recv(timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (raised.value.details() or "")
    return time.monotonic()


async def test_shutdown_turns_unready_refuses_new_streams_and_spreads_the_closes(
    plane: ControlPlane,
):
    target = f"127.0.0.1:{plane.xds_port}"
    assert await _readyz(plane.admin_port) == 200
    clients = [SotwClient(target, node(f"n{i}", "c")) for i in range(8)]
    for client in clients:
        client.request(typeurls.CLUSTER)
        await client.recv()
    started = time.monotonic()
    shutdown = asyncio.create_task(plane.shutdown(drain_period=1.5))
    await asyncio.sleep(0)
    assert not plane.ready and await _readyz(plane.admin_port) == 503
    async with SotwClient(target, node("late", "c")) as late:
        late.request(typeurls.CLUSTER)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await late.recv()
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    ends = sorted(await asyncio.gather(*(_ended_at(c) for c in clients)))
    await shutdown
    offsets = [end - started for end in ends]
    assert offsets[-1] <= 1.5 + 0.5
    assert offsets[-1] - offsets[0] >= 0.3, offsets  # spread out, not all at once
    for client in clients:
        await client.close()


def test_sigterm_drains_then_exits(snapshot: Path, tmp_path: Path):
    xds_port, admin_port = free_port(), free_port()
    command = [
        *(sys.executable, "-m", "xds_server.cli", "serve"),
        *("--snapshot", str(snapshot), "--xds-port", str(xds_port)),
        *("--admin-port", str(admin_port), "--router-port", "0", "--drain-period", "1"),
    ]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:

        async def scenario() -> float:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if await _readyz(admin_port) == 200:
                        break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "serve did not become ready"
                await asyncio.sleep(0.1)
            async with SotwClient(f"127.0.0.1:{xds_port}", node("n", "c")) as client:
                client.request(typeurls.CLUSTER)
                await client.recv()
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                await asyncio.sleep(0.05)
                try:  # unready at once (or already gone: its one stream may close first)
                    assert await _readyz(admin_port) == 503
                except aiohttp.ClientConnectionError:
                    pass
                await _ended_at(client)
                return sent

        sent = asyncio.run(scenario())
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - sent < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
