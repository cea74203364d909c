"""What the load store hands to weight policies: one merged view per endpoint.

Kept apart from the store and the policies so a custom policy (`module:Class`)
depends on these small frozen types only, never on how reports are stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from lrs.contract import MAX_WEIGHT

__all__ = ["PPM", "EndpointInput", "EndpointLoad", "PoolWeights", "Saturation"]

#: Parts per million: the unit of a pool's drop fraction (Envoy's FractionalPercent MILLION).
PPM: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class EndpointLoad:
    """One endpoint's load over the store's recent window, merged across every reporting Envoy.

    Rates add up across reporters; metric means are weighted by how many requests
    carried the metric. `metrics` keys are the names as LRS carries them, prefix
    kept: "named_metrics.kv_cache_usage_perc", "cpu_utilization", ...
    """

    rps: float = 0.0  # requests finished per second (successful + error)
    error_rps: float = 0.0
    issued_rps: float = 0.0
    in_progress: float = 0.0  # requests in flight, summed over reporters' latest reports
    metrics: Mapping[str, float] = field(default_factory=dict)  # metric name -> mean value
    age: float = 0.0  # seconds since the freshest report that carried this endpoint
    reporters: int = 0  # Envoys whose latest report (in the window) listed this endpoint

    @classmethod
    def merge(cls, parts: Sequence[EndpointLoad]) -> EndpointLoad:
        """One endpoint's load as several stores saw it (control-plane replicas, each
        with its own Envoys): rates and levels add up, metric means are weighted by how
        many reporters each store merged, the age is the freshest."""
        if len(parts) == 1:
            return parts[0]
        sums: dict[str, list[float]] = {}
        for part in parts:
            weight = max(part.reporters, 1)
            for name, value in part.metrics.items():
                found = sums.setdefault(name, [0.0, 0.0])
                found[0] += value * weight
                found[1] += weight
        return cls(
            rps=sum(p.rps for p in parts),
            error_rps=sum(p.error_rps for p in parts),
            issued_rps=sum(p.issued_rps for p in parts),
            in_progress=sum(p.in_progress for p in parts),
            metrics={name: total / count for name, (total, count) in sums.items()},
            age=min(p.age for p in parts),
            reporters=sum(p.reporters for p in parts),
        )


@dataclass(frozen=True, slots=True)
class EndpointInput:
    """One endpoint as a policy sees it: identity, configured weight, and load if known."""

    key: str  # "address:port", as in the admin API
    zone: str
    static_weight: int
    load: EndpointLoad | None  # None: no report yet, or none fresh enough
    known_since: float  # monotonic time the endpoint entered the config (for blackout)


class _Assessed(Protocol):
    """An endpoint as a policy assessed it: smoothed pressure (1 = saturated), the request
    rate it would serve at pressure 1, and the rate it serves; None where not known."""

    @property
    def pressure(self) -> float | None: ...
    @property
    def capacity(self) -> float | None: ...
    @property
    def rps(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Saturation:
    """How close a pool as a whole is to saturation: what the shedding controller reads.

    pressure: the least pressure of the endpoints that have a signal, so >= 1 means every
    one of them is saturated (an endpoint with headroom keeps the pool below 1).
    capacity: requests per second the pool serves at pressure 1, summed over its endpoints
    (an endpoint without an estimate counts with the rate it serves now).
    """

    pressure: float
    capacity: float

    @classmethod
    def of(cls, endpoints: Iterable[_Assessed]) -> Saturation | None:
        """The pool's figures from its endpoints'; None when no endpoint has a signal."""
        pressures = []
        capacity = 0.0
        for endpoint in endpoints:
            if endpoint.pressure is not None:
                pressures.append(endpoint.pressure)
            estimate = endpoint.capacity
            capacity += estimate if estimate is not None else endpoint.rps or 0.0
        return cls(min(pressures), capacity) if pressures else None


@dataclass(frozen=True, slots=True)
class PoolWeights:
    """A policy's answer for one pool.

    endpoints: key -> weight in 1..MAX_WEIGHT for every input endpoint.
    localities: zone -> weight in 1..MAX_WEIGHT for every zone present.
    saturated: keys moved to priority 1, so Envoy spills to them only when the rest
    of the pool is unhealthy; never every endpoint of a pool.
    explain: key -> why that weight (state, bottleneck, the smoothed signals used), for
    the admin API; JSON-ready values. Left out of equality: it does not change what
    Envoy is sent.
    drop_ppm: parts per million of the pool's requests Envoy answers with 503 itself
    (drop_overloads), set by the weight engine's shedding controller (lrs.weights.shedding).
    saturation: the pool as a whole, as the policy sees it (None: the policy does not say),
    for that controller; left out of equality and JSON like `explain`.
    """

    endpoints: Mapping[str, int]
    localities: Mapping[str, int]
    saturated: frozenset[str] = frozenset()
    explain: Mapping[str, Mapping[str, object]] = field(default_factory=dict, compare=False)
    drop_ppm: int = 0
    saturation: Saturation | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """What a restarted control plane (or another replica) needs to serve these weights."""
        data: dict[str, Any] = {
            "endpoints": dict(self.endpoints),
            "localities": dict(self.localities),
            "saturated": sorted(self.saturated),
        }
        if self.drop_ppm:  # absent when not shedding: the same JSON as before shedding existed
            data["drop_ppm"] = self.drop_ppm
        return data

    @classmethod
    def from_json(cls, data: object) -> PoolWeights:
        """Parse what to_json wrote; ValueError when it is not that."""
        if not isinstance(data, dict):
            raise ValueError("expected a mapping")
        endpoints, localities = data.get("endpoints"), data.get("localities")
        saturated = data.get("saturated", [])
        drop = data.get("drop_ppm", 0)
        for name, table in (("endpoints", endpoints), ("localities", localities)):
            if not isinstance(table, dict) or not all(
                isinstance(k, str) and type(v) is int and 1 <= v <= MAX_WEIGHT
                for k, v in table.items()
            ):
                raise ValueError(f"{name}: expected names -> integer weights 1..{MAX_WEIGHT}")
        if not isinstance(saturated, list) or not all(isinstance(k, str) for k in saturated):
            raise ValueError("saturated: expected a list of endpoint keys")
        if type(drop) is not int or not 0 <= drop < PPM:
            raise ValueError(f"drop_ppm: expected an integer 0..{PPM - 1}")
        assert isinstance(endpoints, dict) and isinstance(localities, dict)
        return cls(dict(endpoints), dict(localities), frozenset(saturated), drop_ppm=drop)
