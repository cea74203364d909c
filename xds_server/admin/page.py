"""The built-in status page: one HTML page and its script, shipped as package data.

No CDN and no build step: the page is plain JS drawing SVG, polling the JSON API,
so it works on an offline machine straight from the installed package.
"""

from __future__ import annotations

import asyncio
from importlib import resources

from aiohttp import web

__all__ = ["StatusPage"]

_FILES = {"index.html": "text/html", "status.js": "text/javascript"}


def _read_all() -> dict[str, bytes]:
    static = resources.files("xds_server").joinpath("static")
    return {name: static.joinpath(name).read_bytes() for name in _FILES}


class StatusPage:
    """Serves the page's files from memory (read once, off the event loop, at start-up)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    @classmethod
    async def load(cls) -> StatusPage:
        return cls(await asyncio.to_thread(_read_all))

    def _serve(self, name: str) -> web.Response:
        return web.Response(
            body=self.files[name],
            content_type=_FILES[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def index(self, _request: web.Request) -> web.Response:
        return self._serve("index.html")

    async def script(self, _request: web.Request) -> web.Response:
        return self._serve("status.js")
