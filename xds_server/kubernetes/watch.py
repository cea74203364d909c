"""One collection kept in step with the API server: list, then watch, done right.

A `Collection` lists the objects (of one resource, in one namespace, under one label
selector), then watches from the list's resourceVersion with `allowWatchBookmarks=true`:

* ADDED/MODIFIED/DELETED change the objects; every event and every BOOKMARK advances the
  resourceVersion, so a watch that ends (the server's timeout, a dropped connection, a load
  balancer) resumes from there without a list;
* 410 Gone, as the HTTP status of the watch or as an ERROR event with code 410 (the server's
  history has moved past our resourceVersion): list again, and replace the objects with the
  list's in one step, so no object is lost or doubled across the re-list and what the
  control plane serves goes from the old complete state to the new one;
* any other failure (the API server away, 5xx, a stream silent past its read timeout):
  back-off with full jitter (0.2 s doubling to 30 s), and the objects stay as last known:
  the endpoints keep serving, never emptied because a watch broke.

`on_change` is called after each change of the objects (the source debounces).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from xds_server.kubernetes.client import ApiClient, ApiError, Resource

__all__ = ["Collection", "WatchTiming"]

log = logging.getLogger(__name__)

GONE: Final = 410


@dataclass(frozen=True, slots=True)
class WatchTiming:
    """`timeout`: the watch's server-side timeoutSeconds is drawn from this range (as
    client-go does, so that watches do not all renew at once); a stream silent for
    `timeout + read_slack` seconds is taken as broken. `backoff`: first and longest pause
    after a failure (full jitter)."""

    timeout: tuple[float, float] = (240.0, 360.0)
    read_slack: float = 30.0
    backoff: tuple[float, float] = (0.2, 30.0)


class Collection:
    """The objects of one (resource, namespace, selector), by name; `run()` keeps them."""

    def __init__(
        self,
        client: ApiClient,
        resource: Resource,
        namespace: str,
        selector: str,
        on_change: Callable[[Collection], None],
        timing: WatchTiming | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.selector = selector
        self.on_change = on_change
        self.timing = timing or WatchTiming()
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version = ""
        self.synced = False  # listed at least once: `objects` is the cluster's
        self.connected = False  # the latest list or watch request got an answer
        self.errors = 0  # failed lists and watches
        self.relists = 0  # lists after a 410 Gone
        self.events: Counter[str] = Counter()  # watch events by type
        self.last_error: str | None = None
        self.changed_at = 0.0
        self._failures = 0  # in a row, for the back-off

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.resource.plural, self.namespace, self.selector)

    def describe(self) -> dict[str, Any]:
        return {
            "resource": self.resource.plural,
            "namespace": self.namespace,
            "selector": self.selector,
            "synced": self.synced,
            "connected": self.connected,
            "objects": len(self.objects),
            "resource_version": self.resource_version,
            "errors": self.errors,
            "relists": self.relists,
            "last_error": self.last_error,
        }

    async def run(self) -> None:
        """List, watch, re-list on 410, back off on errors; until cancelled."""
        must_list = True
        while True:
            try:
                if must_list:
                    await self._list()
                    must_list = False
                gone = await self._watch()
                if gone:
                    self.relists += 1
                    must_list = True
            except asyncio.CancelledError:
                raise
            except ApiError as err:
                if err.code == GONE:
                    self.relists += 1
                    must_list = True
                    continue
                await self._failed(err)
            except Exception as err:  # connection refused, reset, read timeout, bad JSON
                await self._failed(err)

    async def _failed(self, err: BaseException) -> None:
        self.connected = False
        self.errors += 1
        self._failures += 1
        self.last_error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        first, longest = self.timing.backoff
        pause = random.uniform(0, min(longest, first * 2 ** (self._failures - 1)))
        log.warning(
            "kubernetes %s in %s (%s): %s; serving the last known objects, retrying in %.1f s",
            self.resource.plural,
            self.namespace,
            self.selector or "all",
            self.last_error,
            pause,
        )
        await asyncio.sleep(pause)

    async def _list(self) -> None:
        params = {"labelSelector": self.selector} if self.selector else {}
        body = await self.client.get(self.resource.path(self.namespace), params)
        self.connected = True
        self._failures = 0
        items = body.get("items") or []
        objects = {item["metadata"]["name"]: item for item in items}
        self.resource_version = str(body["metadata"]["resourceVersion"])
        first = not self.synced
        changed = objects != self.objects
        self.objects = objects  # one step: the old complete state, then the new one
        self.synced = True
        if changed or first:
            self._changed()

    async def _watch(self) -> bool:
        """Watch until the stream ends; True when the resourceVersion is gone (410)."""
        low, high = self.timing.timeout
        timeout = round(random.uniform(low, high))
        params = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.resource_version,
            "timeoutSeconds": str(timeout),
        }
        if self.selector:
            params["labelSelector"] = self.selector
        stream = self.client.watch(
            self.resource.path(self.namespace), params, timeout + self.timing.read_slack
        )
        started, seen = time.monotonic(), 0
        async for event in stream:
            seen += 1
            self.connected = True
            self._failures = 0
            kind = str(event.get("type"))
            obj = event.get("object") or {}
            self.events[kind] += 1
            if kind == "ERROR":
                if obj.get("code") == GONE:
                    return True
                raise ApiError(int(obj.get("code") or 500), str(obj.get("reason")), str(obj))
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version:
                self.resource_version = str(version)
            if kind == "BOOKMARK":
                continue
            name = obj["metadata"]["name"]
            if kind == "DELETED":
                if self.objects.pop(name, None) is not None:
                    self._changed()
            elif kind in ("ADDED", "MODIFIED"):
                if self.objects.get(name) != obj:
                    self.objects[name] = obj
                    self._changed()
        self.connected = True  # a clean end (timeoutSeconds): resume from resource_version
        if not seen and time.monotonic() - started < 1.0:  # ended at once: do not spin
            await asyncio.sleep(random.uniform(0, 5 * self.timing.backoff[0]))
        return False

    def _changed(self) -> None:
        self.changed_at = time.time()
        self.on_change(self)
