"""The admin overlay (drains, added and removed endpoints) shared by every replica.

Redis holds the overlay document and a version. A change accepted by any replica is
written with a compare-and-set on that version (a Lua script: two replicas editing at
once cannot lose either edit; the loser re-reads and applies its edit again), then
announced on the event channel; every replica re-reads it and publishes its config,
within milliseconds. The caller is answered only after Redis stored it. A replica that
starts, or whose connection comes back, reads the current overlay before it serves it;
one that finds Redis empty after it returns (restarted without persistence) writes the
overlay in force back instead of lifting every drain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from xds_server.config.overlay import Overlay
from xds_server.config.state_file import OverlayState, StaleOverlay
from xds_server.replicas.link import RedisLink, SharedStoreError

__all__ = ["SharedOverlayState"]

log = logging.getLogger(__name__)

_SAVE = """
local version = tonumber(redis.call('GET', KEYS[2]) or '0')
if version ~= tonumber(ARGV[1]) then return -1 end
redis.call('SET', KEYS[1], ARGV[2])
version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], 'overlay ' .. version)
return version
"""


class SharedOverlayState(OverlayState):
    """OverlayState whose overlay lives in Redis; `on_change` publishes a changed one."""

    def __init__(self, link: RedisLink) -> None:
        super().__init__(None)
        self.link = link
        self.version = 0
        self.on_change: Callable[[], Awaitable[None]] | None = None
        self._save = link.client.register_script(_SAVE)
        link.on("overlay", self._changed)
        link.on_reconnect(self._resync)

    @property
    def _keys(self) -> list[str]:
        return [self.link.key("overlay"), self.link.key("overlay", "version"), self.link.channel]

    async def load(self) -> None:
        """Read the current overlay (SharedStoreError if Redis cannot be reached)."""
        document, version = await self.link.call(
            "read the overlay",
            lambda: self.link.client.mget(self._keys[0], self._keys[1]),
        )
        try:
            overlay = Overlay.from_json(json.loads(document)) if document else Overlay()
        except ValueError as err:
            raise SharedStoreError(f"the overlay in Redis is corrupt: {err}") from err
        mine, known = self.overlay, self.version
        self.overlay, self.version = overlay, int(version or 0)
        if self.version == 0 and known > 0 and mine != Overlay():
            # Redis came back empty (restarted without persistence): the overlay in force
            # here is the fleet's last known one. Seed it back rather than lift every drain.
            log.warning("Redis holds no overlay: writing back the one in force here")
            try:
                await self.save(mine)
            except StaleOverlay:  # another replica seeded it first: take theirs
                await self.load()

    async def save(self, overlay: Overlay) -> None:
        """Store, then put in force. StaleOverlay when another replica changed it first;
        SharedStoreError (an OSError: the admin API answers 503) when Redis is away."""
        data = json.dumps(overlay.to_json(), sort_keys=True)
        version = await self.link.call(
            "store the overlay", lambda: self._save(keys=self._keys, args=[self.version, data])
        )
        if version == -1:
            raise StaleOverlay("another replica changed the overlay first")
        self.overlay, self.version = overlay, int(version)

    async def flush_weights(self) -> None:
        """Weights are shared through Redis (replicas.weights), not written here."""

    async def _changed(self, payload: str) -> None:
        if int(payload) > self.version:
            await self._resync()

    async def _resync(self) -> None:
        before = self.version
        await self.load()
        if self.version != before and self.on_change is not None:
            log.info("overlay version %d from Redis (was %d)", self.version, before)
            await self.on_change()
