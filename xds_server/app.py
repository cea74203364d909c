"""The control plane process: one asyncio loop runs xDS (gRPC), the admin API and the watcher."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web

from xds_server.admin import AdminApi, start_admin
from xds_server.cache import SnapshotCache
from xds_server.clients import ClientRegistry
from xds_server.config_source import ConfigSource
from xds_server.publisher import Publisher
from xds_server.server import DiscoveryServices, start_grpc_server

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Settings:
    snapshot: Path
    host: str = "127.0.0.1"
    xds_port: int = 18000
    admin_port: int = 8080
    admin_host: str = "127.0.0.1"
    watch_interval: float = 0.2


class ControlPlane:
    """Owns every part; start() brings them up in dependency order, stop() in reverse."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = SnapshotCache()
        self.registry = ClientRegistry()
        self.publisher = Publisher(self.cache)
        self.source = ConfigSource(settings.snapshot, self.publisher)
        self.xds_port = settings.xds_port
        self.admin_port = settings.admin_port
        self._grpc: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        """Raises SnapshotError when the initial file is invalid: there is no good config yet."""
        await self.source.load(strict=True)
        services = DiscoveryServices(self.cache, self.registry)
        self._grpc, self.xds_port = await start_grpc_server(
            services.handlers(), self.settings.host, self.settings.xds_port
        )
        admin = AdminApi(self.cache, self.registry, self.source)
        self._admin, self.admin_port = await start_admin(
            admin.app(), self.settings.admin_host, self.settings.admin_port
        )
        self._watcher = asyncio.create_task(self.source.watch(self.settings.watch_interval))
        log.info(
            "serving xDS on %s:%d, admin on http://%s:%d, snapshot %s",
            self.settings.host,
            self.xds_port,
            self.settings.admin_host,
            self.admin_port,
            self.settings.snapshot,
        )

    def node_in_sync(self, node_id: str) -> bool:
        """The node is connected and every stream of it is answered at the current versions."""
        clients = self.registry.by_node(node_id)
        return bool(clients) and all(
            c.in_sync(self.cache.group_for(c.node_cluster)) for c in clients
        )

    async def converge(self, node_id: str, since: int, timeout: float = 10.0) -> float:
        """Seconds until a snapshot newer than generation `since` is answered by the node.

        What a caller that just edited the file waits on: first the reload, then the node.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < timeout:
            if self.cache.generation > since and self.node_in_sync(node_id):
                return loop.time() - started
            await asyncio.sleep(0.005)
        raise TimeoutError(
            f"node {node_id!r} did not take snapshot generation > {since} within {timeout} s"
        )

    async def stop(self, grace: float = 1.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._admin is not None:
            await self._admin.cleanup()

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
