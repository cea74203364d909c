"""Back-pressure for LRS: the reporting interval follows the CPU that ingest costs.

Every report costs the event loop CPU in proportion to its endpoint stats; a fleet that
reports faster than one core can merge would starve xDS. Instead of collapsing, the
service asks reporters for a longer `load_reporting_interval` while ingest uses more than
a budget (a fraction of one core), and a shorter one again, down to the configured
interval, once it uses well under it. Pure arithmetic on times it is given: no clock,
no tasks, so tests drive it with made-up times.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

__all__ = [
    "EARLY_FACTOR",
    "LOWER_BELOW",
    "MAX_EARLY",
    "MIN_CHANGE",
    "REPORT_BURST",
    "TARGET_SHARE",
    "IntervalGovernor",
    "ReportAllowance",
]

#: After a change, aim this far under the budget, so a steady load does not flap.
TARGET_SHARE: Final = 0.8
#: Lower the interval only once usage is under this share of the budget.
LOWER_BELOW: Final = 0.4
#: Ignore proposals within this relative distance of the current interval.
MIN_CHANGE: Final = 0.1
#: A reporter may send one report per this fraction of the asked interval, with a burst of
#: REPORT_BURST (a reconnect, jitter, a changed interval); reports past that are early.
EARLY_FACTOR: Final = 0.5
REPORT_BURST: Final = 3
#: Early reports in a row after which a stream is closed (RESOURCE_EXHAUSTED).
MAX_EARLY: Final = 20


class IntervalGovernor:
    """Decides the LRS interval from the ingest CPU seconds recorded over recent seconds.

    Usage is measured over `horizon` seconds plus two intervals (reports arrive once per
    interval per reporter, so shorter windows see only part of the fleet). After a change
    the history restarts: reporters apply a new interval on its arrival and report one
    interval later, so the old figures say nothing about the new rate.
    """

    def __init__(
        self, base: float, budget: float = 0.5, max_interval: float = 60.0, horizon: float = 5.0
    ) -> None:
        if not (base > 0 and budget > 0 and max_interval >= base and horizon > 0):
            raise ValueError("need base > 0, budget > 0, max_interval >= base, horizon > 0")
        self.base = base
        self.budget = budget
        self.max_interval = max_interval
        self.horizon = horizon
        self.interval = base
        self.changes = 0
        self._since = -math.inf  # start of the current history
        #: [whole second, CPU seconds of ingest during it], oldest first.
        self._seconds: deque[list[float]] = deque()

    @property
    def span(self) -> float:
        """Seconds of history usage is measured over at the current interval."""
        return self.horizon + 2 * self.interval

    def record(self, cpu: float, now: float) -> None:
        """Add `cpu` seconds of ingest work done at monotonic time `now`."""
        if self._since == -math.inf:
            self._since = now
        second = math.floor(now)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += cpu
        else:
            self._seconds.append([second, cpu])
        self._trim(now)

    def usage(self, now: float) -> float:
        """Cores' worth of ingest over the history (at most `span` seconds back)."""
        self._trim(now)
        elapsed = min(self.span, now - self._since)
        if not elapsed > 0:
            return 0.0
        return sum(cpu for _, cpu in self._seconds) / max(elapsed, 1.0)

    def review(self, now: float) -> float | None:
        """The new interval if it should change now, else None; a change restarts history."""
        if now - self._since < self.span:
            return None  # not a full history yet at this interval
        used = self.usage(now)
        overloaded = used > self.budget
        underused = used < self.budget * LOWER_BELOW and self.interval > self.base
        if not (overloaded or underused):
            return None
        wanted = self.interval * used / (self.budget * TARGET_SHARE)
        wanted = min(self.max_interval, max(self.base, round(wanted, 1)))
        if abs(wanted - self.interval) <= MIN_CHANGE * self.interval:
            return None
        self.interval = wanted
        self.changes += 1
        self._since = now
        self._seconds.clear()
        return wanted

    def _trim(self, now: float) -> None:
        oldest = math.floor(now - self.span)
        while self._seconds and self._seconds[0][0] < oldest:
            self._seconds.popleft()


class ReportAllowance:
    """One stream's side of the pace: reports sooner than its asked interval allows are
    early (a token bucket), so one reporter cannot make ingest, and with it everyone's
    interval, costlier by reporting faster than asked."""

    __slots__ = ("at", "early", "intervals", "tokens")

    def __init__(self) -> None:
        self.intervals = (0.0, 0.0)  # the interval asked for before, and now
        self.at = 0.0  # time the bucket was last topped up
        self.tokens = float(REPORT_BURST)  # reports it may send now
        self.early = 0  # early reports in a row

    def asked(self, seconds: float) -> None:
        self.intervals = (self.intervals[1], seconds)

    def take(self, now: float) -> bool:
        """Whether a report arriving at `now` is on time (else early).

        Envoy reports once per asked interval; right after the interval changes it may
        still be on the old one, so the shorter of the last two asked counts."""
        period = EARLY_FACTOR * min(i for i in self.intervals if i > 0)
        if self.at:
            self.tokens = min(float(REPORT_BURST), self.tokens + (now - self.at) / period)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.early = 0
            return True
        self.early += 1
        return False
