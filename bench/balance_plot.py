"""PNG plots of a `balance.py` run: p99 latency against offered load per Envoy count (the
medians, when the strategies ran more than once), and the adaptation figure: the slowed
server's mean share while slowed per strategy, with its spread over every cycle and repeat.
Needs matplotlib (in the `test` and `bench` extras)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from bench.balance_verdict import adaptation_summary, median_cells, runs_of

__all__ = ["plot"]


def plot(out: dict[str, Any], folder: Path, name: str = "balance") -> list[Path]:
    written = [_latency(out, folder / f"{name}_latency.png")]
    adaptation = adaptation_summary(out["results"])
    if adaptation:
        written.append(_adaptation(adaptation, folder / f"{name}_adaptation.png"))
    return written


def _seconds(value: Any, cap: float) -> float:
    """Unanswered (inf) percentiles drawn at the cut-off, so the line shows them as a wall."""
    number = float(value)
    return cap if math.isinf(number) else number


def _latency(out: dict[str, Any], path: Path) -> Path:
    cap = out["plan"]["measure"] + out["plan"]["grace"]
    cells = median_cells(runs_of(out["results"]))
    counts = sorted({n for n, _ in cells})
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.5), squeeze=False)
    for ax, n in zip(axes[0], counts, strict=True):
        for (count, strategy), by_load in sorted(cells.items()):
            if count != n:
                continue
            loads = [100 * load for load in by_load]
            p99 = [_seconds(c["p99"], cap) for c in by_load.values()]
            ax.plot(loads, p99, marker="o", label=strategy)
        ax.axhline(cap, color="grey", linestyle=":", label="cut-off: not answered")
        ax.set_title(f"p99 latency, {n} Envoy{'s' if n > 1 else ''}")
        ax.set_xlabel("offered load, % of measured capacity")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    machine = out["machine"]
    fig.suptitle(
        f"capacity {out['capacity']['rps']:.1f} req/s, "
        f"load average {machine['load_average_before'][0]:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _adaptation(adaptation: dict[tuple[int, str], dict[str, Any]], path: Path) -> Path:
    strategies = list(dict.fromkeys(name for _, name in sorted(adaptation, key=lambda k: k[1])))
    counts = sorted({n for n, _ in adaptation})
    width = 0.8 / len(counts)
    fig, ax = plt.subplots(figsize=(1.6 * len(strategies) + 2, 4.2))
    for offset, n in enumerate(counts):
        xs, heights, low, high, before = [], [], [], [], []
        for index, name in enumerate(strategies):
            entry = adaptation.get((n, name))
            if entry is None:
                continue
            lo, hi = entry["slowed_range"] or (entry["slowed"], entry["slowed"])
            xs.append(index + (offset - (len(counts) - 1) / 2) * width)
            heights.append(100 * entry["slowed"])
            low.append(100 * (entry["slowed"] - lo))
            high.append(100 * (hi - entry["slowed"]))
            before.append(100 * entry["before"])
        label = f"{n} Envoy{'s' if n > 1 else ''}"
        ax.bar(xs, heights, width, yerr=[low, high], capsize=3, label=f"{label}: while slowed")
        ax.scatter(xs, before, marker="_", s=300, color="black", zorder=3)
    ax.scatter([], [], marker="_", color="black", label="share before the slowdown")
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_ylabel("slowed server's share of arrivals, %")
    ax.set_title("mean share while slowed (range over cycles and repeats)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
