"""Weight policy parameters: what a pool's `orca:` mapping in the snapshot file may set.

Kept apart from the policy so the snapshot parser can validate a file without
building a policy, and so a problem names its key (`kv_cache_threshold`,
`queue_metrics[1]`) for the parser to report as `pools[i].orca.<key>`.
Every problem is collected before raising: one edit-validate round fixes all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, TypeGuard

from lrs.contract import MAX_WEIGHT

__all__ = ["KEYS", "MAX_SECONDS", "SATURATED_ACTIONS", "ParamError", "Params", "parse_params"]

SATURATED_ACTIONS: Final = ("min_weight", "lower_priority")
#: Longest duration a parameter may hold (about 11.6 days): far beyond any sane window,
#: small enough that sums with monotonic timestamps stay exact in a float.
MAX_SECONDS: Final = 1_000_000.0


@dataclass(frozen=True, slots=True)
class Params:
    """How `HeadroomPolicy` turns load signals into weights; defaults suit vLLM behind Envoy.

    Metric lists are preferences: the first name a report carries is used, so one
    list serves vLLM and Triton fleets alike. An empty list turns that signal off.
    """

    #: KV-cache use as a fraction 0..1: vLLM's name, then Triton's.
    kv_cache_metrics: tuple[str, ...] = (
        "named_metrics.kv_cache_usage_perc",
        "named_metrics.kv_cache_utilization",
    )
    #: Requests waiting for a batch slot (vLLM).
    queue_metrics: tuple[str, ...] = ("named_metrics.num_requests_waiting",)
    #: ORCA utilization as Envoy's CS-WRR reads it: application_utilization, else CPU.
    utilization_metrics: tuple[str, ...] = ("application_utilization", "cpu_utilization")
    #: KV-cache fraction that counts as full (the inference gateway's 0.8).
    kv_cache_threshold: float = 0.8
    #: Waiting requests that count as full (the inference gateway's 5).
    queue_threshold: float = 5.0
    #: Requests in flight (Envoy's view) that count as full; 0 leaves the signal out.
    in_flight_threshold: float = 0.0
    #: Seconds in which a waiting queue should drain: it lowers the endpoint's weight by
    #: queue / drain_time requests per second.
    drain_time: float = 10.0
    #: gRFC A58's error_utilization_penalty: utilization += penalty * errors / requests.
    error_penalty: float = 1.0
    #: Weight of a new sample one second after the previous one (Envoy's load-aware
    #: locality uses 0.3); other spacings use 1 - (1 - alpha) ** seconds.
    ewma_alpha: float = 0.3
    #: Relative capacity change below which an endpoint keeps its published weight.
    hysteresis: float = 0.05
    #: Seconds a new (or newly reporting again) endpoint gets the neutral weight (CS-WRR: 10).
    blackout: float = 10.0
    #: Seconds after the last report at which an endpoint's load counts as unknown.
    expiry: float = 30.0
    #: Finished requests per second below which throughput says nothing about capacity.
    min_rps: float = 0.05
    #: Utilization floor in the capacity estimate: near-zero pressure under traffic is light load.
    min_utilization: float = 0.05
    #: Integer weight of the endpoint with the most capacity; others are proportional.
    weight_scale: int = 1000
    #: What happens to a saturated endpoint: keep a trickle, or move it to priority 1.
    saturated_action: str = "min_weight"
    #: A saturated endpoint's weight as a fraction of the pool's mean weight (min_weight).
    saturated_weight: float = 0.05
    #: Pressure below which a saturated endpoint returns (it entered at 1.0).
    saturation_exit: float = 0.9
    #: Seconds without a fresh signal after which a saturated endpoint comes back anyway.
    probe_after: float = 5.0
    #: Most a probe of a starved endpoint may raise its pressure (0 turns probing off): an
    #: endpoint weighted well below its fair share gets that much more traffic until its
    #: reports show whether its signal follows traffic (lrs.weights.probing).
    explore_pressure: float = 0.2
    #: Seconds an endpoint whose estimate a probe confirmed is left alone.
    explore_cooldown: float = 30.0
    #: With lb_policy least_request, Envoy picks by weight / (requests in flight + 1) ** bias:
    #: our weights set the shares, the bias lets Envoy steer bursts between two pushes
    #: (Envoy's default 1.0; 2.0 measured fewer errors on servers with bounded queues).
    active_request_bias: float = 2.0
    #: Seconds between two EDS pushes of the pool's weights (the engine's debounce;
    #: CS-WRR recomputes every second).
    push_interval: float = 1.0


class ParamError(ValueError):
    """Invalid parameters: `problems` holds (key, message) pairs, key as written in the file."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))


def _is_number(value: object) -> TypeGuard[float]:
    # YAML `true` is a bool, and bool is an int subclass: a threshold of `true` is a typo.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class _Range:
    """A closed or half-open numeric range, with its text for messages."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"{left}{self.low:g}, {self.high:g}{right}"


_FRACTION: Final = _Range(0.0, 1.0, low_open=True)
_POSITIVE_SECONDS: Final = _Range(0.0, MAX_SECONDS, low_open=True)
_SECONDS: Final = _Range(0.0, MAX_SECONDS)
_RANGES: Final[dict[str, _Range]] = {
    "kv_cache_threshold": _FRACTION,
    "queue_threshold": _Range(0.0, 1e9, low_open=True),
    "in_flight_threshold": _Range(0.0, 1e9),
    "error_penalty": _Range(0.0, 1e6),
    "drain_time": _POSITIVE_SECONDS,
    "ewma_alpha": _FRACTION,
    "hysteresis": _Range(0.0, 1.0, high_open=True),
    "blackout": _SECONDS,
    "expiry": _POSITIVE_SECONDS,
    "min_rps": _Range(0.0, 1e9),
    "min_utilization": _Range(0.0, 1.0, low_open=True, high_open=True),
    "weight_scale": _Range(1, MAX_WEIGHT),
    "saturated_weight": _FRACTION,
    "saturation_exit": _FRACTION,
    "probe_after": _POSITIVE_SECONDS,
    "explore_pressure": _Range(0.0, 1.0),
    "explore_cooldown": _SECONDS,
    "push_interval": _SECONDS,
    "active_request_bias": _Range(0.0, 10.0),
}


def _number(key: str, value: object, problems: list[tuple[str, str]]) -> float | None:
    if not _is_number(value):
        hint = "; write the number without quotes" if isinstance(value, str) else ""
        problems.append((key, f"expected a number, got {_describe(value)}{hint}"))
        return None
    allowed = _RANGES[key]
    # Comparisons also reject NaN and infinities, and never convert a huge YAML integer.
    if not allowed.contains(value):
        problems.append((key, f"{_describe(value)} is out of range {allowed}"))
        return None
    if key == "weight_scale" and not isinstance(value, int):
        problems.append((key, f"expected an integer, got {_describe(value)}"))
        return None
    return value


def _names(key: str, value: object, problems: list[tuple[str, str]]) -> tuple[str, ...] | None:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        problems.append((key, f"expected a metric name or a list of them, got {_describe(value)}"))
        return None
    ok = True
    for index, name in enumerate(items):
        if not isinstance(name, str) or not name or not name.isprintable():
            where = key if isinstance(value, str) else f"{key}[{index}]"
            problems.append((where, f"expected a metric name, got {_describe(name)}"))
            ok = False
    return tuple(items) if ok else None


def _choice(key: str, value: object, problems: list[tuple[str, str]]) -> str | None:
    if isinstance(value, str) and value in SATURATED_ACTIONS:
        return value
    problems.append(
        (key, f"unknown value {_describe(value)}; expected one of: {', '.join(SATURATED_ACTIONS)}")
    )
    return None


_Reader = Callable[[str, object, list[tuple[str, str]]], Any]
_READERS: Final[dict[str, _Reader]] = {
    "kv_cache_metrics": _names,
    "queue_metrics": _names,
    "utilization_metrics": _names,
    "saturated_action": _choice,
} | dict.fromkeys(_RANGES, _number)
KEYS: Final = tuple(f.name for f in fields(Params))


def parse_params(raw: Mapping[str, Any] | None) -> Params:
    """Params from a pool's `orca:` mapping; absent or null keys keep their defaults.

    Raises ParamError listing every problem, each with the key it is about.
    """
    if raw is None:
        return Params()
    if not isinstance(raw, Mapping):
        raise ParamError([("", f"expected a mapping of parameters, got {_describe(raw)}")])
    problems: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _READERS:
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)
            problems.append((shown, f"unknown parameter; expected one of: {', '.join(KEYS)}"))
        elif value is not None:
            values[key] = _READERS[key](key, value, problems)
    if problems:
        raise ParamError(problems)
    return Params(**values)
