"""Weight policies: the interface, and loading one by name from the snapshot file.

A pool names its policy: "headroom" (built in, `lrs.headroom`) or "module:Class"
for one of your own. Whatever the policy returns is checked before it can reach
Envoy, which NACKs a zero weight and would leave the cluster's old endpoints in
place (or none, see ENVOY-NOTES "Race"): a broken custom policy fails loudly here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

from lrs.contract import MAX_WEIGHT
from lrs.weights.headroom import HeadroomPolicy
from lrs.weights.params import Params, parse_params
from lrs.weights.signals import EndpointInput, PoolWeights

__all__ = ["BUILT_IN", "UINT32_MAX", "PolicyError", "WeightPolicy", "check_weights", "load_policy"]

BUILT_IN: Final = {"headroom": HeadroomPolicy}
#: Envoy's limit for the sum of weights in a locality and of locality weights (uint32).
UINT32_MAX: Final = 2**32 - 1


@runtime_checkable
class WeightPolicy(Protocol):
    """One instance per pool, called with the pool's endpoints each time weights are due.

    It may keep state between calls (averages, last weights) and must forget
    endpoints no longer passed in. `now` is monotonic seconds, the clock of
    `EndpointInput.known_since`; a policy should read no other clock, so the same
    calls give the same weights. Constructed with the pool's parameters: `Params`
    for the built-in policy, the raw `orca:` mapping for a custom one.
    """

    def compute(self, endpoints: Sequence[EndpointInput], now: float) -> PoolWeights: ...


class PolicyError(ValueError):
    """A policy that cannot be loaded, or that returned weights Envoy would reject."""


def load_policy(spec: str, params: Params | Mapping[str, Any] | None = None) -> WeightPolicy:
    """The policy `spec` names, built with `params`.

    "headroom" gets `Params` (a mapping is parsed: ParamError names the bad keys).
    "module:Class" imports the module and calls Class(params) with params as given,
    so a custom policy can define parameters of its own; its results are checked.
    Raises PolicyError with a message fit to print after the file and path.
    """
    built_in = BUILT_IN.get(spec)
    if built_in is not None:
        return built_in(params if isinstance(params, Params) else parse_params(params))
    factory = _import(spec)
    try:
        policy = factory(params)
    except Exception as exc:  # a user's constructor: any failure is a config problem
        raise PolicyError(f"{spec}({params!r}) failed: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(policy, "compute", None)):
        raise PolicyError(f"{spec} built a {type(policy).__name__} without a compute() method")
    return _Checked(spec, policy)


def _import(spec: str) -> Any:
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        choices = ", ".join(repr(name) for name in BUILT_IN)
        raise PolicyError(f"unknown policy {spec!r}; expected {choices} or 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while loading
        raise PolicyError(
            f"cannot import module {module_name!r} for policy {spec!r}: {exc}"
        ) from exc
    factory = getattr(module, attribute, None)
    if factory is None:
        raise PolicyError(f"module {module_name!r} has no attribute {attribute!r}")
    if not callable(factory):
        raise PolicyError(f"{spec} is a {type(factory).__name__}, not a class")
    return factory


class _Checked:
    """A custom policy whose every answer is checked against what Envoy accepts."""

    def __init__(self, spec: str, policy: WeightPolicy) -> None:
        self.spec = spec
        self.policy = policy

    def compute(self, endpoints: Sequence[EndpointInput], now: float) -> PoolWeights:
        result = self.policy.compute(endpoints, now)
        problem = check_weights(endpoints, result)
        if problem:
            raise PolicyError(f"policy {self.spec} returned invalid weights: {problem}")
        return result


def check_weights(endpoints: Sequence[EndpointInput], result: object) -> str:
    """What is wrong with a policy's answer for these endpoints ("" when nothing is)."""
    if not isinstance(result, PoolWeights):
        return f"expected PoolWeights, got {type(result).__name__}"
    keys = {endpoint.key for endpoint in endpoints}
    zones = {endpoint.zone for endpoint in endpoints}
    if set(result.endpoints) != keys:
        return f"endpoint keys {sorted(result.endpoints)} differ from the pool's {sorted(keys)}"
    if set(result.localities) != zones:
        return f"locality keys {sorted(result.localities)} differ from the pool's {sorted(zones)}"
    for what, weights in (("endpoint", result.endpoints), ("locality", result.localities)):
        for key, weight in weights.items():
            if type(weight) is not int or not 1 <= weight <= MAX_WEIGHT:
                return f"{what} {key!r} has weight {weight!r}; expected an integer 1..{MAX_WEIGHT}"
    if keys and result.saturated >= keys:
        return "every endpoint is in priority 1"
    if not result.saturated <= keys:
        return f"saturated keys {sorted(result.saturated - keys)} are not in the pool"
    sums: dict[tuple[str, bool], int] = {}
    for endpoint in endpoints:
        slot = (endpoint.zone, endpoint.key in result.saturated)
        sums[slot] = sums.get(slot, 0) + result.endpoints[endpoint.key]
    if max(sums.values(), default=0) > UINT32_MAX or sum(result.localities.values()) > UINT32_MAX:
        return f"weights sum past Envoy's limit {UINT32_MAX}"
    return ""
