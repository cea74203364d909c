"""One replica computes weights at a time: a lease in Redis, and a fencing token.

The lease is a key holding `replica id|token`, set only if absent and with a TTL; the
holder renews it every third of the TTL. Taking it increments a counter, the fencing
token, so a replica that was paused past its lease (a GC pause, a frozen VM) and wakes up
believing it still leads holds a value that no longer matches: every write it makes is
refused by the script that checks the lease (`replicas.weights`). A leader that dies
stops renewing; another replica takes the lease within the TTL plus one attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from xds_server.replicas.link import RedisLink, SharedStoreError

__all__ = ["Lease"]

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """`holder` while this replica leads; `value` is what its fenced writes present."""

    def __init__(self, link: RedisLink, ttl: float = 3.0) -> None:
        self.link = link
        self.ttl = ttl
        self.holder = False
        self.value = ""
        self.token = 0
        self.elections = 0  # times this replica took the lease
        self.on_elected: list[Callable[[], None]] = []
        self._renew = link.client.register_script(_RENEW)
        self._release = link.client.register_script(_RELEASE)

    @property
    def key(self) -> str:
        return self.link.key("leader")

    async def run(self) -> None:
        """Take or renew the lease every third of its TTL, until cancelled."""
        while True:
            try:
                await (self._keep() if self.holder else self._take())
            except SharedStoreError:
                self._lose("Redis is unreachable")
            await asyncio.sleep(self.ttl / 3)

    async def release(self) -> None:
        """Give the lease up (a replica shutting down), so another takes it at once."""
        if self.holder:
            self.holder = False
            try:
                await self.link.call(
                    "release the lease", lambda: self._release(keys=[self.key], args=[self.value])
                )
            except SharedStoreError:
                pass  # it expires by itself

    async def _take(self) -> None:
        client = self.link.client
        token = await self.link.call("fencing token", lambda: client.incr(self.link.key("fence")))
        value = f"{self.link.replica_id}|{token}"
        ttl_ms = int(self.ttl * 1000)
        taken = await self.link.call(
            "take the lease", lambda: client.set(self.key, value, nx=True, px=ttl_ms)
        )
        if taken:
            self.holder, self.value, self.token = True, value, int(token)
            self.elections += 1
            log.info("this replica now computes weights (fencing token %d)", token)
            for callback in self.on_elected:
                callback()

    async def _keep(self) -> None:
        ttl_ms = int(self.ttl * 1000)
        kept = await self.link.call(
            "renew the lease", lambda: self._renew(keys=[self.key], args=[self.value, ttl_ms])
        )
        if not kept:
            self._lose("another replica holds the lease")

    def lose(self, why: str) -> None:
        """Step down now (a fenced write was refused)."""
        self._lose(why)

    def _lose(self, why: str) -> None:
        if self.holder:
            self.holder = False
            log.warning("this replica no longer computes weights: %s", why)
