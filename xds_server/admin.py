"""Admin HTTP API (aiohttp, same event loop as gRPC): health, config dump, clients.

Read-only for now: what is served, to whom, and whether each client took it.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format

from xds_server import typeurls
from xds_server.cache import Resource, SnapshotCache
from xds_server.clients import ClientRegistry
from xds_server.config_source import ConfigSource

MESSAGE_TYPES = {
    typeurls.CLUSTER: cluster_pb2.Cluster,
    typeurls.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    typeurls.LISTENER: listener_pb2.Listener,
    typeurls.ROUTE: route_pb2.RouteConfiguration,
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=2))


def _resource_json(resource: Resource) -> dict[str, Any]:
    message = MESSAGE_TYPES[resource.type_url].FromString(resource.body)
    return {
        "version": resource.version,
        "resource": json_format.MessageToDict(message, preserving_proto_field_name=True),
    }


class AdminApi:
    """Routes over the live state; holds no state of its own."""

    def __init__(
        self, cache: SnapshotCache, registry: ClientRegistry, source: ConfigSource
    ) -> None:
        self.cache = cache
        self.registry = registry
        self.source = source

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/api/v1/snapshot", self.snapshot),
                web.get("/api/v1/nodes", self.nodes),
            ]
        )
        return app

    def _load_state(self) -> dict[str, Any]:
        last = self.source.last
        return {
            "file": str(self.source.path),
            "loaded_at": self.source.loaded_at,
            "reloads": self.source.reloads,
            "failures": self.source.failures,
            "last_attempt": None
            if last is None
            else {"at": last.at, "ok": last.ok, "problems": last.problems},
        }

    async def healthz(self, _request: web.Request) -> web.Response:
        return _json(
            {
                "status": "ok",
                "clients": len(self.registry),
                "generation": self.cache.generation,
                "snapshot": self._load_state(),
            }
        )

    async def snapshot(self, _request: web.Request) -> web.Response:
        groups = {
            name: {
                typeurls.SHORT_NAMES[url]: {
                    "version": snap.version,
                    "resources": {n: _resource_json(r) for n, r in sorted(snap.resources.items())},
                }
                for url, snap in group.types.items()
            }
            for name, group in self.cache.groups.items()
        }
        return _json(
            {"generation": self.cache.generation, "snapshot": self._load_state(), "groups": groups}
        )

    async def nodes(self, _request: web.Request) -> web.Response:
        return _json(
            {
                "nodes": [
                    client.to_json(self.cache.group_for(client.node_cluster))
                    for client in self.registry
                ]
            }
        )


async def start_admin(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start the admin server; returns the runner and the bound port (0 picks one)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets if site._server else []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
