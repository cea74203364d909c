"""Why each endpoint got its weight, as the headroom policy hands it out with its weights.

Split out of `lrs.weights.headroom`: the policy computes weights on every tick and only
collects the facts; turning them into the admin API's per-endpoint view is this module's job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Final

from lrs.weights.params import Params
from lrs.weights.signals import EndpointLoad
from lrs.weights.tracking import first

__all__ = ["Explanation"]

#: Values per endpoint in an Explanation: key, state, weight, bottleneck, the averages, report.
_FACTS: Final = 9
_AVERAGES: Final = ("pressure", "utilization", "capacity", "rps")


class Explanation(Mapping[str, Mapping[str, object]]):
    """Why each endpoint got its weight: state, bottleneck, the averages that decided it
    and the latest report's signals.

    Kept as one flat list per pool and turned into dicts only when read: weights are
    computed for every pool every interval, the admin API reads them now and then.
    """

    __slots__ = ("_facts", "_index", "_moved", "_params")

    def __init__(self, facts: list[Any], moved: frozenset[str], params: Params) -> None:
        self._facts = facts
        self._moved = moved
        self._params = params
        self._index: dict[str, int] | None = None  # key -> offset in facts, built when read

    def _offsets(self) -> dict[str, int]:
        if self._index is None:
            keys = self._facts[::_FACTS]
            self._index = dict(zip(keys, range(0, len(self._facts), _FACTS), strict=True))
        return self._index

    def __getitem__(self, key: str) -> dict[str, object]:
        at = self._offsets()[key]
        _, state, weight, bottleneck, *averages, load = self._facts[at : at + _FACTS]
        why: dict[str, object] = {
            "state": state,
            "weight": weight,
            "priority": 1 if key in self._moved else 0,
            "bottleneck": bottleneck,
        }
        why.update(zip(_AVERAGES, map(_round, averages), strict=True))
        p = self._params
        latest = load or _UNKNOWN
        why["kv_cache"] = _round(first(latest.metrics, p.kv_cache_metrics))
        why["queue"] = _round(first(latest.metrics, p.queue_metrics))
        why["orca_utilization"] = _round(first(latest.metrics, p.utilization_metrics))
        why["error_rps"] = _round(latest.error_rps)
        why["in_flight"] = _round(latest.in_progress)
        rps = averages[-1]
        # Little's law: in flight / throughput is the latency Envoy observes.
        why["latency_s"] = _round(latest.in_progress / rps) if rps else None
        why["report_age_s"] = _round(latest.age)
        return why

    def __iter__(self) -> Iterator[str]:
        return iter(self._offsets())

    def __len__(self) -> int:
        return len(self._offsets())


#: What the explanation shows for an endpoint without a report taken in.
_UNKNOWN: Final = EndpointLoad(in_progress=math.nan, age=math.nan)


def _round(value: float | None) -> float | None:
    """JSON-ready: NaN (not reported) and infinities become None."""
    return round(value, 4) if value is not None and math.isfinite(value) else None
