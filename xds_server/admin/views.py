"""Read-only admin routes: health, config dump, nodes, pools, endpoints, the overlay.

Each answer is built from the live objects at request time; nothing here keeps
state, so what an operator reads is what is being served at that moment.

The config dump is built in a thread: for 2,000 endpoints it took 80-120 ms, all of
it stalling the event loop that serves xDS and LRS. It reads one version of the
cache (groups are replaced, never changed in place), so it stays consistent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format

from xds_server.admin.http import ApiError, json_response
from xds_server.config.types import Pool
from xds_server.fleet import FleetView
from xds_server.xds import typeurls
from xds_server.xds.cache import GroupResources, Resource, ResourceCache
from xds_server.xds.clients import ClientRegistry

__all__ = ["MESSAGE_TYPES", "ReadViews", "served_pool"]

MESSAGE_TYPES = {
    typeurls.CLUSTER: cluster_pb2.Cluster,
    typeurls.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    typeurls.LISTENER: listener_pb2.Listener,
    typeurls.ROUTE: route_pb2.RouteConfiguration,
}


def _resource_json(resource: Resource) -> dict[str, Any]:
    message = MESSAGE_TYPES[resource.type_url].FromString(resource.body)
    return {
        "version": resource.version,
        "resource": json_format.MessageToDict(message, preserving_proto_field_name=True),
    }


def _dump_text(head: dict[str, Any], groups: Mapping[str, GroupResources]) -> str:
    """The config dump as JSON text (blocking: tens of ms for thousands of endpoints)."""
    dump = {
        **head,
        "groups": {
            name: {
                typeurls.SHORT_NAMES[url]: {
                    "version": snap.version,
                    "resources": {n: _resource_json(r) for n, r in sorted(snap.resources.items())},
                }
                for url, snap in group.types.items()
            }
            for name, group in groups.items()
        },
    }
    return json.dumps(dump, indent=2) + "\n"


def served_pool(fleet: FleetView, request: web.Request) -> Pool:
    """The served pool named in the URL; 404 naming the pools there are."""
    name = request.match_info["pool"]
    pool = fleet.pool(name)
    if pool is None:
        known = ", ".join(p.name for p in fleet.pools()) or "none"
        raise ApiError(404, f"no pool {name!r} is served; pools: {known}")
    return pool


class ReadViews:
    """Handlers of the GET routes over the live state."""

    def __init__(
        self,
        cache: ResourceCache,
        clients: ClientRegistry,
        fleet: FleetView,
        mutations: bool,
        ready: Callable[[], bool] = lambda: True,
        replicas: Callable[[], dict[str, Any]] | None = None,
        kubernetes: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.ready = ready
        self.replicas = replicas
        self.kubernetes = kubernetes
        self.cache = cache
        self.clients = clients
        self.fleet = fleet
        self.source = fleet.source
        self.overlay = fleet.overlay
        self.mutations_enabled = mutations

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

    async def readyz(self, _request: web.Request) -> web.Response:
        """200 once the first config is served and until shutdown begins; else 503, so a
        load balancer sends Envoys only to replicas that can serve them."""
        ready = self.ready()
        return json_response({"ready": ready}, status=200 if ready else 503)

    async def healthz(self, _request: web.Request) -> web.Response:
        """Alive (200) whenever it answers; with replicas, whether Redis is reachable: a
        replica without it keeps serving the last known state, and says so here."""
        body: dict[str, Any] = {
            "status": "ok",
            "clients": len(self.clients),
            "generation": self.cache.generation,
            "snapshot": self._load_state(),
            "mutations": "token" if self.mutations_enabled else "disabled",
        }
        if self.replicas is not None:
            body["redis"] = self.replicas()
            if not body["redis"]["connected"]:
                body["status"] = "degraded: Redis unreachable, serving the last known state"
        if self.kubernetes is not None:
            body["kubernetes"] = self.kubernetes()
            if not body["kubernetes"]["connected"]:
                body["status"] = (
                    "degraded: Kubernetes API unreachable, serving the last known endpoints"
                )
        return json_response(body)

    async def snapshot(self, _request: web.Request) -> web.Response:
        head = {
            "generation": self.cache.generation,
            "snapshot": self._load_state(),
            "overlay": self.overlay.overlay.to_json(),
        }
        text = await asyncio.to_thread(_dump_text, head, self.cache.groups)
        return web.Response(text=text, content_type="application/json")

    async def nodes(self, _request: web.Request) -> web.Response:
        return json_response(
            {
                "nodes": [
                    client.to_json(self.cache.group_for(client.node_cluster))
                    for client in self.clients
                ],
                # Streams ended for claiming a group their certificate may not, or for a
                # limit: the latest 100, oldest first.
                "refused": list(self.clients.recent_refusals),
            }
        )

    async def pools(self, _request: web.Request) -> web.Response:
        return json_response(
            {
                "pools": [self.fleet.pool_json(pool) for pool in self.fleet.pools()],
                "load_data": self.fleet.loads is not None,
            }
        )

    async def endpoints(self, request: web.Request) -> web.Response:
        pool = served_pool(self.fleet, request)
        hidden = self.overlay.overlay.pool(pool.name).removed & self.fleet.in_file(pool.name)
        return json_response(
            {
                "pool": pool.name,
                "weighting": pool.weighting,
                "load_data": self.fleet.loads is not None,
                "endpoints": [view.to_json() for view in self.fleet.endpoints(pool)],
                "removed": sorted(hidden),
            }
        )

    async def overlay_state(self, _request: web.Request) -> web.Response:
        config = self.source.config
        if config is not None and self.fleet.fill is not None:
            config = self.fleet.fill(config)  # Kubernetes pools as the cluster has them
        overlay = self.overlay.overlay
        return json_response(
            {
                "state_file": str(self.overlay.path) if self.overlay.path else None,
                "overlay": overlay.to_json(),
                "inert": overlay.inert(config) if config is not None else [],
            }
        )
