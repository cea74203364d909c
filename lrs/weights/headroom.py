"""The default weight policy: endpoint weights proportional to estimated capacity.

LLM servers saturate on KV cache and waiting queue long before CPU, and a full
GPU answers slowly for everyone routed to it. So each endpoint's utilization is
its bottleneck signal, the roofline of the Kubernetes inference gateway's
saturation detector (gateway-api-inference-extension, utilization detector):

    pressure    = max(kv_cache / kv_cache_threshold, queue / queue_threshold,
                      utilization, in_flight / in_flight_threshold)
    utilization = min(1, pressure) + error_penalty * error_rps / rps   (gRFC A58)
    capacity    = rps / utilization                                     (gRFC A58, CS-WRR)
                  - queue / drain_time

`capacity` is the request rate the endpoint would serve at pressure 1. While an
endpoint is below saturation its signals grow with its traffic, so the ratio does
not depend on how much traffic it gets: weights proportional to capacity are a
stable fixed point at which every endpoint runs at the same pressure (the
argument behind gRPC's weighted_round_robin, gRFC A58, and Envoy's
client_side_weighted_round_robin). At saturation an endpoint serves as fast as it
can: its throughput is its capacity, and its waiting queue takes away the rate
that drains it in `drain_time`, so traffic moves away until the queue drains
(by as much as the backlog, not by the queue's multiple of its threshold).

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

Cost: the weight engine calls every pool's policy on every tick, so the per-endpoint
passes build no object per endpoint (the track list is reused while the pool's
endpoints stay the same, the explanation is one flat list per pool) and a report is
folded in only once. A call that brings nothing new (the same endpoints, no report
newer than those taken in, no blackout, expiry or probe falling due) returns the
previous answer itself, without recomputing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

from lrs.contract import MAX_WEIGHT
from lrs.weights.explanation import Explanation
from lrs.weights.params import Params
from lrs.weights.probing import PROBING, UNRESPONSIVE, explore
from lrs.weights.signals import EndpointInput, EndpointLoad, PoolWeights, Saturation
from lrs.weights.tracking import Track, first, fold, report_time

__all__ = [
    "ACTIVE",
    "BLACKOUT",
    "HELD",
    "IDLE",
    "NO_SIGNAL",
    "PROBING",
    "SATURATED",
    "STALE",
    "UNRESPONSIVE",
    "HeadroomPolicy",
]

ACTIVE: Final = "active"  # weighted by its own capacity estimate
SATURATED: Final = "saturated"  # taken out of rotation: a trickle, or priority 1
BLACKOUT: Final = "blackout"  # new or back after a silence: neutral until data settles
STALE: Final = "stale"  # no report for `expiry` seconds: neutral
HELD: Final = "held"  # too little traffic lately: keeps its last estimate until expiry
IDLE: Final = "idle"  # too little traffic to estimate capacity, and no recent estimate: neutral
NO_SIGNAL: Final = "no_signal"  # reports carry none of the configured metrics: neutral
#: States with a capacity estimate of their own (probing looks at these).
_ESTIMATED: Final = (ACTIVE, HELD)
#: States whose capacity estimate sets the pool's median (the neutral weight).
_MEDIAN: Final = (ACTIVE, HELD, PROBING, UNRESPONSIVE)
#: States a saturated endpoint keeps its place out of rotation in.
_STAYS_SATURATED: Final = (ACTIVE, HELD, IDLE)


class HeadroomPolicy:
    """Weights from each endpoint's headroom; keeps per-endpoint state across calls.

    Deterministic: the output depends only on the sequence of (endpoints, now)
    calls; time comes from `now` (monotonic seconds, the clock of `known_since`).
    """

    def __init__(self, params: Params) -> None:
        self.params = params
        # What _take_in reads for every report, unpacked in one step.
        self._constants = (
            params.expiry,
            params.kv_cache_metrics,
            params.queue_metrics,
            params.utilization_metrics,
            params.kv_cache_threshold,
            params.queue_threshold,
            params.in_flight_threshold,
            1.0 - params.ewma_alpha,
            params.error_penalty,
        )
        self._keys: list[str] = []  # the last call's endpoint keys, in call order
        self._rows: list[Track] = []  # their tracks, in the same order
        self._answer: PoolWeights | None = None  # the last answer, when it may be given again
        self._computed_at = math.inf  # the `now` it was computed at
        self._due: float | None = None  # when a state may next change by itself; None: not known

    def compute(self, endpoints: Sequence[EndpointInput], now: float) -> PoolWeights:
        """One pool's weights; endpoints not passed in are forgotten."""
        answer = self._reusable(endpoints, now)
        if answer is not None:
            return answer
        rows = self._match(endpoints)
        self._answer, self._computed_at, self._due = None, now, None
        if not rows:
            return PoolWeights(endpoints={}, localities={})
        self._refresh(endpoints, rows, now)
        settled = self._mark_saturated(rows, now)
        explore(rows, now, _ESTIMATED, self.params)
        answer = self._publish(rows, self._set_raw(rows))
        if settled:  # only an answer the same inputs would give again is handed out again
            self._answer = answer
        return answer

    # ------------------------------------------------------------------ no new data

    def _reusable(self, endpoints: Sequence[EndpointInput], now: float) -> PoolWeights | None:
        """The last answer, when this call would give it again: the same endpoints, no report
        newer than the ones taken in, and no state change due by time alone (a blackout
        ending, a load or estimate expiring, a saturated endpoint's probe)."""
        rows = self._rows
        if self._answer is None or len(endpoints) != len(rows):
            return None
        if not self._computed_at <= now:  # time went back (or is NaN): recompute
            return None
        expiry = self.params.expiry
        for endpoint, track in zip(endpoints, rows, strict=True):
            if (
                endpoint.key != track.key
                or endpoint.zone != track.zone
                or endpoint.static_weight != track.static_weight
                or endpoint.known_since != track.known_since
            ):
                return None
            load = endpoint.load
            if load is not None and report_time(load, now, expiry) > track.observed:
                return None
        if self._due is None:
            self._due = self._next_change()
        return self._answer if now < self._due else None

    def _next_change(self) -> float:
        """The earliest time, from the last computation on, at which some endpoint's state may
        change with no new report. Every deadline is the very sum the state test compares
        `now` with, so the answer is exact; one that cannot matter (a probe of an endpoint
        without pressure) only makes the next computation come early."""
        p = self.params
        after = self._computed_at
        due = math.inf
        for track in self._rows:
            for deadline in (
                track.known_since + p.blackout,
                track.since + p.blackout,
                track.observed + p.expiry,
                track.estimated_at + p.expiry,
                track.signal_at + p.probe_after,
            ):
                if after <= deadline < due:
                    due = deadline
        return due

    # ------------------------------------------------------------------ per endpoint

    def _match(self, endpoints: Sequence[EndpointInput]) -> list[Track]:
        """Each endpoint's track, in call order. Pools rarely change, so the last call's list
        is reused when the keys are the same; else tracks are found by key, and those of
        endpoints not passed in are forgotten."""
        keys = [endpoint.key for endpoint in endpoints]
        if keys != self._keys:
            known = dict(zip(self._keys, self._rows, strict=True))
            self._rows = [known.get(key) or Track(key) for key in keys]
            self._keys = keys
        return self._rows

    def _refresh(self, endpoints: Sequence[EndpointInput], rows: list[Track], now: float) -> None:
        """Takes in new reports, then sets each endpoint's state for this call and, when it
        can be estimated, its capacity. The hot loop: parameters are bound once."""
        p = self.params
        expiry, blackout, min_rps, floor = p.expiry, p.blackout, p.min_rps, p.min_utilization
        drain_time, drained = p.drain_time, p.saturated_weight
        take_in = self._take_in
        for endpoint, track in zip(endpoints, rows, strict=True):
            track.zone, track.static_weight = endpoint.zone, endpoint.static_weight
            track.known_since = known_since = endpoint.known_since
            load = endpoint.load
            if load is not None:
                observed = report_time(load, now, expiry)
                if observed > track.observed:  # once per report, however often we are called
                    take_in(track, load, observed)
            capacity = None
            stale = now > track.observed + expiry
            if stale:
                track.forget_load()
            rps, utilization = track.rps, track.utilization
            if now < known_since + blackout or now < track.since + blackout:
                state = BLACKOUT
            elif stale:
                state = STALE
            elif utilization is None:
                state = NO_SIGNAL
            elif track.signal_at == track.observed and rps is not None and rps >= min_rps:
                state = ACTIVE
                # Near-zero pressure under traffic means lightly loaded, not unknown.
                capacity = rps / (utilization if utilization > floor else floor)
                # A backlog lowers the weight by the rate that drains it in `drain_time`,
                # down to a share that keeps fresh reports coming.
                if track.queue:
                    capacity = max(drained * capacity, capacity - track.queue / drain_time)
                # Bounded so that ratios between endpoints, however wild, stay finite.
                capacity = 1e-9 if capacity < 1e-9 else 1e12 if capacity > 1e12 else capacity
                track.estimate = capacity
                track.estimated_at = track.observed
            elif track.estimate is not None and now <= track.estimated_at + expiry:
                state = HELD  # its latest report saw too little traffic to estimate from
                capacity = track.estimate
            else:
                state = IDLE
            track.state = state
            track.capacity = capacity

    def _take_in(self, track: Track, load: EndpointLoad, observed: float) -> None:
        """Folds a new report, taken at `observed`, into the averages."""
        (
            expiry,
            kv_names,
            queue_names,
            utilization_names,
            kv_full,
            queue_full,
            in_flight_full,
            keep,
            penalty,
        ) = self._constants
        if observed - track.observed > expiry:
            track.forget_load()
            track.since = observed
        track.observed = observed
        track.load = load
        metrics = load.metrics
        kv = first(metrics, kv_names)
        if kv > 1.0:
            kv = 1.0  # a fraction: a server reporting more is full, not fuller
        # The bottleneck: the most constrained signal relative to its threshold.
        # Comparisons skip NaN (a signal this report does not carry).
        pressure, bottleneck = -1.0, None
        if kv / kv_full > pressure:
            pressure, bottleneck = kv / kv_full, "kv_cache"
        waiting = first(metrics, queue_names)
        if waiting / queue_full > pressure:
            pressure, bottleneck = waiting / queue_full, "queue"
        utilization = first(metrics, utilization_names)
        if utilization > pressure:
            pressure, bottleneck = utilization, "utilization"
        if in_flight_full > 0.0 and load.in_progress / in_flight_full > pressure:
            pressure, bottleneck = load.in_progress / in_flight_full, "in_flight"
        if bottleneck is None:
            # No request finished with a metric: throughput and pressure are averaged
            # together or not at all, else a starved endpoint's capacity decays to nothing.
            return
        # Time-aware: Envoys reporting more often (or more Envoys) do not smooth less;
        # the first signal after a long gap (inf) replaces the averages.
        alpha = 1.0 - keep ** (observed - track.signal_at)
        track.signal_at = observed
        track.bottleneck = bottleneck
        track.latest_pressure = pressure
        rps, errors = load.rps, load.error_rps
        track.rps = fold(track.rps, rps, alpha)
        # Capped at twice full for the average: a queue of 20 (pressure 4) kept a recovered
        # server out of rotation for 5 s of reports after it drained; 2 halves that.
        track.pressure = fold(track.pressure, pressure if pressure < 2.0 else 2.0, alpha)
        # The error share of requests: at most all of them; NaN compares False.
        errors = 0.0 if not errors > 0.0 else 1.0 if errors >= rps else errors / rps
        # Past saturation (pressure >= 1) an endpoint serves as fast as it can: its throughput
        # is its capacity. The queue beyond that says how much to take away, not how slow
        # it is (dividing by queue / queue_threshold made a queueing server look several
        # times slower than it was, and twin servers swung traffic between them).
        saturated = 1.0 if pressure > 1.0 else pressure
        track.utilization = fold(track.utilization, saturated + penalty * errors, alpha)
        track.queue = fold(track.queue, waiting if waiting > 0.0 else 0.0, alpha)

    # ------------------------------------------------------------------ per pool

    def _mark_saturated(self, rows: list[Track], now: float) -> bool:
        """Saturated endpoints leave rotation only as far as the others' spare capacity goes.

        Returns whether the outcome is settled: whether marking again with the same inputs
        would mark the same endpoints. It would not when an endpoint held out of rotation
        (pressure between saturation_exit and 1, or not active) was let back in this time
        for want of spare capacity: next time it counts toward the spare instead.
        """
        p = self.params
        exit_level, probe_after = p.saturation_exit, p.probe_after
        candidates = []
        spare = 0.0
        for track in rows:
            pressure = track.pressure
            # Only a recent signal counts: with priority 1 (or a trickle at low load) an
            # endpoint gets no reports, and after probe_after it is let back in to show
            # whether it drained.
            if pressure is None or now >= track.signal_at + probe_after:
                keep = False
            elif track.saturated:  # held until its pressure falls below saturation_exit
                # The average, or the latest report: a server that drained says so at once,
                # while the average of its full reports lags for seconds.
                keep = (
                    min(pressure, track.latest_pressure) >= exit_level
                    and track.state in _STAYS_SATURATED
                )
            else:  # both must agree, or one low report would let it flap in and out
                keep = min(pressure, track.latest_pressure) >= 1.0 and track.state == ACTIVE
            if keep:
                candidates.append(track)
            elif track.capacity is not None:
                rps = track.rps or 0.0
                if track.capacity > rps:
                    spare += track.capacity - rps
            track.saturated = False
        if not candidates:
            return True
        candidates.sort(key=_most_pressed_first)
        shed = 0.0
        settled = True
        for track in candidates:
            rps = track.rps or 0.0
            if spare <= 0.0 or shed + rps > spare:
                # The rest of the pool could not take its traffic: keep it weighted. One that
                # was a candidate only for having been saturated before is none next time.
                if not (track.state == ACTIVE and (track.pressure or 0.0) >= 1.0):
                    settled = False
                continue
            shed += rps
            track.saturated = True
            track.state = SATURATED
        return settled

    def _set_raw(self, rows: list[Track]) -> float:
        """Unrounded weights in capacity units, hysteresis applied; returns the factor that
        turns them into integers: the largest gets weight_scale, the sum fits MAX_WEIGHT."""
        p = self.params
        per_static = []
        capacity_sum = neutral_sum = 0.0  # over the endpoints in rotation
        serving = 0
        for track in rows:
            state = track.state
            static = track.static_weight
            if static < 1:
                static = 1
            capacity = track.capacity
            if capacity is not None and state in _MEDIAN:
                per_static.append(capacity / static)
            if state != SATURATED:
                serving += 1
                if capacity is None:
                    neutral_sum += static
                else:
                    capacity_sum += capacity
        # Envoy's CS-WRR gives hosts without a usable weight the median weight.
        per_static.sort()
        unit = per_static[len(per_static) // 2] if per_static else 1.0
        trickle = math.inf
        if serving < len(rows) and p.saturated_action == "min_weight":
            # A share of the mean weight in rotation (serving > 0: never all saturated).
            trickle = p.saturated_weight * (capacity_sum + unit * neutral_sum) / serving
        hysteresis = p.hysteresis
        total = top = 0.0
        for track in rows:
            # Active, held (and some saturated) endpoints have a capacity: the rest are neutral.
            raw = track.capacity
            if raw is not None:
                raw += track.lift
            else:
                static = track.static_weight
                raw = unit * (static if static > 1 else 1)
            state = track.state
            if raw > trickle and state == SATURATED:
                raw = trickle  # never more than it had
            held = track.published
            if (
                held is not None
                and state == track.published_state
                and -hysteresis * held <= raw - held <= hysteresis * held
            ):
                raw = held
            track.raw = track.published = raw
            track.published_state = state
            total += raw
            if raw > top:
                top = raw
        # Rounding adds at most 1 per endpoint, so the scaled sum stays <= MAX_WEIGHT.
        return min(p.weight_scale / top, max(0.0, MAX_WEIGHT - len(rows)) / total)

    def _publish(self, rows: list[Track], factor: float) -> PoolWeights:
        """Integer weights, locality sums, and what explains them."""
        p = self.params
        lower = p.saturated_action == "lower_priority"
        weights: dict[str, int] = {}
        zones: dict[str, int] = {}
        spill: dict[str, int] = {}
        moved: list[str] = []
        facts: list[Any] = []  # what Explanation unpacks per endpoint, flat: one per pool
        for track in rows:
            key = track.key
            weight = int(track.raw * factor + 0.5) or 1
            weights[key] = weight
            zone = track.zone
            if lower and track.state == SATURATED:
                moved.append(key)
                spill[zone] = spill.get(zone, 0) + weight
            else:
                zones[zone] = zones.get(zone, 0) + weight
            facts += (
                key,
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
            explain=Explanation(facts, saturated, p),
            saturation=Saturation.of(rows),
        )


def _most_pressed_first(track: Track) -> tuple[float, str]:
    return -(track.pressure or 0.0), track.key
