"""The control plane and one real Envoy pointed at it, in this process.

Demos, integration tests and benchmarks all need the same pair: the plane started
first, Envoy bootstrapped at its xDS port, and every resource type ACKed before the
first request, so that traffic meets the configuration the caller wrote. Stopped in
reverse order, whatever happened in between.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xds_lab.envoy_process import EnvoyProcess
from xds_lab.lifecycle import StartStop
from xds_server.admission import ClientLimits
from xds_server.app import ControlPlane, Settings
from xds_server.bootstrap import envoy_bootstrap

#: Ports free_port has handed out in this process: each goes to one caller only.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on right now, for a listener bound later (Envoy's
    listeners and admin port).

    Between this call and that bind the port is free, so two things can take it first: a
    second caller of this function (the kernel may return a port it just returned), and a
    server binding port 0 (the plane, an upstream). So a port is never handed out twice in
    one process, and it is taken below the kernel's ephemeral range, which binding port 0
    never picks from.
    """
    low = _ephemeral_low()
    below = range(low - 10_000, low) if low > 11_024 else None
    for _ in range(200):
        wanted = random.choice(below) if below else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", wanted))
            except OSError:  # in use: try another
                continue
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port in 200 tries")


def _ephemeral_low() -> int:
    """The lowest port the kernel picks for a bind to port 0 (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: Limits that a benchmark's thousands of loopback clients stay inside: they all share one
#: address, and the product's per-peer defaults are for a fleet.
BENCH_LIMITS = ClientLimits(
    max_streams=10**9,
    max_streams_per_peer=10**9,
    admission_rate=1e9,
    admission_burst=10**9,
    max_connection_age=0,
)


def node_in_sync(plane: ControlPlane, node_id: str) -> bool:
    """The node is connected and every stream of it is answered at the current versions."""
    clients = plane.registry.by_node(node_id)
    return bool(clients) and all(c.in_sync(plane.cache.group_for(c.node_cluster)) for c in clients)


async def converge(plane: ControlPlane, node_id: str, since: int, timeout: float = 10.0) -> float:
    """Seconds until the cache moves past generation `since` and the node has answered it.

    What a caller that just edited the file waits on: first the reload, then the node.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < timeout:
        if plane.cache.generation > since and node_in_sync(plane, node_id):
            return loop.time() - started
        await asyncio.sleep(0.005)
    raise TimeoutError(
        f"node {node_id!r} did not take cache generation > {since} within {timeout} s"
    )


def one_pool_snapshot(
    listener_port: int,
    pool: Mapping[str, Any],
    listener: Mapping[str, Any] | None = None,
    route: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A snapshot document: one listener on 127.0.0.1 sending every request to `pool`.

    The shape the demo, the benchmarks and the Envoy tests serve; `listener` and `route`
    add keys to the listener and its one route (e.g. `{"timeout": 0}`).
    """
    spec = {"name": "inference", "address": "127.0.0.1", "port": listener_port, **(listener or {})}
    spec["routes"] = [{"prefix": "/", "pool": pool["name"], **(route or {})}]
    return {"listeners": [spec], "pools": [dict(pool)]}


def local_settings(snapshot: Path, **overrides: Any) -> Settings:
    """Ephemeral ports for every server of the plane (nothing collides with what runs)."""
    base: dict[str, Any] = {"xds_port": 0, "admin_port": 0, "router_port": 0}
    return Settings(snapshot=snapshot, **{**base, **overrides})


def rejections(plane: ControlPlane, node_id: str) -> list[str]:
    """Each resource type a node's clients NACKed, with its error: "type_url: message"."""
    return [
        f"{url}: {status.last_nack.message}"
        for client in plane.registry.by_node(node_id)
        for url, status in client.types.items()
        if status.last_nack is not None
    ]


class PlaneWithEnvoy(StartStop):
    """`plane` and `envoy` once started; `node_id` is the Envoy's node id.

    `bootstrap` options go to `envoy_bootstrap` (e.g. `delta=True`, `lrs=False`).
    """

    def __init__(self, settings: Settings, workdir: Path, node_id: str, **bootstrap: Any) -> None:
        self.settings = settings
        self.workdir = Path(workdir)
        self.node_id = node_id
        self.bootstrap_options = bootstrap
        self.plane = ControlPlane(settings)
        self.envoy: EnvoyProcess | None = None

    async def start(self) -> None:
        await self.plane.start()
        try:
            bootstrap = envoy_bootstrap(
                node_id=self.node_id,
                xds_port=self.plane.xds_port,
                envoy_admin_port=free_port(),
                **self.bootstrap_options,
            )
            self.envoy = EnvoyProcess(bootstrap, self.workdir)
            await self.envoy.start()
            await self.envoy.wait_ready()
            await converge(self.plane, self.node_id, 0)
            rejected = self.rejections()
            if rejected:  # converged counts a NACK as an answer; a first config must be taken
                raise RuntimeError(f"Envoy rejected its first config: {'; '.join(rejected)}")
        except BaseException:
            await self.stop()
            raise

    def rejections(self) -> list[str]:
        """Each resource type the Envoy NACKed, with its error (e.g. a listener port in use)."""
        return rejections(self.plane, self.node_id)

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        await self.plane.stop(0)
