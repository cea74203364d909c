"""The balancing benchmark's tables, from a run's results: the text report `balance.py` prints
and the Markdown tables the README shows (so no figure there is typed in by hand).

    .venv/bin/python bench/balance_tables.py [bench/results/balance.json]   # Markdown
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.balance_verdict import (
    adaptation_summary,
    median_cells,
    ms,
    pct,
    runs_of,
    verdict_lines,
)

__all__ = ["HEADER", "adapt_row", "markdown", "report_lines", "row"]

HEADER = (
    f"{'strategy/N':11} {'load':>5} {'n':>5} {'p99':>6} {'done/s':>6} {'err%':>5} {'p50':>6} "
    f"{'p95':>6} {'ttft99':>6} {'sat%':>5} {'queue%':>6} {'lag99':>5} {'cpu':>4} {'load1':>5}"
)


def _f(cell: dict[str, Any], name: str) -> float:
    return float(cell.get(name, math.nan))


def row(label: str, c: dict[str, Any]) -> str:
    """One cell: request count, then the main outcomes (p99, throughput, errors), then the
    secondary ones, then the machine (generator lag, this process's CPU share, the machine's
    1-minute load average at the cell's end); latencies in ms, `>cut`: never answered."""
    return (
        f"{label:11} {100 * float(c['load']):4.0f}% {_f(c, 'sent'):5.0f} {ms(_f(c, 'p99')):>6} "
        f"{_f(c, 'completed_rps'):6.1f} {pct(_f(c, 'error_rate')):>5} {ms(_f(c, 'p50')):>6} "
        f"{ms(_f(c, 'p95')):>6} {ms(_f(c, 'ttft_p99')):>6} {pct(_f(c, 'saturated_share')):>5} "
        f"{pct(_f(c, 'queued_share')):>6} {ms(_f(c, 'generator_lag_p99')):>5} "
        f"{_f(c, 'cpu_share'):4.2f} {_f(c, 'load_average'):5.1f}"
    )


def adapt_row(label: str, a: dict[str, Any]) -> str:
    back = float(a["recovery_intervals"])
    return (
        f"{label:11} adaptation: {a['victim']} x{a['slowdown']:g} at {100 * a['load']:.0f}%: "
        f"share {pct(float(a['share_before']))}% before, "
        f"{pct(float(a['share_slowed']))}% while slowed, "
        f"{pct(float(a['share_recovered']))}% after; back within "
        f"{'never' if math.isinf(back) else f'{back:g}'} report intervals; "
        f"p99 while slowed {ms(float(a['p99_slowed']))} ms"
    )


def _label(result: dict[str, Any]) -> str:
    return f"{result['strategy']['name']}/{result.get('envoys', 1)}"


def report_lines(out: dict[str, Any]) -> list[str]:
    """Every cell as it ran, the medians when there were repeats, the adaptation rows, the
    verdicts and the run's conditions."""
    results = out["results"]
    lines = [HEADER]
    lines += [row(_label(r), c) for r in results for c in r["cells"]]
    lines += [adapt_row(_label(r), r["adaptation"]) for r in results if "adaptation" in r]
    runs = runs_of(results)
    if len(runs) > 1:
        lines += ["", f"median of {len(runs)} runs (seeds from {results[0]['seed']} on)", HEADER]
        for (n, name), cells in sorted(median_cells(runs).items()):
            lines += [row(f"{name}/{n}", cell) for cell in cells.values()]
    not_idle = [_label(r) for r in results if not r.get("idle_before", {}).get("idle", True)]
    if not_idle:
        lines.append(f"fleet not idle before (servers restarted): {', '.join(not_idle)}")
    lines += verdict_lines(results)
    machine = out["machine"]
    lines.append(
        f"capacity {out['capacity']['rps']:.1f} req/s; {out['seconds']:.0f} s; "
        f"{machine['cpus']} CPUs, load average {machine['load_average_before'][0]:.2f} before, "
        f"{machine['load_average_after'][0]:.2f} after"
    )
    return lines


def _range(cell: dict[str, Any], name: str, show: Any) -> str:
    spread = cell.get(f"{name}_range")
    if cell.get("runs", 1) < 2 or not spread:
        return ""
    return f" [{show(float(spread[0]))}-{show(float(spread[1]))}]"


def markdown(out: dict[str, Any]) -> str:
    """The README's tables: per Envoy count the medians per strategy and load (with the range
    over repeats), the adaptation over every cycle, the verdicts; and the run's conditions."""
    results = out["results"]
    runs = runs_of(results)
    cells = median_cells(runs)
    machine = out["machine"]
    parts = [
        f"`{out['command']}`: commit {out['source']['head']}"
        + (" with uncommitted changes" if out["source"]["uncommitted"] else "")
        + f", {machine['cpus']} CPUs, load average {machine['load_average_before'][0]:.2f} "
        f"before and {machine['load_average_after'][0]:.2f} after, "
        f"{out['seconds'] / 60:.0f} min; fleet capacity {out['capacity']['rps']:.1f} req/s; "
        f"{len(runs)} run{'s' if len(runs) > 1 else ''}"
        + (" (medians, range in brackets)" if len(runs) > 1 else ""),
        "",
    ]
    for n in sorted({n for n, _ in cells}):
        parts += [
            f"**{n} Envoy{'s' if n > 1 else ''}**",
            "",
            "| strategy | load | requests | p99 ms | done/s | err% | p50 ms | sat% | load avg |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for (count, name), by_load in sorted(cells.items()):
            if count != n:
                continue
            for load, c in by_load.items():
                parts.append(
                    f"| {name} | {100 * load:.0f} % | {_f(c, 'sent'):.0f} "
                    f"| {ms(_f(c, 'p99'))}{_range(c, 'p99', ms)} "
                    f"| {_f(c, 'completed_rps'):.1f} "
                    f"| {pct(_f(c, 'error_rate'))}{_range(c, 'error_rate', pct)} "
                    f"| {ms(_f(c, 'p50'))} "
                    f"| {pct(_f(c, 'saturated_share'))}{_range(c, 'saturated_share', pct)} "
                    f"| {_f(c, 'load_average'):.1f} |"
                )
        parts.append("")
    adaptation = adaptation_summary(results)
    if adaptation:
        parts += [
            "| strategy | Envoys | victim's share before | while slowed | report intervals "
            "until its share is back |",
            "|---|---:|---:|---:|---:|",
        ]
        for (n, name), a in sorted(adaptation.items()):
            low, high = a["slowed_range"] or (math.nan, math.nan)
            back_low, back_high = a["back_range"] or (math.nan, math.nan)
            parts.append(
                f"| {name} | {n} | {pct(a['before'])} % | {pct(a['slowed'])} % "
                f"[{pct(low)}-{pct(high)}] | {a['back']:g} [{back_low:g}-{back_high:g}] |"
            )
        parts.append("")
    parts += ["```", *verdict_lines(results), "```"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path(__file__).resolve().parent / "results/balance.json"
    print(markdown(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
