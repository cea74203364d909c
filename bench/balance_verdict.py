"""The balancing benchmark's verdicts: the issue's targets, checked for our strategies against
every other one, in one run or on the medians of several.

One run's p99 rests on the few slowest of a few hundred requests, and two runs of the same
code on this machine differ by more than some of the margins the targets ask about. So with
`--repeats N` the verdict is taken on the medians of the N runs, and each target also says in
how many of the runs it held on its own: a target met on the medians but in one run of three
is a coin toss, not a result.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

#: A cell's figures that combine across runs by their median.
FIGURES = (
    "offered_rps",
    "completed_rps",
    "output_tps",
    "p50",
    "p95",
    "p99",
    "ttft_p50",
    "ttft_p95",
    "ttft_p99",
    "error_rate",
    "saturated_share",
    "queued_share",
    "generator_lag_p99",
    "cpu_share",
)
#: Figures whose range across runs is kept beside the median.
SPREAD = ("p99", "saturated_share", "error_rate")
OURS = ("orca-rr", "orca-lr")

#: strategy name -> offered load -> that cell's figures
Cells = dict[str, dict[float, dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Verdict:
    ours: str
    target: str
    outcome: str  # MET, TIED (...), NOT MET
    detail: str

    def __str__(self) -> str:
        return f"{self.ours}: {self.target}: {self.outcome} ({self.detail})"


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return ">cut" if math.isinf(seconds) else f"{seconds * 1000:.0f}"


def pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def runs_of(results: list[dict[str, Any]]) -> list[Cells]:
    """The results of each run (their `run` number, 0 when absent) as strategy -> load -> cell."""
    runs: dict[int, Cells] = {}
    for result in results:
        cells = {cell["load"]: cell for cell in result["cells"]}
        runs.setdefault(result.get("run", 0), {})[result["strategy"]["name"]] = cells
    return [runs[number] for number in sorted(runs)]


def median_cells(runs: list[Cells]) -> Cells:
    """Each strategy's cells as the medians over the runs that have them, with the range of
    the `SPREAD` figures (`<figure>_range`: lowest, highest). An unanswered percentile (inf)
    sorts last, so it is the median only when half the runs or more had it; NaN (nothing
    measured) is left out."""
    combined: Cells = {}
    for name in dict.fromkeys(name for run in runs for name in run):
        loads = dict.fromkeys(load for run in runs for load in run.get(name, {}))
        for load in loads:
            cells = [run[name][load] for run in runs if load in run.get(name, {})]
            cell: dict[str, Any] = {"load": load, "runs": len(cells)}
            for key in FIGURES:
                values = sorted(
                    v for c in cells if not math.isnan(v := float(c.get(key, math.nan)))
                )
                cell[key] = statistics.median(values) if values else math.nan
                if key in SPREAD:
                    cell[f"{key}_range"] = (values[0], values[-1]) if values else None
            combined.setdefault(name, {})[load] = cell
    return combined


def verdicts(cells: Cells) -> list[Verdict]:
    """The issue's targets for each of our strategies: at 90 % load, p99 at least 30 % below
    round robin and no worse than least request and CS-WRR, and fewer requests on saturated
    servers than every other strategy; at 110 %, fewer errors than every other strategy."""
    others = {n: c for n, c in cells.items() if n not in OURS}
    found = []
    for ours in OURS:
        at90, at110 = cells.get(ours, {}).get(0.9), cells.get(ours, {}).get(1.1)
        if at90 is not None:
            rr = others.get("rr", {}).get(0.9)
            if rr is not None:
                outcome = _at_most(at90["p99"], 0.7 * rr["p99"])
                detail = f"{ms(at90['p99'])} vs {ms(rr['p99'])} ms"
                found.append(Verdict(ours, "p99 at 90% >= 30% below rr", outcome, detail))
            for name in ("lr", "cswrr"):
                other = others.get(name, {}).get(0.9)
                if other is not None:
                    outcome = _at_most(at90["p99"], other["p99"])
                    detail = f"{ms(at90['p99'])} vs {ms(other['p99'])} ms"
                    found.append(Verdict(ours, f"p99 at 90% no worse than {name}", outcome, detail))
            target = "fewer requests on saturated servers at 90% than all"
            found.append(_fewer(ours, target, "saturated_share", at90, 0.9, others))
        if at110 is not None:
            target = "fewer errors at 110% than all"
            found.append(_fewer(ours, target, "error_rate", at110, 1.1, others))
    return [v for v in found if v is not None]


def verdict_lines(runs: list[Cells]) -> list[str]:
    """One run: its verdicts. Several: the verdicts on the medians, each with the number of
    runs in which that target was met on its own."""
    if len(runs) == 1:
        return [str(v) for v in verdicts(runs[0])]
    met: dict[tuple[str, str], int] = {}
    for run in runs:
        for v in verdicts(run):
            met[v.ours, v.target] = met.get((v.ours, v.target), 0) + (v.outcome == "MET")
    return [
        f"{v} on medians; met in {met.get((v.ours, v.target), 0)} of {len(runs)} runs"
        for v in verdicts(median_cells(runs))
    ]


def _fewer(
    ours: str, target: str, key: str, cell: dict, load: float, others: Cells
) -> Verdict | None:
    """MET: strictly fewer than every other strategy; TIED: none had fewer, one as few."""
    rivals = [cells[load][key] for cells in others.values() if load in cells]
    if not rivals:
        return None
    mine = cell[key]
    outcome = "MET" if all(mine < r for r in rivals) else "TIED" if mine <= min(rivals) else None
    listed = ", ".join(pct(r) + "%" for r in rivals)
    return Verdict(ours, target, outcome or "NOT MET", f"{pct(mine)}% vs {listed}")


def _at_most(mine: float, bound: float) -> str:
    """A latency target: an unanswered percentile (inf) meets none, even against another."""
    if math.isinf(mine):
        return "TIED (both over the cut-off)" if math.isinf(bound) else "NOT MET"
    return "MET" if mine <= bound else "NOT MET"
