"""The balancing benchmark's verdicts: issue 15's targets (item 8), judged from a run's JSON.

    .venv/bin/python bench/balance_verdict.py [bench/results/balance.json]

The targets, each for both of our strategies (orca-rr, orca-lr) on the medians of the run:
  - at 90 % load with N > 1 Envoys (the largest N run): p99 at least 20 % below least
    request's, and below CS-WRR's (both variants: batch occupancy and KV cache);
  - at 90 % load with 1 Envoy: p99 no worse than least request's and CS-WRR's;
  - at 90 % and at 110 %, for every N: fewer requests reaching a saturated server (KV cache
    over 95 %) than every other strategy;
  - for every N: a slowed server's share back within 3 report intervals after it recovers
    (median over the adaptation cycles of every repeat); not judged when its share did not
    fall while it was slowed (nothing to recover).

One run's p99 rests on its slowest 1 % of a few hundred requests, and two runs of the same
code on this machine differ by more than some of these margins. With `--repeats N` the
verdict is taken on the medians of the N runs, and each target also says in how many of the
runs it held on its own: a target met on the medians but in one run of three is a coin toss.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "OURS",
    "Verdict",
    "adaptation_summary",
    "median_cells",
    "ms",
    "pct",
    "runs_of",
    "verdict_lines",
    "verdicts",
]

#: A cell's figures that combine across runs by their median.
FIGURES = (
    "sent",
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
    "load_average",
)
#: Figures whose range across runs is kept beside the median.
SPREAD = ("p99", "completed_rps", "error_rate", "saturated_share")
OURS = ("orca-rr", "orca-lr")
CSWRRS = ("cswrr", "cswrr-kv")
#: The targets' thresholds.
P99_BELOW_LR = 0.8  # with N Envoys: at least 20 % below least request
RECOVERY_INTERVALS = 3
#: A share below this fraction of the share before the slowdown has fallen (as in
#: balance_measure.RECOVERED_SHARE; not imported: this module reads JSON, nothing else).
RECOVERED_SHARE = 0.8
LOADS = (0.9, 1.1)

#: (Envoy count, strategy name)
Key = tuple[int, str]
#: (Envoy count, strategy) -> offered load -> that cell's figures
Cells = dict[Key, dict[float, dict[str, Any]]]


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


def key_of(result: dict[str, Any]) -> Key:
    return int(result.get("envoys", 1)), str(result["strategy"]["name"])


def runs_of(results: list[dict[str, Any]]) -> list[Cells]:
    """The results of each run (their `run` number, 0 when absent) as key -> load -> cell."""
    runs: dict[int, Cells] = {}
    for result in results:
        cells = {float(cell["load"]): cell for cell in result["cells"]}
        runs.setdefault(result.get("run", 0), {})[key_of(result)] = cells
    return [runs[number] for number in sorted(runs)]


def _values(items: list[Any]) -> list[float]:
    """As floats ("inf"/"nan" from the JSON too), sorted, NaN (nothing measured) left out:
    an unanswered percentile (inf) sorts last, so it is the median only when half the runs
    or more had it."""
    return sorted(v for item in items if not math.isnan(v := float(item)))


def median_cells(runs: list[Cells]) -> Cells:
    """Each key's cells as the medians over the runs that have them, with the range of the
    `SPREAD` figures (`<figure>_range`: lowest, highest)."""
    combined: Cells = {}
    for key in dict.fromkeys(key for run in runs for key in run):
        for load in dict.fromkeys(load for run in runs for load in run.get(key, {})):
            cells = [run[key][load] for run in runs if load in run.get(key, {})]
            cell: dict[str, Any] = {"load": load, "runs": len(cells)}
            for name in FIGURES:
                values = _values([c.get(name, math.nan) for c in cells])
                cell[name] = statistics.median(values) if values else math.nan
                if name in SPREAD:
                    cell[f"{name}_range"] = (values[0], values[-1]) if values else None
            combined.setdefault(key, {})[load] = cell
    return combined


def adaptation_summary(results: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Per key, over every adaptation cycle of every run: the victim's share before, while
    slowed and after (median and range), and the median recovery in report intervals (a
    cycle that never recovered counts as infinite)."""
    pooled: dict[Key, dict[str, list[float]]] = {}
    for result in results:
        adaptation = result.get("adaptation")
        if adaptation is None:
            continue
        into = pooled.setdefault(key_of(result), {"before": [], "slowed": [], "back": []})
        into["before"].append(float(adaptation["share_before"]))
        for cycle in adaptation["cycles"]:
            into["slowed"].append(float(cycle["share_slowed"]))
            back = cycle["recovery_intervals"]
            into["back"].append(math.inf if back is None else float(back))
    summary = {}
    for key, lists in pooled.items():
        entry: dict[str, Any] = {"cycles": len(lists["back"])}
        for name, items in lists.items():
            values = _values(items)
            entry[name] = statistics.median(values) if values else math.nan
            entry[f"{name}_range"] = (values[0], values[-1]) if values else None
        summary[key] = entry
    return summary


def verdicts(cells: Cells, adaptation: dict[Key, dict[str, Any]]) -> list[Verdict]:
    """The targets for each of our strategies that this run's keys allow judging."""
    counts = sorted({n for n, _ in cells} | {n for n, _ in adaptation})
    many = counts[-1] if counts and counts[-1] > 1 else None
    found: list[Verdict] = []
    for ours in OURS:
        if many is not None:
            found += _p99(ours, cells, many, "lr", P99_BELOW_LR, ">= 20% below")
            for other in CSWRRS:
                found += _p99(ours, cells, many, other, 1.0, "below", strict=True)
        if 1 in counts:
            for other in ("lr", *CSWRRS):
                found += _p99(ours, cells, 1, other, 1.0, "no worse than")
        for n in counts:
            for load in LOADS:
                found += _fewer_saturated(ours, cells, n, load)
            if (n, ours) in adaptation:
                found.append(_recovery(ours, n, adaptation[n, ours]))
    return found


def _envoys(n: int) -> str:
    return f"{n} Envoy{'s' if n > 1 else ''}"


def _p99(
    ours: str,
    cells: Cells,
    n: int,
    other: str,
    factor: float,
    words: str,
    strict: bool = False,
) -> list[Verdict]:
    mine, theirs = cells.get((n, ours), {}).get(0.9), cells.get((n, other), {}).get(0.9)
    if mine is None or theirs is None:
        return []
    a, b = float(mine["p99"]), float(theirs["p99"])
    if math.isinf(a):
        outcome = "TIED (both over the cut-off)" if math.isinf(b) else "NOT MET"
    else:
        outcome = "MET" if (a < factor * b if strict else a <= factor * b) else "NOT MET"
    target = f"p99 at 90% with {_envoys(n)} {words} {other}"
    return [Verdict(ours, target, outcome, f"{ms(a)} vs {ms(b)} ms")]


def _fewer_saturated(ours: str, cells: Cells, n: int, load: float) -> list[Verdict]:
    """MET: strictly fewer than every other strategy; TIED: none had fewer, one as few."""
    mine = cells.get((n, ours), {}).get(load)
    rivals = {
        name: float(by_load[load]["saturated_share"])
        for (count, name), by_load in cells.items()
        if count == n and name != ours and load in by_load
    }
    if mine is None or not rivals:
        return []
    value = float(mine["saturated_share"])
    low = min(rivals.values())
    outcome = "MET" if value < low else "TIED" if value <= low else "NOT MET"
    listed = ", ".join(f"{name} {_share(v)}" for name, v in rivals.items())
    target = f"fewer requests on saturated servers at {100 * load:.0f}% with {_envoys(n)}"
    return [Verdict(ours, target, outcome, f"{_share(value)} vs {listed}")]


def _share(value: float) -> str:
    """Two decimals: a verdict of "fewer" must not print two equal numbers."""
    return "-" if math.isnan(value) else f"{100 * value:.2f}%"


def _recovery(ours: str, n: int, entry: dict[str, Any]) -> Verdict:
    back = entry["back"]
    low, high = entry["back_range"] or (math.nan, math.nan)
    outcome = "MET" if back <= RECOVERY_INTERVALS else "NOT MET"
    if not entry["slowed"] < RECOVERED_SHARE * entry["before"]:  # also NaN: nothing arrived
        outcome = "NOT JUDGED (its share did not fall while slowed: nothing to recover)"
    detail = (
        f"median {back:g} intervals over {entry['cycles']} cycles (range {low:g}-{high:g}); "
        f"share {pct(entry['before'])}% before, {pct(entry['slowed'])}% while slowed"
    )
    target = f"slowed server's share back within {RECOVERY_INTERVALS} report intervals"
    return Verdict(ours, f"{target} with {_envoys(n)}", outcome, detail)


def verdict_lines(results: list[dict[str, Any]]) -> list[str]:
    """One run: its verdicts. Several: the verdicts on the medians, each with the number of
    runs in which that target was met on its own."""
    runs = runs_of(results)
    adaptation = adaptation_summary(results)
    if len(runs) <= 1:
        return [str(v) for v in verdicts(runs[0] if runs else {}, adaptation)]
    met: dict[tuple[str, str], int] = {}
    for number, run in enumerate(runs):
        own = adaptation_summary([r for r in results if r.get("run", 0) == number])
        for v in verdicts(run, own):
            met[v.ours, v.target] = met.get((v.ours, v.target), 0) + (v.outcome == "MET")
    return [
        f"{v} on medians; met in {met.get((v.ours, v.target), 0)} of {len(runs)} runs"
        for v in verdicts(median_cells(runs), adaptation)
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path(__file__).resolve().parent / "results/balance.json"
    out = json.loads(path.read_text())
    lines = verdict_lines(out["results"])
    print(f"{path}: {out.get('command', '')}")
    print("\n".join(lines) if lines else "nothing to judge: no orca-rr/orca-lr cells")
    met = sum(": MET (" in line for line in lines)
    print(f"{met} of {len(lines)} targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
