"""The balancing benchmark's measurements: one open-loop phase spread over the Envoys, a load
cell's figures, and the adaptation run (a server slowed down and recovered, in cycles).

Pure functions over what the phase recorded (client outcomes, server-side admissions), so
the figures are tested without servers.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.balance_fleet import MODEL, Admission
from bench.balance_load import LengthMix, latency_summary
from xds_lab.loadgen import OK, Outcome, percentile, poisson_schedule, send

__all__ = [
    "RECOVERED_SHARE",
    "RECOVERY_WINDOW",
    "Cycle",
    "Phase",
    "cell_figures",
    "count",
    "cycle_figures",
    "recovery_intervals",
    "run_phase",
    "share",
    "summarize_cycles",
    "victim_share",
]

#: A recovered server has at least this fraction of its share before the slowdown back...
RECOVERED_SHARE = 0.8
#: ... over this many report intervals.
RECOVERY_WINDOW = 3


@dataclass(slots=True)
class Phase:
    """One open-loop phase: its schedule's outcomes and what it cost the generator."""

    start: float
    outcomes: list[Outcome] = field(default_factory=list)
    cpu: float = 0.0  # process CPU seconds over the phase (this loop runs servers + clients)
    wall: float = 0.0


async def run_phase(
    session: aiohttp.ClientSession,
    urls: list[str],
    spread: str,
    rate: float,
    duration: float,
    rng: random.Random,
    mix: LengthMix,
    grace: float,
    timeout: float,
    at_offset: dict[float, Callable[[], Any]] | None = None,
) -> Phase:
    """Send a Poisson schedule, request i to Envoy `urls[i % N]` (`spread` "rr") or to a
    random one ("random"), then wait up to `grace` s for the stragglers (cut off after).

    `at_offset`: callables run when the phase reaches that many seconds (the slowdowns).
    """
    schedule = poisson_schedule(rate, duration, rng, mix)  # a LengthMix draws as a Mix does
    picker = random.Random(rng.random())
    turn = itertools.cycle(urls)
    events = sorted((at_offset or {}).items())
    cpu0 = time.process_time()
    phase = Phase(start=time.monotonic())
    tasks = []
    for request in schedule:
        while events and events[0][0] <= request.at:
            events.pop(0)[1]()
        delay = phase.start + request.at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        outcome = Outcome(request, sent=now, lag=now - phase.start - request.at)
        phase.outcomes.append(outcome)
        url = next(turn) if spread == "rr" else picker.choice(urls)
        tasks.append(asyncio.create_task(send(session, url, outcome, MODEL, timeout)))
    for _, action in events:
        action()
    end = phase.start + duration
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.0, end + grace - time.monotonic()))
    for task in tasks:
        task.cancel()  # unanswered by the cut-off: counted as timed out
    await asyncio.gather(*tasks, return_exceptions=True)
    phase.cpu = time.process_time() - cpu0
    phase.wall = time.monotonic() - phase.start
    return phase


def share(flags: Iterable[bool]) -> float:
    values = list(flags)
    return sum(values) / len(values) if values else math.nan


def count(names: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def cell_figures(
    phase: Phase, warmup: float, measure: float, admissions: list[Admission]
) -> dict[str, Any]:
    """Figures over the measured window [start + warmup, start + warmup + measure)."""
    lo, hi = phase.start + warmup, phase.start + warmup + measure
    measured = [o for o in phase.outcomes if lo <= o.sent < hi]
    finished = [o for o in phase.outcomes if o.status == OK and lo <= o.finished < hi]
    failed = sum(o.status != OK for o in measured)
    arrived = [a for a in admissions if lo <= a.at < hi]
    lags = sorted(o.lag for o in phase.outcomes)
    return {
        "sent": len(measured),
        "completed_rps": len(finished) / measure,
        "output_tps": sum(o.output_tokens for o in finished) / measure,
        **latency_summary(measured),
        "errors": sum(o.status == "error" for o in measured),
        "timeouts": sum(o.status == "timeout" for o in measured),
        "error_rate": failed / len(measured) if measured else math.nan,
        "saturated_share": share(a.saturated for a in arrived),
        "queued_share": share(a.queued for a in arrived),
        "per_server": count(a.server for a in arrived),
        "generator_lag_p99": percentile(lags, 99),
        "cpu_share": phase.cpu / phase.wall if phase.wall else math.nan,
    }


@dataclass(frozen=True, slots=True)
class Cycle:
    """One slowdown of the victim: slowed at `slowed`, recovered at `recovered` (monotonic)."""

    slowed: float
    recovered: float
    end: float


def victim_share(arrivals: list[tuple[float, bool]], lo: float, hi: float) -> float:
    """The victim's share of the arrivals (`(time, to_victim)`) in [lo, hi)."""
    return share(victim for at, victim in arrivals if lo <= at < hi)


def recovery_intervals(
    arrivals: list[tuple[float, bool]], cycle: Cycle, interval: float, before: float
) -> int | None:
    """Report intervals after the recovery until the victim has its share back: the first k
    such that its share of the arrivals over the RECOVERY_WINDOW intervals from
    `recovered + k * interval` is at least RECOVERED_SHARE of `before` (its share before any
    slowdown). A window of a few intervals, not one, so that a second's handful of arrivals
    does not decide; None: not back within the cycle."""
    k = 0
    while cycle.recovered + (k + RECOVERY_WINDOW) * interval <= cycle.end + 1e-9:
        start = cycle.recovered + k * interval
        share_then = victim_share(arrivals, start, start + RECOVERY_WINDOW * interval)
        if share_then >= RECOVERED_SHARE * before:
            return k
        k += 1
    return None


def cycle_figures(
    arrivals: list[tuple[float, bool]], cycles: list[Cycle], baseline: float, interval: float
) -> list[dict[str, Any]]:
    """Per cycle: the victim's mean share over the whole slowed stretch (reaction included)
    and over the recovered one, and the recovery in report intervals."""
    return [
        {
            "share_slowed": victim_share(arrivals, c.slowed, c.recovered),
            "share_recovered": victim_share(arrivals, c.recovered, c.end),
            "recovery_intervals": recovery_intervals(arrivals, c, interval, baseline),
        }
        for c in cycles
    ]


def summarize_cycles(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range of the cycles' figures; an unrecovered cycle counts as infinite."""
    out: dict[str, Any] = {}
    for key in ("share_slowed", "share_recovered"):
        values = sorted(v for f in figures if not math.isnan(v := f[key]))
        out[key] = statistics.median(values) if values else math.nan
        out[f"{key}_range"] = (values[0], values[-1]) if values else None
    intervals = sorted(
        math.inf if f["recovery_intervals"] is None else float(f["recovery_intervals"])
        for f in figures
    )
    out["recovery_intervals"] = statistics.median(intervals) if intervals else math.nan
    return out
