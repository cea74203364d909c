"""The weight table: the leader writes each pool's weights, every replica serves them.

The leader's engine hands its weights here; a writer task stores them in Redis through a
script that first checks the lease (a stale leader's write is refused and it steps
down), then announces them. Every replica, the leader included, serves a pool's weights
when the announcement arrives, so all replicas send Envoy the same weights and so the
same ClusterLoadAssignment bytes and version. While Redis is unreachable nothing is
written or served anew: the weights in force stay (frozen, not reset); the latest pending
weights go out when it returns, if this replica still leads. The table also survives
restarts: a starting replica serves it before its first config goes out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from lrs.weights.signals import PoolWeights
from xds_server.config.state_file import SavedWeights
from xds_server.replicas.leader import Lease
from xds_server.replicas.link import RedisLink, SharedStoreError

__all__ = ["SharedWeights"]

log = logging.getLogger(__name__)

_WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], 'weights ' .. ARGV[2])
return 1
"""


class SharedWeights:
    """`publish` from the engine (leader only); `serve` is called with each pool's table."""

    def __init__(
        self, link: RedisLink, lease: Lease, serve: Callable[[str, SavedWeights], None]
    ) -> None:
        self.link = link
        self.lease = lease
        self.serve = serve
        self.table: dict[str, SavedWeights] = {}
        self.refused = 0  # writes refused because the lease had moved on (fencing)
        self._pending: dict[str, PoolWeights] = {}
        self._wake = asyncio.Event()
        self._write = link.client.register_script(_WRITE)
        link.on("weights", self._announced)
        link.on_reconnect(self.load)

    @property
    def key(self) -> str:
        return self.link.key("weights")

    def publish(self, pool: str, weights: PoolWeights) -> None:
        """The engine's publish: queue the pool's weights for writing, if this replica leads."""
        if self.lease.holder:
            self._pending[pool] = weights
            self._wake.set()

    async def load(self) -> None:
        """Read the whole table and serve what changed (at start, and after Redis returns)."""
        raw = await self.link.call("read the weights", lambda: self.link.client.hgetall(self.key))
        for field, value in raw.items():
            self._take(field.decode(), value)

    async def run(self) -> None:
        """Write pending weights until cancelled; failures keep them pending."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and self.lease.holder:
                pool, weights = next(iter(self._pending.items()))
                try:
                    await self._store(pool, weights)
                except SharedStoreError:
                    await asyncio.sleep(0.5)  # Redis away: the weights in force stay
                    continue
                if self._pending.get(pool) is weights:
                    del self._pending[pool]
            if not self.lease.holder:
                self._pending.clear()

    async def _store(self, pool: str, weights: PoolWeights) -> None:
        entry = json.dumps({"weights": weights.to_json(), "published_at": time.time()})
        keys = [self.lease.key, self.key, self.link.channel]
        written = await self.link.call(
            "write the weights",
            lambda: self._write(keys=keys, args=[self.lease.value, pool, entry]),
        )
        if not written:
            self.refused += 1
            self.lease.lose("a weight write was refused: the lease has moved on")

    async def _announced(self, pool: str) -> None:
        value = await self.link.call(
            "read a pool's weights", lambda: self.link.client.hget(self.key, pool)
        )
        if value is not None:
            self._take(pool, value)

    def _take(self, pool: str, value: bytes) -> None:
        try:
            entry = json.loads(value)
            saved = SavedWeights(
                PoolWeights.from_json(entry["weights"]), float(entry["published_at"])
            )
        except (ValueError, KeyError, TypeError) as err:
            log.error(
                "pool %s: unreadable weights in Redis, keeping the ones in force: %s", pool, err
            )
            return
        if self.table.get(pool) != saved:
            self.table[pool] = saved
            self.serve(pool, saved)
