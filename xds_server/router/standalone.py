"""`xds-server body-router`: the body router as its own process, following a snapshot file."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xds_server.config.file_source import FileSource
from xds_server.config.types import Config
from xds_server.grpc_server import start_grpc_server
from xds_server.router.ext_proc import BodyRouter
from xds_server.tls import ServerTls, TlsFiles

__all__ = ["StandaloneRouter"]

log = logging.getLogger(__name__)


class StandaloneRouter:
    """`xds-server body-router`: the router on its own, following a snapshot file's edits.

    For Envoys whose control plane runs elsewhere; it reads the same file the control
    plane serves, so its routes and Envoy's route table agree. `metrics_port`: serve
    its Prometheus series at http://host:port/metrics (None: not at all; 0: a free port).
    """

    def __init__(
        self,
        snapshot: Path,
        host: str,
        port: int,
        metrics_port: int | None = None,
        watch_interval: float = 0.2,
        allowed_policy_modules: tuple[str, ...] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        """`tls`: serve TLS only (mTLS with a client CA), files re-read on change."""
        self.router = BodyRouter()
        # Reloading goes the control plane's way (same validation, same watcher).
        self.source = FileSource(
            snapshot, self._follow, allowed_policy_modules=allowed_policy_modules
        )
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.watch_interval = watch_interval
        self.tls = tls
        self._server: grpc.aio.Server | None = None
        self._metrics: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def _follow(self, config: Config) -> None:
        self.router.update(config)

    async def start(self) -> None:
        """Raises SnapshotError for an invalid file, TlsFilesError for unusable TLS files and
        OSError when a port is taken."""
        tls = ServerTls(self.tls) if self.tls is not None else None
        await self.source.load(strict=True)
        self._server, self.port = await start_grpc_server(
            self.router.handlers(), self.host, self.port, tls
        )
        if self.metrics_port is not None:
            await self._serve_metrics(self.metrics_port)
            log.info("body router metrics on http://%s:%d/metrics", self.host, self.metrics_port)
        self._watcher = asyncio.create_task(self.source.watch(self.watch_interval))
        log.info("body router on %s:%d, snapshot %s", self.host, self.port, self.source.path)

    async def _serve_metrics(self, port: int) -> None:
        async def metrics(_request: web.Request) -> web.Response:
            body = generate_latest(self.router.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._metrics = web.AppRunner(app, access_log=None)
        await self._metrics.setup()
        await web.TCPSite(self._metrics, self.host, port).start()
        self.metrics_port = self._metrics.addresses[0][1]

    async def stop(self, grace: float = 1.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._metrics is not None:
            await self._metrics.cleanup()
        if self._server is not None:
            await self._server.stop(grace)
        await self.router.aclose()
