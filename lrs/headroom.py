"""The default weight policy: endpoint weights proportional to estimated capacity.

LLM servers saturate on KV cache and waiting queue long before CPU, and a full
GPU answers slowly for everyone routed to it. So each endpoint's utilization is
its bottleneck signal, the roofline of the Kubernetes inference gateway's
saturation detector (gateway-api-inference-extension, utilization detector):

    pressure    = max(kv_cache / kv_cache_threshold, queue / queue_threshold,
                      utilization, in_flight / in_flight_threshold)
    utilization = pressure + error_penalty * error_rps / rps           (gRFC A58)
    capacity    = rps / utilization                                     (gRFC A58, CS-WRR)

`capacity` is the request rate the endpoint would serve at pressure 1. While an
endpoint is below saturation its signals grow with its traffic, so the ratio does
not depend on how much traffic it gets: weights proportional to capacity are a
stable fixed point at which every endpoint runs at the same pressure (the
argument behind gRPC's weighted_round_robin, gRFC A58, and Envoy's
client_side_weighted_round_robin). Past saturation throughput stops growing
while the queue does, so capacity falls below the endpoint's current throughput
and traffic moves away until the queue drains.

Everything else is about not trusting thin data, adapted from CS-WRR (Envoy
source, client_side_weighted_round_robin_lb.cc; gRFC A58): an endpoint without a
usable estimate (new, stale, idle, no metric) gets the median capacity of the
others, scaled by its static weight, as Envoy gives such hosts the median weight.
An endpoint that shows almost no pressure under real traffic is not unknown but
lightly loaded: its utilization counts as `min_utilization`, so it draws traffic
instead of sitting at the median. One that falls silent for want of traffic (its
weight moved traffic away) keeps its last estimate until `expiry`, like CS-WRR
keeps a weight until weight_expiration_period, rather than snapping back to the
median and flapping.
Samples are smoothed (EWMA, time-aware), and a change smaller than the hysteresis
keeps the published weight so EDS is not pushed for noise.

An endpoint at pressure >= 1 is taken out of rotation (a trickle of weight, or
priority 1) only while the pool's spare capacity, sum(capacity - rps) over the
unsaturated endpoints, absorbs the traffic it sheds: when the whole pool runs hot
nobody is singled out and everyone is weighted by capacity as usual, so the pool
is never emptied and saturation does not cascade from one endpoint to the next.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Final

from lrs.params import Params
from lrs.signals import MAX_WEIGHT, EndpointInput, EndpointLoad, PoolWeights

ACTIVE: Final = "active"  # weighted by its own capacity estimate
SATURATED: Final = "saturated"  # taken out of rotation: a trickle, or priority 1
BLACKOUT: Final = "blackout"  # new or back after a silence: neutral until data settles
STALE: Final = "stale"  # no report for `expiry` seconds: neutral
HELD: Final = "held"  # too little traffic lately: keeps its last estimate until expiry
IDLE: Final = "idle"  # too little traffic to estimate capacity, and no recent estimate: neutral
NO_SIGNAL: Final = "no_signal"  # reports carry none of the configured metrics: neutral

#: Largest value a signal may carry; keeps sums and ratios of wild inputs finite.
_CAP: Final = 1e9


def _first(metrics: Mapping[str, float], names: tuple[str, ...]) -> float:
    """The first configured metric the report carries with a usable value, else NaN."""
    for name in names:
        value = metrics.get(name)
        if value is not None and value >= 0.0:  # NaN fails every comparison
            return value
    return math.nan


def _fold(old: float | None, new: float, alpha: float) -> float | None:
    """One EWMA step; a missing (NaN) or negative measurement keeps what we knew."""
    if not new >= 0.0:
        return old
    if new > _CAP:
        new = _CAP
    return new if old is None else old + alpha * (new - old)


class _Track:
    """What the policy knows about one endpoint: averages kept across calls, and the
    assessment of the current call (kept here too, to spare an object per endpoint)."""

    __slots__ = (
        "bottleneck",
        "capacity",
        "estimate",
        "estimated_at",
        "load",
        "observed",
        "pressure",
        "published",
        "published_state",
        "raw",
        "rps",
        "saturated",
        "signal_at",
        "since",
        "state",
        "utilization",
    )

    def __init__(self) -> None:
        self.observed = -math.inf  # report time of the last sample taken in
        self.since = -math.inf  # first sample after a silence (blackout starts here)
        self.signal_at = -math.inf  # last sample that carried a load metric
        # Averages (EWMA) of what decides the weight.
        self.rps: float | None = None
        self.pressure: float | None = None  # the bottleneck signal, 1 = full
        self.utilization: float | None = None  # pressure plus the error penalty
        # The latest report taken in and its bottleneck, for the explanation.
        self.load: EndpointLoad | None = None
        self.bottleneck: str | None = None
        self.published: float | None = None  # raw weight last published, and in which state
        self.published_state = ""
        self.saturated = False
        self.state = ""  # this call's assessment from here on
        self.capacity: float | None = None  # requests/s at pressure 1, when estimable
        self.estimate: float | None = None  # the last capacity estimated from traffic
        self.estimated_at = -math.inf
        self.raw = 0.0  # unrounded weight, in capacity units

    def forget_load(self) -> None:
        """After a silence old averages mean nothing: start again from the next report."""
        self.rps = self.pressure = self.utilization = self.estimate = None


_Rows = list[tuple[EndpointInput, _Track]]


class HeadroomPolicy:
    """Weights from each endpoint's headroom; keeps per-endpoint state across calls.

    Deterministic: the output depends only on the sequence of (endpoints, now)
    calls; time comes from `now` (monotonic seconds, the clock of `known_since`).
    """

    def __init__(self, params: Params) -> None:
        self.params = params
        self._tracks: dict[str, _Track] = {}

    def compute(self, endpoints: Sequence[EndpointInput], now: float) -> PoolWeights:
        """One pool's weights; endpoints not passed in are forgotten."""
        if not endpoints:
            self._tracks = {}
            return PoolWeights(endpoints={}, localities={})
        previous = self._tracks
        tracks: dict[str, _Track] = {}
        rows: _Rows = []
        take_in, assess = self._take_in, self._assess
        for endpoint in endpoints:
            track = previous.get(endpoint.key)
            if track is None:
                track = _Track()
            tracks[endpoint.key] = track
            if endpoint.load is not None:
                take_in(track, endpoint.load, now)
            assess(track, endpoint.known_since, now)
            rows.append((endpoint, track))
        self._tracks = tracks
        self._mark_saturated(rows, now)
        return self._publish(rows, self._set_raw(rows))

    # ------------------------------------------------------------------ per endpoint

    def _take_in(self, track: _Track, load: EndpointLoad, now: float) -> None:
        """Folds a report into the averages, once per report however often we are called."""
        p = self.params
        age = load.age
        if not age <= p.expiry:  # too old, or NaN
            return
        observed = now - age if age > 0.0 else now
        gap = observed - track.observed
        if not gap > 0.0:
            return  # the report we already took in
        if gap > p.expiry:
            track.forget_load()
            track.since = observed
        track.observed = observed
        track.load = load
        metrics = load.metrics
        kv = _first(metrics, p.kv_cache_metrics)
        if kv > 1.0:
            kv = 1.0  # a fraction: a server reporting more is full, not fuller
        queue = _first(metrics, p.queue_metrics)
        util = _first(metrics, p.utilization_metrics)
        in_flight, rps, errors = load.in_progress, load.rps, load.error_rps
        # The bottleneck: the most constrained signal relative to its threshold.
        # Comparisons skip NaN (a signal this report does not carry).
        pressure, bottleneck = -1.0, None
        if kv / p.kv_cache_threshold > pressure:
            pressure, bottleneck = kv / p.kv_cache_threshold, "kv_cache"
        if queue / p.queue_threshold > pressure:
            pressure, bottleneck = queue / p.queue_threshold, "queue"
        if util > pressure:
            pressure, bottleneck = util, "utilization"
        if p.in_flight_threshold > 0.0 and in_flight / p.in_flight_threshold > pressure:
            pressure, bottleneck = in_flight / p.in_flight_threshold, "in_flight"
        if bottleneck is None:
            # No request finished with a metric: throughput and pressure are averaged
            # together or not at all, else a starved endpoint's capacity decays to nothing.
            return
        # Time-aware: Envoys reporting more often (or more Envoys) do not smooth less;
        # the first signal after a long gap (inf) replaces the averages.
        alpha = 1.0 - (1.0 - p.ewma_alpha) ** (observed - track.signal_at)
        track.signal_at = observed
        track.bottleneck = bottleneck
        track.rps = _fold(track.rps, rps, alpha)
        track.pressure = _fold(track.pressure, pressure, alpha)
        # The error share of requests: at most all of them; NaN compares False.
        errors = 0.0 if not errors > 0.0 else 1.0 if errors >= rps else errors / rps
        track.utilization = _fold(track.utilization, pressure + p.error_penalty * errors, alpha)

    def _assess(self, track: _Track, known_since: float, now: float) -> None:
        """This call's state of one endpoint, and its capacity when it can be estimated."""
        p = self.params
        stale = now - track.observed > p.expiry
        if stale:
            track.forget_load()
        track.capacity = None
        rps = track.rps
        utilization = track.utilization
        if now < known_since + p.blackout or now < track.since + p.blackout:
            track.state = BLACKOUT
        elif stale:
            track.state = STALE
        elif utilization is None:
            track.state = NO_SIGNAL
        elif track.signal_at == track.observed and rps is not None and rps >= p.min_rps:
            track.state = ACTIVE
            # Near-zero pressure under traffic means lightly loaded, not unknown.
            capacity = rps / max(utilization, p.min_utilization)
            # Bounded so that ratios between endpoints, however wild, stay finite.
            capacity = 1e-9 if capacity < 1e-9 else 1e12 if capacity > 1e12 else capacity
            track.capacity = track.estimate = capacity
            track.estimated_at = now
        elif track.estimate is not None and now - track.estimated_at <= p.expiry:
            track.state = HELD  # its latest report saw too little traffic to estimate from
            track.capacity = track.estimate
        else:
            track.state = IDLE

    # ------------------------------------------------------------------ per pool

    def _mark_saturated(self, rows: _Rows, now: float) -> None:
        """Saturated endpoints leave rotation only as far as the others' spare capacity goes."""
        p = self.params
        candidates = []
        spare = 0.0
        for endpoint, track in rows:
            pressure = track.pressure
            # Only a recent signal counts: with priority 1 (or a trickle at low load) an
            # endpoint gets no reports, and after probe_after it is let back in to show
            # whether it drained.
            if pressure is None or now - track.signal_at >= p.probe_after:
                keep = False
            elif track.saturated:  # held until its pressure falls below saturation_exit
                keep = pressure >= p.saturation_exit and track.state in (ACTIVE, HELD, IDLE)
            else:
                keep = pressure >= 1.0 and track.state == ACTIVE
            if keep:
                candidates.append((-(pressure or 0.0), endpoint.key, track))
            elif track.capacity is not None:
                spare += max(0.0, track.capacity - (track.rps or 0.0))
            track.saturated = False
        candidates.sort(key=lambda c: c[:2])
        shed = 0.0
        for _, _, track in candidates:
            rps = track.rps or 0.0
            if spare <= 0.0 or shed + rps > spare:
                continue  # the rest of the pool could not take its traffic: keep it weighted
            shed += rps
            track.saturated = True
            track.state = SATURATED

    def _set_raw(self, rows: _Rows) -> float:
        """Unrounded weights in capacity units, hysteresis applied; returns the factor that
        turns them into integers: the largest gets weight_scale, the sum fits MAX_WEIGHT."""
        p = self.params
        per_static = sorted(
            track.capacity / max(1, endpoint.static_weight)
            for endpoint, track in rows
            if track.capacity is not None and track.state in (ACTIVE, HELD)
        )
        # Envoy's CS-WRR gives hosts without a usable weight the median weight.
        unit = per_static[len(per_static) // 2] if per_static else 1.0
        serving = 0.0
        count = 0
        for endpoint, track in rows:
            # Active, held (and some saturated) endpoints have a capacity: the rest are neutral.
            static = endpoint.static_weight
            track.raw = track.capacity or unit * (static if static > 1 else 1)
            if track.state != SATURATED:
                serving += track.raw
                count += 1
        trickle = math.inf
        if count < len(rows) and p.saturated_action == "min_weight":
            trickle = p.saturated_weight * serving / count  # count > 0: never all saturated
        hysteresis = p.hysteresis
        total = top = 0.0
        for _, track in rows:
            raw = track.raw
            if raw > trickle and track.state == SATURATED:
                raw = trickle  # never more than it had
            held = track.published
            if (
                held is not None
                and track.state == track.published_state
                and -hysteresis * held <= raw - held <= hysteresis * held
            ):
                raw = held
            track.raw = track.published = raw
            track.published_state = track.state
            total += raw
            if raw > top:
                top = raw
        # Rounding adds at most 1 per endpoint, so the scaled sum stays <= MAX_WEIGHT.
        return min(p.weight_scale / top, max(0.0, MAX_WEIGHT - len(rows)) / total)

    def _publish(self, rows: _Rows, factor: float) -> PoolWeights:
        """Integer weights, locality sums, and what explains them."""
        p = self.params
        lower = p.saturated_action == "lower_priority"
        weights: dict[str, int] = {}
        zones: dict[str, int] = {}
        spill: dict[str, int] = {}
        moved: list[str] = []
        explain: dict[str, tuple] = {}
        for endpoint, track in rows:
            key = endpoint.key
            weight = int(track.raw * factor + 0.5) or 1
            weights[key] = weight
            zone = endpoint.zone
            if lower and track.state == SATURATED:
                moved.append(key)
                spill[zone] = spill.get(zone, 0) + weight
            else:
                zones[zone] = zones.get(zone, 0) + weight
            explain[key] = (
                track.state,
                weight,
                track.bottleneck,
                track.pressure,
                track.utilization,
                track.capacity,
                track.rps,
                track.load,
            )
        for zone, weight in spill.items():
            zones.setdefault(zone, weight)  # a zone wholly in priority 1 still needs a weight
        saturated = frozenset(moved)
        return PoolWeights(
            endpoints=weights,
            localities=zones,
            saturated=saturated,
            explain=Explanation(explain, saturated, p),
        )


_AVERAGES: Final = ("pressure", "utilization", "capacity_rps", "rps")


class Explanation(Mapping[str, Mapping[str, object]]):
    """Why each endpoint got its weight: state, bottleneck, the averages that decided it
    and the latest report's signals.

    Kept as tuples and turned into dicts only when read: weights are computed for
    every pool every interval, the admin API reads them now and then.
    """

    __slots__ = ("_moved", "_params", "_rows")

    def __init__(self, rows: dict[str, tuple], moved: frozenset[str], params: Params) -> None:
        self._rows = rows
        self._moved = moved
        self._params = params

    def __getitem__(self, key: str) -> dict[str, object]:
        state, weight, bottleneck, *averages, load = self._rows[key]
        why: dict[str, object] = {
            "state": state,
            "weight": weight,
            "priority": 1 if key in self._moved else 0,
            "bottleneck": bottleneck,
        }
        why.update(zip(_AVERAGES, map(_round, averages), strict=True))
        p = self._params
        latest = load or EndpointLoad(in_progress=math.nan, age=math.nan)
        why["kv_cache"] = _round(_first(latest.metrics, p.kv_cache_metrics))
        why["queue"] = _round(_first(latest.metrics, p.queue_metrics))
        why["orca_utilization"] = _round(_first(latest.metrics, p.utilization_metrics))
        why["error_rps"] = _round(latest.error_rps)
        why["in_flight"] = _round(latest.in_progress)
        rps = averages[-1]
        # Little's law: in flight / throughput is the latency Envoy observes.
        why["latency_s"] = _round(latest.in_progress / rps) if rps else None
        why["report_age_s"] = _round(latest.age)
        return why

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def _round(value: float | None) -> float | None:
    """JSON-ready: NaN (not reported) and infinities become None."""
    return round(value, 4) if value is not None and math.isfinite(value) else None
