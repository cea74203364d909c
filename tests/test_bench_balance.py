"""The balancing benchmark's pieces (schedule, mix, percentiles, adaptation time, generated
snapshots, verdicts, plots) and its smallest configuration end to end on the real Envoy."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from bench import balance, balance_verdict
from bench.balance_load import latency_summary
from xds_lab.loadgen import ERROR, OK, Mix, Outcome, Request, percentile, poisson_schedule
from xds_server.config.reader import parse_config
from xds_server.config.types import CSWRR


def test_poisson_schedule_has_the_rate_and_is_reproducible() -> None:
    schedule = poisson_schedule(50.0, 100.0, random.Random(7), Mix())
    assert 4750 <= len(schedule) <= 5250
    times = [r.at for r in schedule]
    assert times == sorted(times) and 0.0 <= times[0] and times[-1] < 100.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.mean(gaps) == pytest.approx(0.02, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean (a fixed pace would give 0).
    assert statistics.stdev(gaps) == pytest.approx(0.02, rel=0.1)
    assert schedule == poisson_schedule(50.0, 100.0, random.Random(7), Mix())
    assert poisson_schedule(0.0, 10.0, random.Random(7), Mix()) == []


def test_mix_is_bounded_skewed_and_partly_streaming() -> None:
    mix = Mix()
    draws = [mix.draw(random.Random(seed)) for seed in range(3000)]
    prompts = [p for p, _, _ in draws]
    outputs = [o for _, o, _ in draws]
    assert 1 <= min(prompts) and max(prompts) <= mix.lengths.max_prompt_tokens
    assert 1 <= min(outputs) and max(outputs) <= mix.lengths.max_output_tokens
    assert statistics.median(prompts) == pytest.approx(mix.lengths.prompt_tokens, rel=0.1)
    assert statistics.mean(prompts) > statistics.median(prompts)  # a long tail
    assert sum(stream for _, _, stream in draws) / len(draws) == pytest.approx(0.3, abs=0.04)


def test_percentile_is_nearest_rank_and_unanswered_is_infinite() -> None:
    values = sorted([float(i) for i in range(1, 101)])
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([1.0, math.inf], 50) == 1.0
    assert math.isinf(percentile([1.0, math.inf], 99))
    assert math.isnan(percentile([], 99))


def outcome(latency: float, status: str = OK, stream: bool = False, ttft: float = 0.0) -> Outcome:
    done = Outcome(Request(0.0, 10, 10, stream), sent=100.0, lag=0.0, status=status)
    if status != "timeout":
        done.finished = 100.0 + latency
        done.ttft = 100.0 + (ttft if stream else latency)
    return done


def test_latency_summary_counts_failures_as_over_the_cut_off() -> None:
    answered = [outcome(1.0 + i / 100) for i in range(97)]
    streams = [outcome(2.0, stream=True, ttft=0.25)]
    failed = [outcome(0.1, ERROR), outcome(0.0, "timeout")]
    summary = latency_summary(answered + streams + failed)
    assert summary["p50"] == pytest.approx(1.49)
    assert math.isinf(summary["p99"])  # 2 of 100 never answered usefully
    assert summary["ttft_p99"] == pytest.approx(0.25)  # streaming requests only


def test_halved_after_waits_for_a_lasting_halving() -> None:
    def arrivals(share_at) -> list[tuple[float, bool]]:
        # 20 arrivals per second; the victim gets every k-th one.
        out = []
        for i in range(20 * 30):
            t = i / 20
            share = share_at(t)
            out.append((t, share > 0 and i % round(1 / share) == 0))
        return out

    base = 0.25
    drop = arrivals(lambda t: 0.25 if t < 13 else 0.05)  # t0 = 10: drops 3 s later
    took = balance.halved_after(drop, t0=10.0, end=30.0, base=base)
    assert took is not None and 3.0 < took <= 5.0
    flap = arrivals(lambda t: 0.25 if int(t) % 2 else 0.05)  # dips, never stays down
    assert balance.halved_after(flap, t0=10.0, end=30.0, base=base) is None
    assert balance.halved_after(arrivals(lambda t: 0.25), t0=10.0, end=30.0, base=base) is None


class _Server:
    def __init__(self, port: int) -> None:
        self.port = port


@pytest.mark.parametrize("name", list(balance.STRATEGIES))
def test_every_strategys_snapshot_is_valid(name: str) -> None:
    strategy = balance.STRATEGIES[name]
    servers = [_Server(8001), _Server(8002)]
    doc = balance.snapshot(strategy, servers, 10000, {"push_interval": 0.5})  # type: ignore[arg-type]
    config = parse_config(json.dumps(doc), f"{name}.yaml")
    (pool,) = config.pools
    assert (pool.lb_policy, pool.weighting) == (strategy.lb_policy, strategy.weighting)
    assert pool.orca.push_interval == 0.5
    assert strategy.orca_rps == (strategy.lb_policy == CSWRR)


def cell(load: float, p99: float | str, saturated: float, errors: float | str) -> dict:
    return {"load": load, "p99": p99, "saturated_share": saturated, "error_rate": errors}


def result(name: str, *cells: dict, run: int = 0) -> dict:
    return {"strategy": {"name": name}, "cells": list(cells), "run": run}


def test_verdicts_compare_ours_with_every_other_strategy() -> None:
    results = [
        result("rr", cell(0.9, 10.0, 0.20, 0.0), cell(1.1, 30.0, 0.5, 0.10)),
        result("lr", cell(0.9, 5.0, 0.05, 0.0), cell(1.1, 20.0, 0.3, 0.02)),
        result("cswrr", cell(0.9, math.inf, 0.05, 0.0)),
        result("orca-rr", cell(0.9, 6.0, 0.01, 0.0), cell(1.1, 25.0, 0.1, 0.02)),
        result("orca-lr", cell(0.9, math.inf, 0.01, 0.0)),
    ]
    lines = balance_verdict.verdict_lines(balance_verdict.runs_of(results))
    assert lines == [
        "orca-rr: p99 at 90% >= 30% below rr: MET (6000 vs 10000 ms)",
        "orca-rr: p99 at 90% no worse than lr: NOT MET (6000 vs 5000 ms)",
        "orca-rr: p99 at 90% no worse than cswrr: MET (6000 vs >cut ms)",
        "orca-rr: fewer requests on saturated servers at 90% than all: MET "
        "(1.0% vs 20.0%, 5.0%, 5.0%)",
        "orca-rr: fewer errors at 110% than all: TIED (2.0% vs 10.0%, 2.0%)",
        # Unanswered (inf) never meets a latency target, not even against another inf.
        "orca-lr: p99 at 90% >= 30% below rr: NOT MET (>cut vs 10000 ms)",
        "orca-lr: p99 at 90% no worse than lr: NOT MET (>cut vs 5000 ms)",
        "orca-lr: p99 at 90% no worse than cswrr: TIED (both over the cut-off) (>cut vs >cut ms)",
        "orca-lr: fewer requests on saturated servers at 90% than all: MET "
        "(1.0% vs 20.0%, 5.0%, 5.0%)",
    ]


def test_medians_over_runs_keep_the_spread_and_rank_unanswered_last() -> None:
    runs = balance_verdict.runs_of(
        [
            result("rr", cell(0.9, 4.0, 0.1, 0.0), run=0),
            result("rr", cell(0.9, "inf", 0.3, "nan"), run=1),  # as read back from the JSON
            result("rr", cell(0.9, 2.0, 0.2, 0.02), run=2),
        ]
    )
    (median,) = balance_verdict.median_cells(runs)["rr"].values()
    assert median["runs"] == 3
    assert median["p99"] == 4.0 and median["p99_range"] == (2.0, math.inf)
    assert median["saturated_share"] == 0.2 and median["saturated_share_range"] == (0.1, 0.3)
    assert median["error_rate"] == 0.01  # NaN (nothing measured) left out: median of two
    assert math.isnan(median["completed_rps"]) and "completed_rps_range" not in median


def test_verdicts_over_runs_are_on_medians_and_count_the_runs_that_met_them() -> None:
    results = []
    for run, (rr_p99, ours_p99) in enumerate(((10.0, 6.0), (10.0, 8.0), (9.0, 6.0))):
        results.append(result("rr", cell(0.9, rr_p99, 0.2, 0.0), run=run))
        results.append(result("orca-rr", cell(0.9, ours_p99, 0.1, 0.0), run=run))
    lines = balance_verdict.verdict_lines(balance_verdict.runs_of(results))
    assert lines == [
        "orca-rr: p99 at 90% >= 30% below rr: MET (6000 vs 10000 ms) on medians; met in 2 of 3 "
        "runs",
        "orca-rr: fewer requests on saturated servers at 90% than all: MET (10.0% vs 20.0%) "
        "on medians; met in 3 of 3 runs",
    ]


def test_plots_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.balance_plot import plot

    cells = [
        {"load": load, "p50": 0.5, "p99": p99, "ttft_p99": 0.2}
        for load, p99 in ((0.5, 1.0), (1.1, math.inf))
    ]
    timeline = [{"t": t, "fast-0": 0.3 if t < 0 else 0.05, "slow-0": 0.7} for t in range(-3, 5)]
    adaptation = {"timeline": timeline, "halved_after_s": 2.5, "victim": "fast-0", "slowdown": 4}
    out = {
        "plan": {"measure": 10, "grace": 8},
        "capacity": {"rps": 30.0},
        "load_average_before": [1.0, 1.0, 1.0],
        "results": [{"strategy": {"name": "rr"}, "cells": cells, "adaptation": adaptation}],
    }
    written = plot(out, tmp_path)
    assert [p.name for p in written] == ["balance_latency.png", "balance_adaptation.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


@pytest.mark.envoy
def test_smallest_run_end_to_end(tmp_path: Path) -> None:
    """Two strategies, one short cell each: servers, plane, Envoy, load, table and JSON."""
    args = ["--strategies", "rr,orca-lr", "--loads", "0.5", "--capacity", "12"]
    args += ["--first-warmup", "0.5", "--measure", "2", "--grace", "3", "--no-adapt"]
    args += ["--no-plots", "--out", str(tmp_path)]
    assert balance.main(args) == 0
    out = json.loads((tmp_path / "balance.json").read_text())
    assert [r["strategy"]["name"] for r in out["results"]] == ["rr", "orca-lr"]
    for result in out["results"]:
        (only,) = result["cells"]
        assert only["sent"] > 0 and only["error_rate"] == 0.0
        assert sum(only["per_server"].values()) >= only["sent"] - 5  # server-side count
        assert only["completed_rps"] > 0
    assert out["results"][1]["weights"], "our weight engine's answers were sampled"
