"""What a replica adds to a control plane: the shared overlay, load and weight table.

`ControlPlane` builds one when `--redis` is given and asks it for the parts that differ
from a single process: the overlay state (in Redis), the loads its weight engine reads
(the fleet's), and where the engine's weights go (the table, written only by the lease
holder). Started before the first config is published, so a replica serves the current
overlay and weights from its first response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lrs.weights.engine import WeightEngine
from lrs.weights.signals import EndpointLoad, PoolWeights
from xds_server.config.state_file import SavedWeights
from xds_server.replicas.leader import Lease
from xds_server.replicas.link import RedisLink
from xds_server.replicas.load import SharedLoad
from xds_server.replicas.overlay import SharedOverlayState
from xds_server.replicas.weights import SharedWeights
from xds_server.resources.publisher import Publisher

__all__ = ["Replication"]

log = logging.getLogger(__name__)


class Replication:
    """The Redis-shared parts of one replica; `engine` is attached once it exists."""

    def __init__(
        self,
        url: str,
        publisher: Publisher,
        local_loads: Callable[[str, float], Mapping[str, EndpointLoad]],
        pools: Callable[[], Iterable[str]],
        interval: float,
        prefix: str = "xds",
        lease_ttl: float = 3.0,
    ) -> None:
        self.link = RedisLink(url, prefix)
        self.overlay = SharedOverlayState(self.link)
        self.lease = Lease(self.link, lease_ttl)
        self.weights = SharedWeights(self.link, self.lease, self._serve)
        self.load = SharedLoad(self.link, local_loads, pools, interval)
        self.publisher = publisher
        self.engine: WeightEngine | None = None
        self.lease.on_elected.append(self._elected)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect and read the overlay and the weight table (SharedStoreError if Redis
        cannot be reached: a replica must not serve without them)."""
        await self.link.start()
        await self.overlay.load()
        await self.weights.load()

    def run(self) -> None:
        """The background work: the lease, the weight writer, the load exchange."""
        for work in (self.lease.run(), self.weights.run(), self.load.run()):
            self._tasks.append(asyncio.create_task(work))

    async def step_down(self) -> None:
        """Stop competing for the lease and give it up (a replica shutting down): another
        replica takes it at once, and this one cannot take it back while it drains."""
        if self._tasks:
            self._tasks[0].cancel()  # the lease loop (run() starts it first)
        await self.lease.release()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.lease.release()  # another replica takes over at once
        await self.link.close()

    def status(self) -> dict[str, Any]:
        """For /healthz: is Redis there, who leads, how many replicas share the load."""
        return {
            "url": self.link.url,
            "connected": self.link.connected,
            "since": self.link.changed_at,
            "last_error": self.link.last_error,
            "replica": self.link.replica_id,
            "leader": self.lease.holder,
            "replicas": self.load.replicas,
        }

    def _serve(self, pool: str, saved: SavedWeights) -> None:
        """A pool's weights from the table: serve them here, as every replica does."""
        self.publisher.publish_weights(pool, saved.weights)
        if self.engine is not None:
            self.engine.adopt(pool, saved.weights)

    def _elected(self) -> None:
        """Newly leading: let the engine publish its own answers on its next round."""
        if self.engine is not None:
            self.engine.forget_published()

    def publish(self, pool: str, weights: PoolWeights) -> None:
        """The engine's publish: into the table (only the lease holder writes)."""
        self.weights.publish(pool, weights)
