"""Simulated model servers in a child process, driven over their HTTP admin API.

A simulator times its batches with the event loop; sharing one loop with Envoy's
LRS ingest, a load generator and the control plane stretches every step, so the
fleet looks slower and fuller than its profile says. Demos and benchmarks that
measure balancing therefore run the fleet in its own processes, as a real fleet is.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

import aiohttp

from xds_lab.lifecycle import StartStop
from xds_lab.simulator.options import SimulatorConfig, to_arguments

__all__ = ["RemoteSimulator", "RemoteState", "SimulatorProcess"]

_START_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class RemoteState:
    """What `GET /admin/profile` says about a server right now."""

    running: int
    waiting: int
    kv_cache_usage: float
    slowdown: float
    speed_factor: float  # its speed relative to its profile (realistic model; legacy: 1.0)


class RemoteSimulator:
    """One server of a SimulatorProcess, seen through its HTTP API."""

    def __init__(self, name: str, port: int, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.port = port
        self._session = session

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def state(self) -> RemoteState:
        async with self._session.get(f"{self.url}/admin/profile") as response:
            view = await response.json()
        state = view["state"]
        return RemoteState(
            state["running"],
            state["waiting"],
            state["kv_cache_usage"],
            view["slowdown"],
            view["speed_factor"],
        )

    async def update(self, **changes: Any) -> None:
        """Parameter overrides and/or `slowdown`, as `POST /admin/profile` takes them."""
        async with self._session.post(f"{self.url}/admin/profile", json=changes) as response:
            if response.status != 200:
                raise ValueError(f"{self.name}: {await response.text()}")


class SimulatorProcess(StartStop):
    """`xds-lab simulate --count N` with every parameter of `config`, on ephemeral
    loopback ports."""

    def __init__(self, config: SimulatorConfig, count: int = 1) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.config = config
        self.count = count
        self.servers: list[RemoteSimulator] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", "xds_lab.cli", "simulate", "--port", "0"]
        return [*argv, "--count", str(self.count), *to_arguments(self.config)]

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        self._session = aiohttp.ClientSession()
        stdout, stderr = self._proc.stdout, self._proc.stderr
        assert stdout is not None and stderr is not None  # both piped above
        try:
            for _ in range(self.count):
                line = await asyncio.wait_for(stdout.readline(), _START_TIMEOUT_S)
                if not line:
                    problem = (await stderr.read()).decode(errors="replace").strip()
                    raise RuntimeError(f"xds-lab simulate exited: {problem}")
                # "NAME: MODEL (PROFILE) on http://HOST:PORT"
                name, _, rest = line.decode().strip().partition(": ")
                port = int(rest.rsplit(":", 1)[1])
                self.servers.append(RemoteSimulator(name, port, self._session))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5.0)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._proc = None
        if self._session is not None:
            await self._session.close()
            self._session = None
