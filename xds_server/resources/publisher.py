"""The one path from the model to the cache.

A file reload and a weight change are two ways the served config moves; both
go through here so neither can undo the other: a reload is built with the
weights in force, and a weight change rebuilds only its pool's endpoints
(one ClusterLoadAssignment per node group that serves the pool), so only that
EDS resource gets a new version and only the clients watching it hear of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from lrs.weights.signals import PoolWeights
from xds_server.config.types import Config
from xds_server.resources.build import DEFAULT_BODY_ROUTER, cluster_load_assignment
from xds_server.resources.incremental import Rebuilder
from xds_server.xds import typeurls
from xds_server.xds.cache import ResourceCache

__all__ = ["Publisher"]

log = logging.getLogger(__name__)


class Publisher:
    """Holds the config being served and the weights over it; writes both into the cache."""

    def __init__(self, cache: ResourceCache) -> None:
        self.cache = cache
        self.config: Config | None = None
        self.weights: dict[str, PoolWeights] = {}
        #: Called with each newly served config (LRS cluster lists, the weight engine, ...).
        self.on_config: list[Callable[[Config], None]] = []
        #: Where Envoy finds the body router when the file names none (the control plane's).
        self.body_router: tuple[str, int] = DEFAULT_BODY_ROUTER
        #: Builds again only the messages an edit changed (the rest are the last ones).
        self.rebuilder = Rebuilder()

    async def publish_config(self, config: Config) -> None:
        """Serve a new config; the build runs off the event loop (large fleets take a while),
        and builds only the resources whose inputs changed (xds_server.resources.incremental)."""
        orca = {pool.name for pool in config.orca_pools}
        self.weights = {name: w for name, w in self.weights.items() if name in orca}
        weights = dict(self.weights)
        build = self.rebuilder.build_all
        messages = await asyncio.to_thread(build, config, weights, self.body_router)
        self.config = config
        self.cache.set_all(
            messages,
            lambda node_cluster: config.group_for(node_cluster).name,
            {group.name: group.identities for group in config.node_groups},
        )
        # Weights that moved while the build ran would be lost with the old resources.
        for pool, current in list(self.weights.items()):
            if weights.get(pool) is not current:
                self.publish_weights(pool, current)
        for callback in self.on_config:
            callback(config)

    def forget_weights(self, pool_name: str) -> None:
        """Serve the pool's static weights again (its weights from load are gone)."""
        if self.weights.pop(pool_name, None) is not None:
            self._send(pool_name, None)

    def publish_weights(self, pool_name: str, weights: PoolWeights) -> None:
        """Re-send one pool's endpoints with new weights to every group that serves it."""
        self.weights[pool_name] = weights
        self._send(pool_name, weights)

    def _send(self, pool_name: str, weights: PoolWeights | None) -> None:
        config = self.config
        if config is None:
            return
        try:
            pool = config.pool(pool_name)
        except KeyError:
            self.weights.pop(pool_name, None)  # the pool left the config meanwhile
            return
        assignment = cluster_load_assignment(pool, weights)
        for group in config.node_groups:
            if pool_name in group.pools:
                self.cache.update_resources(group.name, typeurls.ENDPOINT, {pool_name: assignment})
