"""The connection to Redis: one client, its health, and the channel replicas talk on.

Every shared piece (overlay, weights, load, lease) goes through here so that "is Redis
there" has one answer: `connected` flips on the first failed command and back on the
first that succeeds, `/healthz` and metrics show it, and `on_reconnect` callbacks
resync what was missed. Events (an overlay or weight change) are published on one
channel; a listener task delivers them to the handlers by kind and reconnects with
back-off when the connection drops.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = ["RedisLink", "SharedStoreError"]

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[None]]


class SharedStoreError(OSError):
    """Redis could not take or give what was asked; the message says what and why."""


class RedisLink:
    """A redis.asyncio client under a key prefix, with health and an event channel."""

    def __init__(self, url: str, prefix: str = "xds", timeout: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        #: This process among the replicas (in the lease, in load keys, in logs).
        self.replica_id = f"{uuid.uuid4().hex[:12]}"
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=False
        )
        self.connected = False
        self.last_error = ""
        self.changed_at = time.time()
        self.failures = 0  # commands that failed because Redis was not there
        self._handlers: dict[str, Handler] = {}
        self._reconnect: list[Callable[[], Awaitable[None]]] = []
        self._listener: asyncio.Task[None] | None = None
        self._missed = False  # events may have been missed since the last resync

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def channel(self) -> str:
        return self.key("events")

    async def call(self, what: str, command: Callable[[], Awaitable[Any]]) -> Any:
        """Run one command; a connection failure marks Redis down and raises SharedStoreError."""
        try:
            result = await command()
        except (RedisError, OSError) as err:
            self._down(f"{what}: {err}")
            raise SharedStoreError(f"Redis at {self.url} is unreachable ({what}): {err}") from err
        self._up()
        return result

    async def publish(self, kind: str, payload: str) -> None:
        await self.call("publish", lambda: self.client.publish(self.channel, f"{kind} {payload}"))

    def on(self, kind: str, handler: Handler) -> None:
        """Call `handler(payload)` for every event of `kind` (from any replica, this one too)."""
        self._handlers[kind] = handler

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Resync after Redis was unreachable (events may have been missed meanwhile)."""
        self._reconnect.append(callback)

    async def start(self) -> None:
        """Connect (SharedStoreError if Redis cannot be reached) and start listening."""
        await self.call("ping", self.client.ping)
        self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        await self.client.aclose()

    def _down(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        self._missed = True
        if self.connected:
            self.connected = False
            self.changed_at = time.time()
            log.error("Redis unreachable, serving the last known state: %s", why)

    def _up(self) -> None:
        if not self.connected:
            self.connected = True
            self.changed_at = time.time()
            log.info("Redis reachable at %s", self.url)

    async def _listen(self) -> None:
        """Deliver events; on a broken connection, back off, reconnect and resync."""
        delay = 0.1
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._up()
                if self._missed:  # subscribed again: now read what changed meanwhile
                    self._missed = False
                    for callback in self._reconnect:
                        await callback()
                delay = 0.1
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    kind, _, payload = message["data"].decode().partition(" ")
                    handler = self._handlers.get(kind)
                    if handler is not None:
                        await self._deliver(handler, kind, payload)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, SharedStoreError) as err:
                self._down(f"listening: {err}")
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _deliver(self, handler: Handler, kind: str, payload: str) -> None:
        try:
            await handler(payload)
        except SharedStoreError:
            raise
        except Exception:  # one bad event must not stop the listener
            log.exception("handling a %s event failed", kind)
