"""What one reporter may claim in one report: the caps that keep a liar from outvoting.

Rates add up over reporters (each Envoy sees only its own requests), so any reporter can
inflate an endpoint's rate by claiming requests it never sent, and one compromised
Envoy could make a full server look like the fleet's most capable one. A reporter's
finished count for a series (endpoint or locality) in one report is therefore capped at:

* `max_rps` times the time it really took since its previous report of the cluster
  (measured here, not the interval it claims): plausibility for any single reporter;
* `share_cap` times the mean rate the *other* reporters of that series report (when there
  are others, and above a floor of `floor_rps`): one reporter may carry a few times its
  share of traffic, not a hundred times. Envoys in a fleet behind one load balancer see
  similar traffic; a skew past the cap is undercounted, not refused.

The mean of the others comes from a running sum per series of each reporter's latest
rate (`Series.rate_sum`, kept exact by `ReporterState.replace`), so a cap costs a few
operations per endpoint stat, never a pass over the reporters.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Final

from lrs.load_window import Series

__all__ = [
    "FLOOR_RPS",
    "MAX_COUNT",
    "MAX_MEAN",
    "MAX_NAME",
    "MAX_UTILIZATION",
    "SHARE_CAP",
    "Claim",
    "drop_large",
    "is_utilization",
    "plausible",
]

#: The most requests one report interval may carry (2**30 - 1, ~1.07e9); more is corruption.
#: One less than a power of two, so `(a | b | c) > MAX_COUNT` checks several counts at once.
MAX_COUNT: Final = 2**30 - 1
#: Largest plausible mean of a utilization-like metric (a fraction, or at most a percentage).
MAX_UTILIZATION: Final = 100.0
#: Largest plausible mean of any other metric (queue lengths, token counts, ...).
MAX_MEAN: Final = 1e9
#: Longest metric name or zone kept; longer ones are dropped rather than stored.
MAX_NAME: Final = 256
_UTILIZATION_HINTS: Final = ("util", "usage", "perc")
#: A reporter may claim this many times the other reporters' mean rate for a series.
SHARE_CAP: Final = 3.0
#: Below this rate (requests/s) no share cap applies: small numbers are noise, not attacks.
FLOOR_RPS: Final = 5.0


class Claim:
    """The caps of one reporter's report of one cluster; collects its new rates."""

    __slots__ = ("dropped", "elapsed", "floor", "limit", "previous", "rates", "share_cap")

    def __init__(
        self,
        elapsed: float,
        max_rps: float,
        share_cap: float | None,
        previous: dict[Series, float],
        dropped: Counter[str],
    ) -> None:
        self.elapsed = elapsed
        self.limit = max(1, int(max_rps * elapsed))
        self.floor = FLOOR_RPS * elapsed
        self.share_cap = share_cap
        self.previous = previous  # this reporter's rates in its last report
        self.rates: dict[Series, float] = {}  # ... and in this one
        self.dropped = dropped

    def cap(self, series: Series, success: int, error: int, issued: int) -> tuple[int, int, int]:
        """The counts this reporter is believed for `series`; notes its rate."""
        finished = success + error
        limit = self.limit
        share_cap = self.share_cap
        if share_cap is not None and finished > self.floor:
            mine = self.previous.get(series)
            others = series.reporters - (mine is not None)
            if others > 0:
                mean = (series.rate_sum - (mine or 0.0)) / others
                limit = min(limit, max(int(self.floor), int(share_cap * mean * self.elapsed)))
        if finished > limit or issued > limit:
            success, error, issued = self._scale(success, error, issued, limit)
            finished = success + error
        self.rates[series] = finished / self.elapsed
        return success, error, issued

    def _scale(self, success: int, error: int, issued: int, limit: int) -> tuple[int, int, int]:
        """Scale finished counts down to `limit`, keeping their error share."""
        self.dropped["count_over_cap"] += 1
        finished = success + error
        if finished > limit:
            error = error * limit // finished
            success = limit - error
        return success, error, min(issued, limit)


def is_utilization(metric_name: str) -> bool:
    """Utilization-like metrics (cpu_utilization, kv_cache_usage_perc) are at most 100."""
    return any(hint in metric_name for hint in _UTILIZATION_HINTS)


def drop_large(dropped: Counter[str], *counts: int) -> tuple[int, ...]:
    """Counts past MAX_COUNT are corruption: zeroed, and counted in `dropped`."""
    kept = tuple(0 if count > MAX_COUNT else count for count in counts)
    dropped["count_too_large"] += sum(count > MAX_COUNT for count in counts)
    return kept


def plausible(dropped: Counter[str], name: str, num: int, total: float) -> bool:
    """Whether a metric sum outside the common range is still believable; counts why not."""
    if num == 0:
        if total == 0.0:
            return False  # nothing measured, nothing wrong
        reason = "metric_without_requests"
    elif num > MAX_COUNT:
        reason = "count_too_large"
    elif not math.isfinite(total):
        reason = "not_finite"
    elif total < 0.0:
        reason = "negative"
    elif not 0 < len(name) <= MAX_NAME:
        reason = "bad_name"
    elif total / num > (MAX_UTILIZATION if is_utilization(name) else MAX_MEAN):
        reason = "too_large"
    else:
        return True
    dropped[reason] += 1
    return False
