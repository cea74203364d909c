"""A tiny real HTTP upstream, so demos and tests can watch where Envoy sends traffic.

Every answer names the upstream (header `x-upstream`, and `x-upstream-port` for callers that
key on ports) so a client on the far side of Envoy can count requests per endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from xds_lab.lifecycle import StartStop


class Upstream(StartStop):
    """An aiohttp server on host:port that answers every request with 200 and its own name.

    `headers` go on every answer too, e.g. an ORCA `endpoint-load-metrics` report.
    """

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port  # 0 until start() when ephemeral; then the real port
        self.headers = dict(headers or {})
        self.requests = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        return web.json_response(
            {"upstream": self.name, "path": request.path, "method": request.method},
            headers={**self.headers, "x-upstream": self.name, "x-upstream-port": str(self.port)},
        )


async def start_upstreams(
    names: list[str], host: str = "127.0.0.1", ports: list[int] | None = None
) -> list[Upstream]:
    """Start one upstream per name (ephemeral ports unless given); all of them or none."""
    ports = ports if ports is not None else [0] * len(names)
    if len(ports) != len(names):
        raise ValueError(f"{len(names)} names but {len(ports)} ports")
    started: list[Upstream] = []
    try:
        for name, port in zip(names, ports, strict=True):
            upstream = Upstream(name, host, port)
            await upstream.start()
            started.append(upstream)
    except BaseException:
        for upstream in started:
            await upstream.stop()
        raise
    return started
