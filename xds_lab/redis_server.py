"""A real `redis-server` (Debian's package) on a loopback port, started and stopped by PID.

Replica tests need the engine operators run, including what happens when it goes away
and comes back: `stop()` and `start()` again on the same port. No persistence: every
start is an empty Redis unless `keep` asks for the RDB file in `workdir`.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

from xds_lab.lifecycle import StartStop

__all__ = ["RedisNotFound", "RedisServer"]


class RedisNotFound(RuntimeError):
    """redis-server is not installed (apt-get install redis-server)."""


class RedisServer(StartStop):
    """`url` once started; `port` is fixed at construction so restarts keep it."""

    def __init__(self, workdir: Path, port: int, keep: bool = False) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.keep = keep
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotFound("redis-server not found: apt-get install redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        save = ["--save", "1 1", "--dbfilename", "dump.rdb"] if self.keep else ["--save", ""]
        command = [
            binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "no"),
            *("--appendonly", "no", "--dir", str(self.workdir), *save),
            *("--protected-mode", "yes", "--loglevel", "warning"),
        ]
        # Plain Popen, as for Envoy: it returns right after exec and is reaped by polling.
        with (self.workdir / "redis.log").open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.workdir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer within 10 s")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """SIGTERM the server this object started (by its PID), SIGKILL after 5 s."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
