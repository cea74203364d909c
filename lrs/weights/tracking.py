"""What the headroom policy knows about each endpoint, and the steps that read a report into it.

Split out of `lrs.weights.headroom` so that module holds the policy's decisions (state,
saturation, weights) and this one the per-endpoint record those decisions read and write:
`Track`, and the helpers that turn a report into its values: when the report was taken
(`report_time`), the first configured metric it carries (`first`), one smoothing step (`fold`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from lrs.weights.signals import EndpointLoad

__all__ = ["Track", "first", "fold", "report_time"]

#: Largest value a signal may carry; keeps sums and ratios of wild inputs finite.
_CAP: Final = 1e9


def first(metrics: Mapping[str, float], names: tuple[str, ...]) -> float:
    """The first configured metric the report carries with a usable value, else NaN."""
    for name in names:
        value = metrics.get(name)
        if value is not None and value >= 0.0:  # NaN fails every comparison
            return value
    return math.nan


def report_time(load: EndpointLoad, now: float, expiry: float) -> float:
    """When the report behind `load` was taken; -inf for one too old (or of unknown age) to use."""
    age = load.age
    if not age <= expiry:  # NaN fails it too
        return -math.inf
    return now - age if age > 0.0 else now


def fold(old: float | None, new: float, alpha: float) -> float | None:
    """One EWMA step; a missing (NaN) or negative measurement keeps what we knew."""
    if not new >= 0.0:
        return old
    if new > _CAP:
        new = _CAP
    return new if old is None else old + alpha * (new - old)


class Track:
    """What the policy knows about one endpoint: averages kept across calls, and the
    assessment of the current call (kept here too, to spare an object per endpoint)."""

    __slots__ = (
        "bottleneck",
        "capacity",
        "cooldown_until",
        "deaf_until",
        "estimate",
        "estimated_at",
        "key",
        "known_since",
        "latest_pressure",
        "lift",
        "load",
        "observed",
        "pressure",
        "probe_level",
        "probe_reports",
        "probe_rps",
        "probe_up",
        "probed_at",
        "published",
        "published_state",
        "queue",
        "raw",
        "rps",
        "saturated",
        "signal_at",
        "since",
        "state",
        "static_weight",
        "utilization",
        "zone",
    )

    def __init__(self, key: str) -> None:
        # The endpoint as last passed in (key, zone, static weight, when it was configured).
        self.key = key
        self.zone = ""
        self.static_weight = 1
        self.known_since = math.inf
        self.observed = -math.inf  # report time of the last sample taken in
        self.since = -math.inf  # first sample after a silence (blackout starts here)
        self.signal_at = -math.inf  # last sample that carried a load metric
        # Averages (EWMA) of what decides the weight.
        self.rps: float | None = None
        self.pressure: float | None = None  # the bottleneck signal, 1 = full
        self.utilization: float | None = None  # pressure up to 1, plus the error penalty
        self.queue: float | None = None  # waiting requests
        # The latest report taken in and its bottleneck, for the explanation.
        self.load: EndpointLoad | None = None
        self.bottleneck: str | None = None
        self.latest_pressure = 0.0  # that report's own pressure, unsmoothed
        self.published: float | None = None  # raw weight last published, and in which state
        self.published_state = ""
        self.saturated = False
        self.state = ""  # this call's assessment from here on
        self.capacity: float | None = None  # requests/s at pressure 1, when estimable
        self.estimate: float | None = None  # the last capacity estimated from traffic
        self.estimated_at = -math.inf  # report time of the sample it was estimated from
        self.raw = 0.0  # unrounded weight, in capacity units
        # Probing a starved endpoint (lrs.weights.probing): the capacity added to its weight,
        # the rate and pressure level the probe started from, reports since, the report
        # last stepped on, until when its signal counts as deaf to traffic, and until when
        # it is not probed again.
        self.lift = 0.0
        self.probe_rps: float | None = None
        self.probe_level = 0.0
        self.probe_reports = 0
        self.probe_up = True  # whether the probe (and an unresponsive verdict) went upwards
        self.probed_at = -math.inf
        self.deaf_until = -math.inf
        self.cooldown_until = -math.inf

    def forget_load(self) -> None:
        """After a silence old averages mean nothing: start again from the next report."""
        self.rps = self.pressure = self.utilization = self.estimate = self.queue = None
        self.end_probe()

    def end_probe(self) -> None:
        """No lift from here on (the cooldown, if any, is the caller's)."""
        self.lift = 0.0
        self.probe_rps = None
        self.probe_reports = 0
