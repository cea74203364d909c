"""The admin HTTP server (aiohttp, on the same event loop as gRPC): routes and middleware.

Middleware, outermost first: count the request by route and status for
/metrics; turn every error into JSON; refuse a Host not allowed (DNS rebinding);
check the bearer token on mutating routes (and on reads, with a read token).
The route table here is the whole API; /openapi.json describes exactly these
routes, and a test holds the two to each other.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from xds_server.admin.auth import require_token
from xds_server.admin.edits import EditRoutes, OverlayEditor
from xds_server.admin.hosts import check_host
from xds_server.admin.http import Handler, json_errors, json_response
from xds_server.admin.openapi import openapi_document
from xds_server.admin.page import StatusPage
from xds_server.admin.views import ReadViews
from xds_server.fleet import FleetView
from xds_server.metrics import Metrics
from xds_server.xds.cache import ResourceCache
from xds_server.xds.clients import ClientRegistry

__all__ = ["MAX_BODY", "AdminApi", "start_admin"]

#: Request bodies are one endpoint: a few hundred bytes. Anything near this is not ours.
MAX_BODY: Final = 64 * 1024


class AdminApi:
    """Builds the admin application over the live parts; keeps no state of its own."""

    def __init__(
        self,
        cache: ResourceCache,
        clients: ClientRegistry,
        fleet: FleetView,
        metrics: Metrics,
        token: str | None = None,
        debounce: float = 0.05,
        *,
        read_token: str | None = None,
        allowed_hosts: frozenset[str] | None = None,
        ready: Callable[[], bool] = lambda: True,
        replicas: Callable[[], dict[str, Any]] | None = None,
        kubernetes: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """`read_token`: reads need it (or `token`) too; `allowed_hosts`: the Host names
        answered (None: any; see hosts.allowed_hosts for the defaults); `ready`: what
        /readyz answers."""
        self.metrics = metrics
        self.token = token
        self.read_token = read_token
        self.allowed_hosts = allowed_hosts
        self.document = openapi_document(read_auth=read_token is not None)
        self.views = ReadViews(
            cache, clients, fleet, token is not None, ready, replicas, kubernetes
        )
        self.editor = OverlayEditor(fleet.overlay, fleet.source, debounce, fleet.fill)
        self.edits = EditRoutes(self.editor, fleet)

    async def app(self) -> web.Application:
        page = await StatusPage.load()
        app = web.Application(
            client_max_size=MAX_BODY,
            middlewares=[
                self._count,
                json_errors,
                check_host(self.allowed_hosts, self.metrics.admin_refused.labels("host").inc),
                require_token(
                    self.token, self.read_token, self.metrics.admin_refused.labels("token").inc
                ),
            ],
        )
        views, edits = self.views, self.edits
        endpoint = "/api/v1/pools/{pool}/endpoints/{endpoint}"
        app.add_routes(
            [
                web.get("/", page.index, allow_head=False),
                web.get("/status.js", page.script, allow_head=False),
                web.get("/healthz", views.healthz, allow_head=False),
                web.get("/readyz", views.readyz, allow_head=False),
                web.get("/metrics", self._metrics, allow_head=False),
                web.get("/openapi.json", self._openapi, allow_head=False),
                web.get("/api/v1/snapshot", views.snapshot, allow_head=False),
                web.get("/api/v1/nodes", views.nodes, allow_head=False),
                web.get("/api/v1/pools", views.pools, allow_head=False),
                web.get("/api/v1/pools/{pool}/endpoints", views.endpoints, allow_head=False),
                web.post("/api/v1/pools/{pool}/endpoints", edits.add),
                web.delete(endpoint, edits.remove),
                web.post(endpoint + "/drain", edits.drain),
                web.post(endpoint + "/undrain", edits.undrain),
                web.get("/api/v1/overlay", views.overlay_state, allow_head=False),
            ]
        )
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """xds_admin_requests_total by route pattern (bounded), method and status."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as err:
            code = err.status
            raise
        finally:
            self.metrics.admin_requests.labels(route, request.method, str(code)).inc()

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _openapi(self, _request: web.Request) -> web.Response:
        return json_response(self.document)

    def close(self) -> None:
        """Cancel a debounced publish still waiting (on shutdown)."""
        self.editor.close()


async def start_admin(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Start the admin server (HTTPS with `ssl_context`); returns the runner and the bound
    port (0 picks one)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]
