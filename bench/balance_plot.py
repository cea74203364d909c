"""PNG plots of a `balance.py` run: latency against offered load (the medians, when the
strategies ran more than once), and the first run's adaptation: share of arrivals per server
over time. Needs matplotlib (the optional `bench` extra)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from bench.balance_verdict import median_cells, runs_of


def _seconds(value: float, cap: float) -> float:
    """Unanswered (inf) percentiles drawn at the cut-off, so the line shows them as a wall."""
    return cap if math.isinf(value) else value


def plot(out: dict[str, Any], folder: Path) -> list[Path]:
    written = [_latency(out, folder / "balance_latency.png")]
    if any("adaptation" in r for r in _first_run(out)):
        written.append(_adaptation(out, folder / "balance_adaptation.png"))
    return written


def _latency(out: dict[str, Any], path: Path) -> Path:
    cap = out["plan"]["measure"] + out["plan"]["grace"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True)
    for name, by_load in median_cells(runs_of(out["results"])).items():
        cells = list(by_load.values())
        loads = [100 * c["load"] for c in cells]
        for ax, key in zip(axes, ("p50", "p99", "ttft_p99"), strict=True):
            ax.plot(loads, [_seconds(c[key], cap) for c in cells], marker="o", label=name)
    for ax, title in zip(axes, ("p50 latency", "p99 latency", "p99 TTFT (streaming)"), strict=True):
        ax.axhline(cap, color="grey", linestyle=":", label="cut-off: not answered")
        ax.set_title(title)
        ax.set_xlabel("offered load, % of measured capacity")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
    axes[0].legend()
    load = out["load_average_before"][0]
    fig.suptitle(f"capacity {out['capacity']['rps']:.1f} req/s, load average {load:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _adaptation(out: dict[str, Any], path: Path) -> Path:
    runs = [r for r in _first_run(out) if "adaptation" in r]
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.8), sharey=True)
    for ax, result in zip([axes] if len(runs) == 1 else axes, runs, strict=True):
        adaptation = result["adaptation"]
        timeline = adaptation["timeline"]
        servers = [k for k in timeline[0] if k != "t"] if timeline else []
        for server in servers:
            ax.plot([p["t"] for p in timeline], [p[server] for p in timeline], label=server)
        ax.axvline(0, color="grey", linestyle="--")
        halved = adaptation["halved_after_s"]
        ax.set_title(
            f"{result['strategy']['name']}: halved "
            + ("never" if halved is None else f"after {halved:.1f} s")
        )
        ax.set_xlabel(f"s since {adaptation['victim']} slowed x{adaptation['slowdown']:g}")
        ax.grid(alpha=0.3)
    (axes if len(runs) == 1 else axes[0]).set_ylabel("share of arrivals (1 s bins)")
    (axes if len(runs) == 1 else axes[0]).legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _first_run(out: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in out["results"] if r.get("run", 0) == 0]
