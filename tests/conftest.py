"""Shared fixtures."""

from __future__ import annotations

import pytest

from xds_server.grpc_server import start_grpc_server
from xds_server.xds.cache import ResourceCache
from xds_server.xds.clients import ClientRegistry
from xds_server.xds.services import DiscoveryServices


class RunningServer:
    def __init__(self, cache: ResourceCache, registry: ClientRegistry, port: int) -> None:
        self.cache = cache
        self.registry = registry
        self.target = f"127.0.0.1:{port}"


@pytest.fixture
async def xds():
    """A discovery server on an ephemeral port over an empty cache."""
    cache = ResourceCache()
    registry = ClientRegistry()
    server, port = await start_grpc_server(
        DiscoveryServices(cache, registry).handlers(), "127.0.0.1", 0
    )
    try:
        yield RunningServer(cache, registry, port)
    finally:
        await server.stop(grace=None)
