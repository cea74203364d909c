"""The served pools as operators see them: each endpoint with its weights, state and load.

One read model for the admin API, the status page and the metrics, so the three
never disagree about what "effective weight" or "draining" means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lrs.weights.signals import PPM, EndpointLoad, PoolWeights
from xds_server.config.file_source import FileSource
from xds_server.config.state_file import OverlayState
from xds_server.config.types import Config, Endpoint, Pool
from xds_server.resources.publisher import Publisher

__all__ = ["EndpointView", "FleetView", "LoadProvider"]

#: pool name -> endpoint key -> the latest merged load of that endpoint (lrs.store).
LoadProvider = Callable[[str], Mapping[str, EndpointLoad]]


@dataclass(frozen=True, slots=True)
class EndpointView:
    """One served endpoint: what the file (or the API) says and what Envoy is told."""

    endpoint: Endpoint
    origin: str  # "file" | "kubernetes" | "api"
    effective_weight: int
    saturated: bool
    load: EndpointLoad | None
    explain: Mapping[str, object] | None  # the weight engine's reasons for this weight

    @property
    def state(self) -> str:
        return "draining" if self.endpoint.draining else "active"

    def to_json(self) -> dict[str, Any]:
        e = self.endpoint
        return {
            "key": e.key,
            "address": e.address,
            "port": e.port,
            "zone": e.zone,
            "origin": self.origin,
            "state": self.state,
            "static_weight": e.weight,
            "effective_weight": self.effective_weight,
            "saturated": self.saturated,
            "load": None if self.load is None else asdict(self.load),
            "explain": None if self.explain is None else dict(self.explain),
        }


class FleetView:
    """Reads the live state; holds none. `loads` is None until LRS is wired (no load data)."""

    def __init__(
        self,
        publisher: Publisher,
        source: FileSource,
        overlay: OverlayState,
        loads: LoadProvider | None = None,
    ) -> None:
        self.publisher = publisher
        self.source = source
        self.overlay = overlay
        self.loads = loads
        #: With --kubernetes: the file's config with its Kubernetes pools filled in.
        self.fill: Callable[[Config], Config] | None = None

    def pools(self) -> tuple[Pool, ...]:
        """The pools as served (file plus overlay)."""
        config = self.publisher.config
        return config.pools if config is not None else ()

    def pool(self, name: str) -> Pool | None:
        return next((p for p in self.pools() if p.name == name), None)

    def in_file(self, pool: str) -> set[str]:
        """Keys of the endpoints the file itself defines for the pool (for a Kubernetes
        pool, those the cluster gives it: the API hides them rather than forgetting them)."""
        config = self.source.config
        if config is None:
            return set()
        if self.fill is not None:
            config = self.fill(config)
        found = next((p for p in config.pools if p.name == pool), None)
        return {e.key for e in found.endpoints} if found is not None else set()

    def weights(self, pool: str) -> PoolWeights | None:
        """The weight engine's current weights for the pool, if it weights this pool."""
        return self.publisher.weights.get(pool)

    def endpoints(self, pool: Pool) -> list[EndpointView]:
        weights = self.weights(pool.name)
        effective = weights.endpoints if weights is not None else {}
        saturated = weights.saturated if weights is not None else frozenset()
        explain = weights.explain if weights is not None else {}
        loads = self.loads(pool.name) if self.loads is not None else {}
        in_file = self.in_file(pool.name)
        return [
            EndpointView(
                endpoint=e,
                origin=("kubernetes" if pool.kubernetes else "file") if e.key in in_file else "api",
                effective_weight=effective.get(e.key, e.weight),
                saturated=e.key in saturated,
                load=loads.get(e.key),
                explain=explain.get(e.key),
            )
            for e in pool.endpoints
        ]

    def pool_json(self, pool: Pool) -> dict[str, Any]:
        """A pool's summary, with the node groups it is served to."""
        config = self.publisher.config
        groups = [g.name for g in config.node_groups if pool.name in g.pools] if config else []
        draining = sum(e.draining for e in pool.endpoints)
        return {
            "name": pool.name,
            "lb_policy": pool.lb_policy,
            "weighting": pool.weighting,
            "node_groups": groups,
            "endpoints": len(pool.endpoints),
            "active": len(pool.endpoints) - draining,
            "draining": draining,
            "load_data": self.loads is not None,
            "shedding": pool.shedding is not None,
            # The share of the pool's requests Envoy answers with 503 itself (shedding).
            "drop_fraction": self.drop_fraction(pool.name),
        }

    def drop_fraction(self, pool: str) -> float:
        """The drop fraction the weight engine set for the pool (0 when it does not shed)."""
        weights = self.weights(pool)
        return weights.drop_ppm / PPM if weights is not None else 0.0
