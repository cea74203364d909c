"""Shedding at saturation: how much of a pool's traffic Envoy answers with 503 itself.

When every server of a pool is saturated, weights cannot help: any share sent anywhere
joins a queue, and under an open-loop load above capacity the queues (and the latency of
every request served) grow without bound. Envoy can refuse a fraction of a cluster's
requests at the edge, before they reach a server: `ClusterLoadAssignment.policy.
drop_overloads` (a 503 with `x-envoy-drop-overload: true`, response flag DO, counted in
LRS as dropped). So each weight tick, a pool with `shedding:` in its config asks its
`Shedder` which fraction to drop, and the fraction rides on the pool's PoolWeights to EDS.

The law, per pool, from the policy's `Saturation` (the least endpoint pressure, the pool's
capacity) and the requests Envoy issued to the pool (summed over every reporting Envoy):

* offered = issued / (1 - fraction in force): Envoy drops uniformly at random, so what it
  issued is the rest of what it was offered (LRS also carries the dropped count, but the
  load store keeps no cluster-level figures; this needs none);
* while every endpoint is saturated (least pressure >= 1), the target is 1 - capacity /
  offered, the fraction that leaves the pool its capacity. A saturated server's capacity is
  its throughput less the rate that drains its queue in `drain_time` (lrs.weights.headroom),
  so shedding also drains the backlog. Shedding starts (from 0) only for a target of at
  least ENGAGE: rates over a few seconds are a few percent off either way, so a smaller
  excess is noise as often as not (a real one makes the queues grow, which lowers the
  capacity estimate until the target passes ENGAGE); and it starts on the tick it is seen,
  not at the end of a measuring period (below), as every second adds the excess to the queues;
* while some endpoint has room, the fraction is never raised, and the estimate is not
  trusted: below saturation a server's pressure says little of its capacity (a queue is
  empty at any load below it), and the extrapolated capacity is far too high. So the
  fraction holds, and once the least pressure is below the policy's `saturation_exit` (the
  level that returns a saturated endpoint to rotation) it steps down by the dead band
  (below), a step per measuring period: shedding overshot (the queues drained) or the load
  fell. Where the offered load is below the capacity last seen while saturated in this
  episode, the load fell and the fraction goes straight to what that capacity leaves (0
  when the load is under it);
* bounded by the pool's `max_drop`; below MIN_DROP it is 0.

Against noise: the fraction is decided once per measuring period of `settle` seconds, from
the mean of the targets of its ticks; after a change the fraction holds for `settle` seconds
before a period starts (at least the load store's window, so the rates measured then are
those under the fraction in force, not a mix of two); and a change smaller than MIN_CHANGE,
or than BAND of the fraction in force, is not made (rates over a few seconds are a few
percent off, and the error of the target grows with the fraction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from lrs.weights.signals import PPM, Saturation

__all__ = ["BAND", "DROP_CATEGORY", "ENGAGE", "MIN_CHANGE", "MIN_DROP", "Shedder", "Shedding"]

#: The drop_overloads category: Envoy reports drops under it in LRS.
DROP_CATEGORY: Final = "overload"
#: The smallest change of the fraction worth an EDS push.
MIN_CHANGE: Final = 0.05
#: The least fraction kept while shedding: a smaller target is 0.
MIN_DROP: Final = 0.03
#: The least target that starts shedding in a pool that is not shedding.
ENGAGE: Final = 0.1
#: Relative dead band: a change smaller than this share of the fraction in force is not made.
BAND: Final = 0.15
#: Fractions are published in steps of 0.1 % (EDS bytes stay the same for the same decision).
_QUANTUM: Final = 1000


@dataclass(frozen=True, slots=True)
class Shedding:
    """A pool's `shedding:` settings in the snapshot file (absent: the pool never sheds).

    max_drop: the largest fraction of the pool's requests Envoy may refuse, in (0, 1).
    settle: seconds the fraction holds after a change, so the next decision reads load
    measured under it (at least the load window: 2 s, or 2 x --lrs-interval when longer).
    """

    max_drop: float = 0.5
    settle: float = 5.0


class Shedder:
    """One pool's drop fraction, decided each weight tick (module docstring: the law).

    Deterministic: time comes from `now`, as with weight policies.
    """

    def __init__(self, settings: Shedding, release: float) -> None:
        self.settings = settings
        #: Least pressure below which the pool has headroom again (the policy's saturation_exit).
        self.release = release
        self.fraction = 0.0  # what EDS carries now
        self.changed_at = -math.inf
        self._since: float | None = None  # when the measuring period began
        self._last = -math.inf  # its latest tick
        self._seen = 0.0  # the capacity last seen saturated since shedding started
        self._sum = 0.0  # of the ticks' targets in the period
        self._ticks = 0

    def follow(self, drop_ppm: int) -> None:
        """The fraction EDS carries was set elsewhere (restored after a restart, another
        replica's): offered load is computed with it from now on."""
        self.fraction = drop_ppm / PPM
        self._since, self._sum, self._ticks = None, 0.0, 0

    def update(self, saturation: Saturation | None, issued: float, now: float) -> int:
        """The fraction to publish now, in parts per million.

        Decided once per measuring period of `settle` seconds, from the mean of its ticks'
        targets; a period starts `settle` after a change, when the rates no longer mix the
        fraction before it. Shedding starts on the first tick whose target reaches ENGAGE."""
        if now >= self.changed_at + self.settings.settle:
            target = self._target(saturation, issued)
            if self._since is None or now - self._last > self.settings.settle:
                self._since, self._sum, self._ticks = now, 0.0, 0  # none yet, or a gap
            self._sum += target
            self._ticks += 1
            self._last = now
            if self.fraction == 0.0 and target >= ENGAGE:
                self._decide(target, now)  # a queue grows at the excess rate: start now
            elif now - self._since >= self.settings.settle:
                self._decide(self._sum / self._ticks, now)
        return round(self.fraction * PPM)

    def _decide(self, mean: float, now: float) -> None:
        self._since, self._sum, self._ticks = None, 0.0, 0
        fraction = self.fraction
        if not mean >= (MIN_DROP if fraction > 0.0 else ENGAGE):
            target = 0.0
        else:
            target = min(round(mean * PPM / _QUANTUM) * _QUANTUM / PPM, self.settings.max_drop)
        if abs(target - fraction) >= _band(fraction) or target == 0.0 < fraction:
            self.fraction, self.changed_at = target, now
        if self.fraction == 0.0:
            self._seen = 0.0  # the episode is over

    def _target(self, saturation: Saturation | None, issued: float) -> float:
        """The fraction this tick asks for (module docstring: the law), before the dead band,
        the bounds and the rounding; remembers a saturated pool's capacity for the release."""
        fraction = self.fraction
        if saturation is None or not issued > 0.0:
            return 0.0  # no evidence of saturation, or no traffic: nothing to shed
        offered = issued / (1.0 - fraction)
        capacity = saturation.capacity
        if saturation.pressure >= 1.0:
            self._seen = capacity
            return max(0.0, 1.0 - capacity / offered) if capacity > 0.0 else 1.0
        if not saturation.pressure >= self.release:  # NaN too: headroom is not shown
            fraction -= _band(fraction)
        return max(0.0, min(fraction, 1.0 - self._seen / offered))


def _band(fraction: float) -> float:
    """The least change of the fraction that is made (dead band)."""
    return max(MIN_CHANGE, BAND * fraction)
