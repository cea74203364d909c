"""Custom weight policies for the `module:Class` plug-in tests (see tests/test_policy.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lrs.weights import EndpointInput, PoolWeights


class RequestShare:
    """Weights proportional to each endpoint's request rate, times a `boost` for one zone.

    Takes its own parameters (a raw mapping), which the built-in parser would reject.
    """

    def __init__(self, params: Mapping[str, Any] | None) -> None:
        params = params or {}
        self.boost_zone = params.get("boost_zone")
        self.boost = int(params.get("boost", 1))
        self.calls = 0

    def compute(self, endpoints: Sequence[EndpointInput], now: float) -> PoolWeights:
        self.calls += 1
        weights = {}
        for endpoint in endpoints:
            rps = endpoint.load.rps if endpoint.load is not None else 0.0
            factor = self.boost if endpoint.zone == self.boost_zone else 1
            weights[endpoint.key] = max(1, round(rps)) * factor
        zones: dict[str, int] = {}
        for endpoint in endpoints:
            zones[endpoint.zone] = zones.get(endpoint.zone, 0) + weights[endpoint.key]
        return PoolWeights(endpoints=weights, localities=zones)


class ZeroWeights:
    """Broken on purpose: weight 0, which Envoy would NACK."""

    def __init__(self, params: object) -> None:
        self.params = params

    def compute(self, endpoints: Sequence[EndpointInput], now: float) -> PoolWeights:
        return PoolWeights(
            endpoints={endpoint.key: 0 for endpoint in endpoints},
            localities={endpoint.zone: 1 for endpoint in endpoints},
        )


class NoCompute:
    """Has no compute method."""

    def __init__(self, params: object) -> None:
        self.params = params


class Picky:
    """Refuses its parameters, as a custom policy validating its own would."""

    def __init__(self, params: object) -> None:
        raise ValueError("boost must be positive")


NOT_A_CLASS = 42
