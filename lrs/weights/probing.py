"""Probing starved endpoints, so that the headroom policy converges from any split.

The policy weights an endpoint by `capacity = rps / utilization`. That estimate is sound
when the endpoint's load signal moves with its traffic: more requests, more pressure, the
ratio stays put. When the signal does not follow traffic (a KV cache that holds another
tenant's work, a metric sent out of band or late, a server that just recovered and still
shows its old level) the estimate is proportional to the endpoint's own throughput: an
endpoint starved of traffic looks small, is weighted small and stays starved, whatever
split it started from. Observed on a real Envoy: three servers all reporting a KV cache of
0.2, one of them left at ~1 % of the requests for as long as anyone watched.

So an endpoint whose capacity estimate sits well below its fair share (the other
endpoints' mean capacity per static weight, times its own) while it has headroom is
probed: its weight is raised by as much traffic as would lift its pressure by at most
`explore_pressure` if the signal did follow traffic (at most half as much again: the harm
a probe can do is that, for a report interval or two). The next reports decide, by how its
latest pressure moved against its latest rate (either way: the pool may move traffic too):

- the pressure moved with the rate (elasticity >= 1/2): the estimate was right, the
  endpoint really is small; the probe ends and the endpoint is not probed again for
  `explore_cooldown` seconds;
- it stayed put (|elasticity| < 1/4): the estimate only mirrored the traffic the endpoint
  was given. For `explore_cooldown` seconds it is UNRESPONSIVE: weighted at the median
  capacity of the endpoints whose estimates are not in doubt (of all of them, if every one
  is unresponsive: equal signals, equal shares), as CS-WRR gives a host without a usable
  weight the median one, but never below its own estimate when it was starved (a fast server
  among slow ones) nor above it when it was overfed. By the end its traffic, and so its own
  estimate, is at that share;
- anything else (pressure moving against the traffic: noise) proves nothing: the estimate
  stands, as after an elastic verdict;
- its latest pressure rose by half (or by `explore_pressure`) from where the probe found
  it, or to the saturation exit level, or is no longer about the pool's typical pressure,
  at any time: the probe or the neutral weight ends and the cooldown starts (a signal that
  lags only looked flat; a server with a queue the others lack is slow, flat or not).

In a pool where a flat signal was found, an overfed endpoint (estimate well above its fair
share) is probed the other way, with 30 % less traffic, and judged the same way; as that
traffic goes to everyone else, only one such probe runs at a time and only while no other
probe is under way. (Where every probe found signals that follow traffic, the estimates
are sound and overfed endpoints are simply faster ones: nothing to learn.) Starved
endpoints are probed side by side (one at a time was measured slower to converge). As
probes side by side take traffic from each other, a probe that moved too little traffic
to judge asks for twice as much (up to twice the endpoint's traffic); after three reports
it takes the lift away and judges by the traffic that goes; after six it is given up.

Envoy's load-aware locality routing keeps a fixed 3 % exploration share for the same
reason; a share sized by the measured response converges in a few reports instead of
tens, and costs nothing on endpoints whose estimate is near their fair share.
"""

from __future__ import annotations

import math
from typing import Final

from lrs.weights.params import Params
from lrs.weights.tracking import Track

__all__ = ["PROBING", "UNRESPONSIVE", "explore"]

#: State of an endpoint whose weight carries a probe's lift (else as ACTIVE or HELD).
PROBING: Final = "probing"
#: State of an endpoint whose signal a probe found flat: weighted at the others' mean.
UNRESPONSIVE: Final = "unresponsive"
#: Estimate below this share of the fair capacity: starved enough to probe.
_STARVED: Final = 0.9
#: Change of the rate (log) enough to judge the signal's response: 15 %, either way.
_MOVED: Final = math.log(1.15)
#: Pressure change over rate change (in logs) from which the signal counts as following.
_ELASTIC: Final = 0.5
#: ... and below which (either way) it counts as flat; in between, or negative beyond,
#: the probe proves nothing and the estimate stands.
_FLAT: Final = 0.25
#: Share of an overfed endpoint's traffic a probe takes away.
_LESS: Final = 0.3
#: Pressure differences below this are noise.
_NOISE: Final = 0.05
#: Reports after which a probe that moved no traffic is given up.
_PATIENCE: Final = 3


def explore(rows: list[Track], now: float, estimated: tuple[str, ...], p: Params) -> None:
    """Probes starved endpoints and weighs unresponsive ones: sets `lift` (capacity units
    added to the weight) and, for unresponsive endpoints, `capacity`; marks both states.
    Steps once per new report of an endpoint; `estimated` are the states that carry a
    capacity estimate (ACTIVE, HELD)."""
    weighed = []
    for track in rows:
        if track.state in estimated and track.capacity is not None:
            weighed.append(track)
        elif track.probe_rps is not None or track.deaf_until != -math.inf:
            track.end_probe()
            track.deaf_until = -math.inf
    count = len(weighed)
    if p.explore_pressure <= 0.0 or count < 2:
        for track in weighed:
            track.end_probe()
            track.deaf_until = -math.inf
        return
    typical = sum(t.latest_pressure for t in weighed) / count
    deaf = probing = False
    for track in weighed:
        if track.probe_rps is not None or track.deaf_until > now:
            if _alive(track, typical, p):
                _cool(track, now, p)  # the signal moved after all (it lagged): trust it
            else:
                probing = probing or track.probe_rps is not None
                deaf = deaf or track.deaf_until > now
    # Less traffic to an overfed endpoint is more for all the others: only in a pool where
    # a flat signal was found, one such probe at a time, none while another is under way.
    downward = deaf and not probing
    per_static = [(t.capacity or 0.0) / max(t.static_weight, 1) for t in weighed]
    unit = 0.0  # the median capacity per static weight of the estimates not in doubt
    if deaf:
        unit = _median(
            [v for v, t in zip(per_static, weighed, strict=True) if t.deaf_until <= now]
            or per_static
        )
        per_static = [
            unit if t.deaf_until > now else v for v, t in zip(per_static, weighed, strict=True)
        ]
    # Each endpoint's fair share is the mean of the others: the sum over all, less its own.
    total = sum(per_static)
    for track, own in zip(weighed, per_static, strict=True):
        static = max(track.static_weight, 1)
        if track.deaf_until > now:
            track.capacity = _unresponsive(track, unit * static)
            track.state = UNRESPONSIVE
            continue
        if track.observed > track.probed_at:
            track.probed_at = track.observed
            _step(track, now, static * (total - own) / (count - 1), downward, typical, p)
            downward = downward and track.probe_rps is None
            if track.deaf_until > now:  # judged just now: weighted as such from this call
                unit = unit or _median(per_static)
                track.capacity = _unresponsive(track, unit * static)
                track.state = UNRESPONSIVE
                continue
        if track.lift:
            track.state = PROBING


def _unresponsive(track: Track, neutral: float) -> float:
    """An unresponsive endpoint's capacity: the neutral one, but only in the direction its
    probe went. A starved endpoint's own estimate is a floor (it mirrors the little traffic
    it got; a fast server among slow ones must not fall to their median), an overfed one's a
    ceiling."""
    own = track.capacity or 0.0
    return max(own, neutral) if track.probe_up else min(own, neutral)


def _median(values: list[float]) -> float:
    """The upper median, as the policy's neutral weight takes it."""
    return sorted(values)[len(values) // 2]


def _alive(track: Track, typical: float, p: Params) -> bool:
    """Whether a probed or unresponsive endpoint's latest pressure shows that its signal
    moves: half again above where the probe found it, or by `explore_pressure`, or to the
    saturation exit, or no longer level with the pool's (`_level`). The latest report,
    not the average: one coming down from saturation lags far above it."""
    if track.probe_rps is None and track.deaf_until == -math.inf:
        return False
    latest, start = track.latest_pressure, track.probe_level
    return (
        latest >= 1.5 * start + _NOISE
        or latest >= start + p.explore_pressure
        or latest >= p.saturation_exit
        or not _level(latest, typical)
    )


def _level(pressure: float, typical: float) -> bool:
    """Whether a pressure is about the pool's typical one: only then do flat signals mean
    as much headroom as the others have (a slowed server with a queue the others do not
    have is slow, whether or not its queue grew under a probe)."""
    return pressure <= 1.25 * typical + _NOISE


def _step(track: Track, now: float, fair: float, downward: bool, typical: float, p: Params) -> None:
    """One report's worth of probing for one endpoint (see the module docstring)."""
    capacity = track.capacity or 0.0
    pressure = track.pressure or 0.0
    # The verdict reads the latest report itself: the averages would take several reports
    # to show a change the report already shows.
    # Unfloored: pressure below min_utilization still shows whether it follows traffic.
    rps = track.load.rps if track.load is not None else 0.0
    latest = track.latest_pressure
    if track.probe_rps is not None:  # a probe is under way
        track.probe_reports += 1
        moved = math.log(rps / track.probe_rps) if rps > 0.0 < track.probe_rps else math.inf
        if abs(moved) >= _MOVED:
            # No pressure at all says nothing either way: the utilization floor already
            # makes such an endpoint draw traffic, so its estimate stands.
            elasticity = (
                math.log(latest / track.probe_level) / moved
                if latest > 0.0 < track.probe_level
                else _ELASTIC
            )
            _cool(track, now, p)
            # Flat: pressure stayed put while traffic moved. Pressure moving the other way
            # is noise (a batch's prompts, a preemption), which proves nothing either way.
            if abs(elasticity) < _FLAT and _level(latest, typical):
                track.deaf_until = now + p.explore_cooldown  # it only mirrored its traffic
        elif track.probe_reports >= 2 * _PATIENCE:
            _cool(track, now, p)  # the weight moved no traffic: nothing to learn here
        elif track.probe_reports == _PATIENCE:
            # The pool moved under the probe (other endpoints probed or weighted anew):
            # measure again from here, taking the lift away, which moves traffic too.
            track.probe_rps, track.probe_level, track.lift = rps, latest, 0.0
        elif track.lift > 0.0:
            # Other probes took their part of the traffic: ask for more, up to twice as much.
            track.lift = min(2.0 * track.lift, capacity)
        return
    if now < track.cooldown_until:
        return
    if capacity < _STARVED * fair:
        if min(pressure, latest) >= p.saturation_exit - p.explore_pressure:
            return  # no headroom to probe with (by the latest report: the average lags)
        # As much more traffic as would raise its pressure by `explore_pressure` if it
        # follows (at least 28 %, as pressure is below 0.7 here: enough to see), at most
        # half as much again (more only if the pool takes it back, see above).
        level = max(pressure, p.min_utilization)
        track.lift = capacity * min(p.explore_pressure / level, 0.5)
    elif downward and capacity * _STARVED > fair:
        track.lift = -_LESS * capacity
    else:
        return
    track.probe_rps, track.probe_level, track.probe_reports = rps, latest, 0
    track.probe_up = track.lift > 0.0


def _cool(track: Track, now: float, p: Params) -> None:
    track.end_probe()
    track.deaf_until = -math.inf
    track.cooldown_until = now + p.explore_cooldown
