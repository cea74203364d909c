"""Headless Chromium driven over the Chrome DevTools Protocol, with nothing but aiohttp.

No selenium or playwright browser download (the test machines are offline but for
package registries): Debian's `chromium` package, started as a child process with
`--remote-debugging-port=0`, and one websocket to its page target.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

BINARIES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


class CdpError(RuntimeError):
    """Chromium did not start, or a DevTools command failed; carries its log tail."""


class Chromium:
    """One headless Chromium process and a DevTools session on its first page."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.profile = workdir / "chromium-profile"
        self.log_path = workdir / "chromium.log"
        self.exceptions: list[dict[str, Any]] = []  # Runtime.exceptionThrown events
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            # The page runs our own local status page only; as root Chromium needs --no-sandbox.
            self._proc = subprocess.Popen(  # noqa: ASYNC220 - returns right after exec
                [
                    self.binary,
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    f"--user-data-dir={self.profile}",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._session = aiohttp.ClientSession()
        port = await self._devtools_port(timeout)
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Runtime.enable")
        await self.send("Page.enable")

    async def _devtools_port(self, timeout: float) -> int:
        """Chromium writes the port it picked into DevToolsActivePort in its profile."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise self._error(f"exited with code {self._proc.returncode}")
            if marker.exists():
                first = marker.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            await asyncio.sleep(0.05)
        raise self._error(f"no DevTools port after {timeout:g}s")

    def _error(self, what: str) -> CdpError:
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        return CdpError(f"chromium {what}; log {self.log_path}:\n{tail}")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One command; events that arrive meanwhile are kept only if they are exceptions."""
        assert self._ws is not None, "not started"
        command_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = await asyncio.wait_for(self._ws.receive(), 30)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise self._error(f"DevTools socket closed ({message.type})")
            data = json.loads(message.data)
            if data.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(data["params"]["exceptionDetails"])
            if data.get("id") == command_id:
                if "error" in data:
                    raise CdpError(f"{method}: {data['error']}")
                return data["result"]

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JS expression in the page."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"page never satisfied: {expression}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Close the session and end this Chromium (SIGTERM, then SIGKILL) by its own PID."""
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            for _ in range(100):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                proc.kill()
                await asyncio.to_thread(proc.wait)
