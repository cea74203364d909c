"""Mutating admin routes: add and remove endpoints, drain and undrain.

Every change is a new overlay (xds_server.overlay): checked against what is
served, written to the state file, and only then put in force and published
through the same path as a file reload (FileSource.publish). A refused request
raises before anything is written, so it changes nothing. Publishing is debounced:
a burst of changes (a script draining a rack) becomes one snapshot, and each
request answers once a publish that includes its change has gone out, so the
config dump read right after an answer shows the change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from aiohttp import web

from xds_server.admin.http import ApiError, json_response, read_json
from xds_server.config.file_source import FileSource
from xds_server.config.overlay import Overlay, endpoint_key
from xds_server.config.reader import parse_endpoint
from xds_server.config.state_file import OverlayState, StaleOverlay
from xds_server.config.types import UINT32_MAX, Config, Endpoint, Pool, SnapshotError
from xds_server.fleet import FleetView

__all__ = ["Coalescer", "Edit", "EditRoutes", "OverlayEditor", "PoolState"]

log = logging.getLogger(__name__)


class Coalescer:
    """Runs `action` once per burst of calls within `delay` seconds.

    Each caller returns when a run that started after its call has finished, so
    every change made before the call is in that run. Errors reach every caller.
    """

    def __init__(self, action: Callable[[], Awaitable[None]], delay: float) -> None:
        self.action = action
        self.delay = delay
        self._pending: asyncio.Future[None] | None = None  # the run not started yet
        self._latest: asyncio.Future[None] | None = None  # the last run, pending or not
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self) -> None:
        if self._pending is None:
            self._pending = self._latest = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._run(self._pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.shield(self._pending)

    async def settled(self) -> None:
        """Return once the last run (pending or running) is done; at once if there is none."""
        if self._latest is not None and not self._latest.done():
            await asyncio.shield(self._latest)

    async def _run(self, done: asyncio.Future[None]) -> None:
        await asyncio.sleep(self.delay)
        self._pending = None  # calls from now on need a later run
        try:
            await self.action()
        except Exception as err:
            done.set_exception(err)
        else:
            done.set_result(None)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


@dataclass(frozen=True, slots=True)
class PoolState:
    """One pool as an edit sees it: the file's pool and the overlay in force, so what will be
    served once pending publishes are out (not what Envoy has now: that may lag a debounce)."""

    name: str
    file: Pool | None
    overlay: Overlay

    @property
    def served(self) -> Pool | None:
        return self.overlay.pool(self.name).apply(self.file) if self.file is not None else None

    def in_file(self, key: str) -> bool:
        return self.file is not None and any(e.key == key for e in self.file.endpoints)

    def endpoint(self, key: str) -> Endpoint | None:
        served = self.served
        return next((e for e in served.endpoints if e.key == key), None) if served else None

    def require(self, key: str) -> Endpoint:
        endpoint = self.endpoint(key)
        if endpoint is None:
            raise ApiError(404, f"{key} is not served in pool {self.name!r}")
        return endpoint


Edit = Callable[[PoolState], Overlay]


#: Tries of one change against concurrent changes by other replicas.
_SAVE_ATTEMPTS = 5


class OverlayEditor:
    """Serializes API changes: check, persist, put in force, publish (debounced)."""

    def __init__(
        self,
        state: OverlayState,
        source: FileSource,
        debounce: float,
        fill: Callable[[Config], Config] | None = None,
    ) -> None:
        self.state = state
        self.source = source
        #: With --kubernetes: the file's Kubernetes pools with the cluster's endpoints.
        self.fill = fill
        self._lock = asyncio.Lock()
        self._publish = Coalescer(source.publish, debounce)

    def _pool_state(self, name: str) -> PoolState:
        config = self.source.config
        if config is not None and self.fill is not None:
            config = self.fill(config)
        file = next((p for p in config.pools if p.name == name), None) if config else None
        return PoolState(name, file, self.state.overlay)

    async def change(self, pool: str, edit: Edit) -> None:
        """Apply edit to the pool's state; ApiError (and nothing changed) if it cannot be.

        Returns once the change is served (or, for a change that changes nothing, once
        any publish still pending has gone out).
        """
        async with self._lock:
            for _ in range(_SAVE_ATTEMPTS):
                state = self._pool_state(pool)
                changed = edit(state)
                if changed == state.overlay:
                    publish = self._publish.settled()
                    break
                _check_weights(replace(state, overlay=changed))
                try:
                    await self.state.save(changed)
                except StaleOverlay:  # another replica changed it: apply ours to theirs
                    await self._reload()
                    continue
                except OSError as err:
                    log.error("admin change not saved, nothing changed: %s", err)
                    raise ApiError(503, f"cannot store the change, nothing changed: {err}") from err
                publish = self._publish()
                break
            else:
                raise ApiError(503, "the overlay kept changing under this request; retry")
        await publish

    async def _reload(self) -> None:
        try:
            await self.state.load()
        except OSError as err:
            raise ApiError(503, f"cannot read the shared overlay, nothing changed: {err}") from err

    def close(self) -> None:
        self._publish.cancel()


def _check_weights(pool: PoolState) -> None:
    """Envoy rejects a ClusterLoadAssignment whose weights sum over uint32: refuse it here."""
    served = pool.served
    total = sum(e.weight for e in served.endpoints) if served is not None else 0
    if total > UINT32_MAX:
        raise ApiError(
            409, f"pool {pool.name}: weights would sum to {total}, over Envoy's {UINT32_MAX}"
        )


def _url_key(request: web.Request) -> str:
    try:
        return endpoint_key(request.match_info["endpoint"])
    except ValueError as err:
        raise ApiError(400, str(err)) from err


def _parse_body(value: object) -> Endpoint:
    try:
        return parse_endpoint(value, "request body")
    except SnapshotError as err:
        problems = [{"path": p.path, "message": p.message} for p in err.problems]
        raise ApiError(400, "invalid endpoint: " + str(err), problems=problems) from err


class EditRoutes:
    """Handlers of the mutating routes (the token is checked before they run)."""

    def __init__(self, editor: OverlayEditor, fleet: FleetView) -> None:
        self.editor = editor
        self.fleet = fleet

    def _answer(self, pool_name: str, key: str, status: int = 200) -> web.Response:
        pool = self.fleet.pool(pool_name)
        for view in self.fleet.endpoints(pool) if pool is not None else ():
            if view.endpoint.key == key:
                return json_response(view.to_json(), status)
        return json_response({"pool": pool_name, "key": key, "state": "not served"}, status)

    async def add(self, request: web.Request) -> web.Response:
        name = request.match_info["pool"]
        endpoint = _parse_body(await read_json(request))

        def edit(pool: PoolState) -> Overlay:
            if pool.served is None:
                raise ApiError(404, f"no pool {name!r} in the snapshot file")
            if pool.endpoint(endpoint.key) is not None:
                raise ApiError(409, f"{endpoint.key} is already served in pool {name}")
            return pool.overlay.add(name, endpoint, pool.in_file(endpoint.key))

        await self.editor.change(name, edit)
        return self._answer(name, endpoint.key, 201)

    async def remove(self, request: web.Request) -> web.Response:
        name, key = request.match_info["pool"], _url_key(request)

        def edit(pool: PoolState) -> Overlay:
            changes = pool.overlay.pool(name)
            if pool.endpoint(key) is None and key not in changes.added.keys() | changes.drained:
                raise ApiError(
                    404, f"{key} is neither served in pool {name!r} nor changed by the API"
                )
            return pool.overlay.remove(name, key, pool.in_file(key))

        await self.editor.change(name, edit)
        return json_response({"pool": name, "key": key, "state": "removed"})

    async def drain(self, request: web.Request) -> web.Response:
        name, key = request.match_info["pool"], _url_key(request)

        def edit(pool: PoolState) -> Overlay:
            endpoint = pool.require(key)
            others = [e for e in pool.served.endpoints if e.key != key] if pool.served else []
            if not endpoint.draining and all(e.draining for e in others):
                raise ApiError(
                    409,
                    f"{key} is the last active endpoint of pool {name}: with every host "
                    "draining Envoy balances over all of them, so this drain would not stop "
                    "its traffic; add an endpoint first, or remove this one",
                )
            return pool.overlay.drain(name, key, True)

        await self.editor.change(name, edit)
        return self._answer(name, key)

    async def undrain(self, request: web.Request) -> web.Response:
        name, key = request.match_info["pool"], _url_key(request)

        def edit(pool: PoolState) -> Overlay:
            if key not in pool.overlay.pool(name).drained:
                pool.require(key)  # served and active already: nothing to do
            return pool.overlay.drain(name, key, False)

        await self.editor.change(name, edit)
        return self._answer(name, key)
