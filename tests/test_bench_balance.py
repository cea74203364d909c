"""The balancing benchmark's pieces (schedule, heavy-tailed mix, percentiles, the fleet and
its ORCA modes, generated snapshots for N Envoys, run order, recovery measure, verdicts,
tables, plots) and its smallest configuration end to end on real Envoys."""

from __future__ import annotations

import io
import itertools
import json
import math
import random
import statistics
from pathlib import Path

import aiohttp
import pytest

from bench import balance, balance_verdict
from bench.balance_fleet import CountingServer, ServerClass, fleet_configs, parse_fleet
from bench.balance_load import MIX, latency_summary
from bench.balance_measure import Cycle, cycle_figures, recovery_intervals, summarize_cycles
from bench.balance_plot import plot
from bench.balance_rig import snapshot_document
from bench.balance_tables import markdown
from lrs.contract import ORCA_FORMAT_HEADER
from xds_lab.cli import build_parser
from xds_lab.loadgen import ERROR, OK, Mix, Outcome, Request, percentile, poisson_schedule
from xds_lab.simulator.options import BLOCK_TOKENS
from xds_lab.simulator.sequence import fits_alone
from xds_lab.weights_demo import WeightsDemo, run_weights_demo, summary
from xds_server.config.reader import parse_config
from xds_server.config.types import CSWRR
from xds_server.resources.build import cluster


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


def test_the_mix_is_heavy_tailed_bounded_and_partly_streaming() -> None:
    draws = [MIX.draw(random.Random(seed)) for seed in range(5000)]
    prompts = sorted(float(p) for p, _, _ in draws)
    outputs = sorted(float(o) for _, o, _ in draws)
    largest_prompt, largest_output = MIX.largest
    assert 1 <= prompts[0] and prompts[-1] <= largest_prompt
    assert 1 <= outputs[0] and outputs[-1] <= largest_output
    # A mixture with long-context and long-answer kinds: a tail far beyond one lognormal's.
    assert percentile(prompts, 99) > 5 * percentile(prompts, 50)
    assert percentile(outputs, 99) > 5 * percentile(outputs, 50)
    assert statistics.mean(prompts) > 1.4 * statistics.median(prompts)
    assert sum(stream for _, _, stream in draws) / len(draws) == pytest.approx(0.3, abs=0.03)
    assert MIX.quantiles(draws=2000)["prompt"]["p50"] < MIX.quantiles(draws=2000)["prompt"]["p99"]


def test_percentile_is_nearest_rank_and_unanswered_is_infinite() -> None:
    values = sorted([float(i) for i in range(1, 101)])
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
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


def test_fleet_has_three_classes_and_every_server_holds_the_largest_request() -> None:
    classes = parse_fleet("fast:3,slow:3,small:2")
    assert classes == (ServerClass("fast", 3), ServerClass("slow", 3), ServerClass("small", 2))
    configs = dict(fleet_configs(classes, 6144, 8, MIX))
    assert len(configs) == 8 and {"fast-2", "slow-0", "small-1"} <= set(configs)
    fast, slow, small = configs["fast-0"], configs["slow-0"], configs["small-0"]
    assert (fast.kv_cache_tokens, slow.kv_cache_tokens, small.kv_cache_tokens) == (6144, 3072, 1536)
    assert fast.decode_step_base_s < small.decode_step_base_s < slow.decode_step_base_s
    # A cache scaled down 16/3 times costs 16/3 times as much per token: a full one, the same.
    assert fast.decode_step_per_kv_token_s * 6144 == pytest.approx(4e-7 * 32768)
    for config in configs.values():
        assert fits_alone(*MIX.largest, config.kv_cache_tokens // BLOCK_TOKENS)
    tight = dict(fleet_configs((ServerClass("small", 1),), 4096, 8, MIX))["small-0"]
    assert tight.kv_cache_tokens > 4096 // 4  # raised to hold the largest request
    assert fits_alone(*MIX.largest, tight.kv_cache_tokens // BLOCK_TOKENS)
    for bad in ("fast", "huge:2", "slow:0", "fast:x"):
        with pytest.raises(ValueError):
            parse_fleet(bad)


async def test_cs_wrr_kv_servers_send_no_application_utilization() -> None:
    """Envoy takes application_utilization over metric_names_for_computing_utilization: for
    the KV-cache fraction to be CS-WRR's utilization, the servers must not send it."""
    log: list = []
    (name, config), *_ = fleet_configs((ServerClass("fast", 1),), 6144, 8, MIX)
    server = CountingServer(config.with_overrides({"time_scale": 0.1}), name, log)
    reports = {}
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for strategy in ("lr", "cswrr", "cswrr-kv"):
                server.update({"orca_signals": balance.STRATEGIES[strategy].orca_signals})
                body = {"model": "llama-3-8b", "prompt": "x", "prompt_tokens": 50, "max_tokens": 3}
                headers = {ORCA_FORMAT_HEADER: "TEXT"}
                url = f"{server.url}/v1/completions"
                async with session.post(url, json=body, headers=headers) as resp:
                    assert resp.status == 200
                    reports[strategy] = resp.headers["endpoint-load-metrics"]
    finally:
        await server.stop()
    assert len(log) == 3 and {a.server for a in log} == {"fast-0"}
    assert all("named_metrics.kv_cache_usage_perc=" in r for r in reports.values())
    assert "rps_fractional" not in reports["lr"] and "application_" not in reports["lr"]
    assert "rps_fractional=" in reports["cswrr"] and "application_utilization=" in reports["cswrr"]
    assert "rps_fractional=" in reports["cswrr-kv"]
    assert "application_utilization" not in reports["cswrr-kv"]


@pytest.mark.parametrize("name", list(balance.STRATEGIES))
def test_every_strategys_snapshot_is_valid_for_several_envoys(name: str) -> None:
    strategy = balance.STRATEGIES[name]
    pool = balance.pool_spec(strategy, [8001, 8002], {"push_interval": 0.5})
    doc = snapshot_document(pool, [10000, 10001, 10002])
    config = parse_config(json.dumps(doc), f"{name}.yaml")
    (parsed,) = config.pools
    assert (parsed.lb_policy, parsed.weighting) == (strategy.lb_policy, strategy.weighting)
    assert parsed.orca.push_interval == 0.5
    assert [listener.port for listener in config.listeners] == [10000, 10001, 10002]
    groups = {g.name: g for g in config.node_groups}
    assert groups["edge-1"].node_clusters == ("edge-1",)
    assert groups["edge-1"].listeners == ("inference-1",)
    assert (strategy.orca_signals != "vllm") == (strategy.lb_policy == CSWRR)
    if strategy.lb_policy == CSWRR:
        built = cluster(parsed)
        config_any = built.load_balancing_policy.policies[0].typed_extension_config.typed_config
        assert b"named_metrics.kv_cache_usage_perc" in config_any.value


def test_run_order_is_seeded_complete_and_rotates() -> None:
    names, counts = ["rr", "lr", "orca-lr"], [1, 4]
    first = balance.run_order(names, counts, seed=5, run=0)
    assert sorted(first) == sorted((n, c) for n in names for c in counts)
    assert first == balance.run_order(names, counts, seed=5, run=0)
    assert balance.run_order(names, counts, seed=5, run=1) == first[1:] + first[:1]
    positions = {combo: set() for combo in first}
    for run in range(len(first)):
        for position, combo in enumerate(balance.run_order(names, counts, seed=5, run=run)):
            positions[combo].add(position)
    assert all(len(p) == len(first) for p in positions.values())  # every place, once each


def arrivals(share_at, seconds: int = 40) -> list[tuple[float, bool]]:
    """20 arrivals a second; the victim gets every k-th one for share 1/k."""
    out = []
    for i in range(20 * seconds):
        t = i / 20
        share = share_at(t)
        out.append((t, share > 0 and i % round(1 / share) == 0))
    return out


def test_recovery_counts_report_intervals_until_the_share_is_back() -> None:
    cycle = Cycle(slowed=10.0, recovered=20.0, end=30.0)
    back_after_3 = arrivals(lambda t: 0.25 if t < 10 or t >= 23 else 0.05)
    assert recovery_intervals(back_after_3, cycle, 1.0, before=0.25) == 3
    assert recovery_intervals(back_after_3, cycle, 0.5, before=0.25) == 6  # 0.5 s intervals
    late = arrivals(lambda t: 0.25 if t < 10 or t >= 28 else 0.05)  # back, too late to judge
    assert recovery_intervals(late, cycle, 1.0, before=0.25) is None
    never = arrivals(lambda t: 0.25 if t < 10 else 0.05)
    assert recovery_intervals(never, cycle, 1.0, before=0.25) is None
    (figures,) = cycle_figures(back_after_3, [cycle], 0.25, 1.0)
    assert figures["share_slowed"] == pytest.approx(0.05)
    assert figures["recovery_intervals"] == 3
    summary = summarize_cycles([figures, {**figures, "recovery_intervals": None}, figures])
    assert summary["recovery_intervals"] == 3
    assert summary["share_slowed_range"] == (pytest.approx(0.05), pytest.approx(0.05))
    assert math.isinf(
        summarize_cycles([{**figures, "recovery_intervals": None}])["recovery_intervals"]
    )


def cell(load: float, p99: float | str, saturated: float, sent: int = 500) -> dict:
    return {"load": load, "p99": p99, "saturated_share": saturated, "error_rate": 0.0,
            "sent": sent, "completed_rps": 30.0, "p50": 0.5, "load_average": 1.5}  # fmt: skip


def result(
    name: str, envoys: int, *cells: dict, run: int = 0, adapt: list | None = None, slowed=0.04
) -> dict:
    out = {"strategy": {"name": name}, "envoys": envoys, "cells": list(cells), "run": run}
    if adapt is not None:
        cycles = [{"share_slowed": slowed, "recovery_intervals": k} for k in adapt]
        out["adaptation"] = {"share_before": 0.2, "cycles": cycles}
    return out


RESULTS = [
    result("lr", 4, cell(0.9, 3.0, 0.10), cell(1.1, 5.0, 0.2)),
    result("cswrr", 4, cell(0.9, 2.5, 0.05), cell(1.1, 4.0, 0.1)),
    result("cswrr-kv", 4, cell(0.9, "inf", 0.02), cell(1.1, 4.0, 0.1)),
    result("orca-lr", 4, cell(0.9, 2.0, 0.01), cell(1.1, 4.5, 0.1), adapt=[2, 3, None]),
    result("lr", 1, cell(0.9, 2.0, 0.10)),
    result("cswrr", 1, cell(0.9, 2.1, 0.05)),
    result("orca-lr", 1, cell(0.9, 2.1, 0.05), adapt=[1, 1]),
    result("orca-rr", 1, adapt=[0], slowed=0.19),  # hardly moved: nothing to recover
]


def test_verdicts_judge_the_issues_targets_from_the_results() -> None:
    assert balance_verdict.verdict_lines(RESULTS) == [
        "orca-rr: slowed server's share back within 3 report intervals with 1 Envoy: NOT JUDGED "
        "(its share did not fall while slowed: nothing to recover) (median 0 intervals over 1 "
        "cycles (range 0-0); share 20.0% before, 19.0% while slowed)",
        "orca-lr: p99 at 90% with 4 Envoys >= 20% below lr: MET (2000 vs 3000 ms)",
        "orca-lr: p99 at 90% with 4 Envoys below cswrr: MET (2000 vs 2500 ms)",
        "orca-lr: p99 at 90% with 4 Envoys below cswrr-kv: MET (2000 vs >cut ms)",
        "orca-lr: p99 at 90% with 1 Envoy no worse than lr: NOT MET (2100 vs 2000 ms)",
        "orca-lr: p99 at 90% with 1 Envoy no worse than cswrr: MET (2100 vs 2100 ms)",
        "orca-lr: fewer requests on saturated servers at 90% with 1 Envoy: TIED "
        "(5.00% vs lr 10.00%, cswrr 5.00%)",
        "orca-lr: slowed server's share back within 3 report intervals with 1 Envoy: MET "
        "(median 1 intervals over 2 cycles (range 1-1); share 20.0% before, 4.0% while slowed)",
        "orca-lr: fewer requests on saturated servers at 90% with 4 Envoys: MET "
        "(1.00% vs lr 10.00%, cswrr 5.00%, cswrr-kv 2.00%)",
        "orca-lr: fewer requests on saturated servers at 110% with 4 Envoys: TIED "
        "(10.00% vs lr 20.00%, cswrr 10.00%, cswrr-kv 10.00%)",
        "orca-lr: slowed server's share back within 3 report intervals with 4 Envoys: MET "
        "(median 3 intervals over 3 cycles (range 2-inf); share 20.0% before, 4.0% while slowed)",
    ]


def test_verdicts_over_runs_are_on_medians_and_count_the_runs_that_met_them() -> None:
    results = []
    for run, (lr_p99, ours_p99) in enumerate(((10.0, 6.0), (10.0, 9.0), (9.0, 6.0))):
        results.append(result("lr", 4, cell(0.9, lr_p99, 0.2), run=run))
        results.append(result("orca-rr", 4, cell(0.9, ours_p99, 0.1), run=run))
    lines = balance_verdict.verdict_lines(results)
    assert lines == [
        "orca-rr: p99 at 90% with 4 Envoys >= 20% below lr: MET (6000 vs 10000 ms) on medians; "
        "met in 2 of 3 runs",
        "orca-rr: fewer requests on saturated servers at 90% with 4 Envoys: MET (10.00% vs lr "
        "20.00%) on medians; met in 3 of 3 runs",
    ]


def test_medians_over_runs_keep_the_spread_and_rank_unanswered_last() -> None:
    runs = balance_verdict.runs_of(
        [
            result("lr", 1, cell(0.9, 4.0, 0.1), run=0),
            result("lr", 1, {**cell(0.9, "inf", 0.3), "error_rate": "nan"}, run=1),
            result("lr", 1, {**cell(0.9, 2.0, 0.2), "error_rate": 0.02}, run=2),
        ]
    )
    (median,) = balance_verdict.median_cells(runs)[1, "lr"].values()
    assert median["runs"] == 3
    assert median["p99"] == 4.0 and median["p99_range"] == (2.0, math.inf)
    assert median["saturated_share"] == 0.2 and median["saturated_share_range"] == (0.1, 0.3)
    assert median["error_rate"] == 0.01  # NaN (nothing measured) left out: median of two
    assert math.isnan(median["output_tps"]) and "output_tps_range" not in median


def run_record(results: list[dict]) -> dict:
    return {
        "command": "bench/balance.py --quick",
        "source": {"head": "abc1234", "uncommitted": []},
        "machine": {"cpus": 2, "load_average_before": [1.5, 1, 1], "load_average_after": [2, 1, 1]},
        "seconds": 240.0,
        "capacity": {"rps": 40.0},
        "plan": {"measure": 6, "grace": 5},
        "results": results,
    }


def test_markdown_tables_come_from_the_results() -> None:
    text = markdown(run_record(RESULTS))
    assert "`bench/balance.py --quick`: commit abc1234, 2 CPUs, load average 1.50" in text
    assert "**1 Envoy**" in text and "**4 Envoys**" in text
    assert "| orca-lr | 90 % | 500 | 2000 | 30.0 | 0.0 | 500 | 1.0 | 1.5 |" in text
    assert "| cswrr-kv | 90 % | 500 | >cut |" in text
    assert "| orca-lr | 4 | 20.0 % | 4.0 % [4.0-4.0] | 3 [2-inf] |" in text
    assert balance_verdict.verdict_lines(RESULTS)[0] in text


def test_plots_are_written(tmp_path: Path) -> None:
    written = plot(run_record(RESULTS), tmp_path, "quick")
    assert [p.name for p in written] == ["quick_latency.png", "quick_adaptation.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


@pytest.mark.envoy
def test_smallest_run_end_to_end_on_two_envoys(tmp_path: Path) -> None:
    """Two strategies behind two Envoys, one short cell and one short slowdown each: servers,
    plane, Envoys, load spread over both, table, JSON; CS-WRR's weights computed by Envoy
    from the KV-cache fraction (metric names in effect), ours sampled from the engine."""
    args = ["--strategies", "cswrr-kv,orca-lr", "--envoys", "2", "--loads", "0.8"]
    args += ["--capacity", "10", "--fleet", "fast:1,slow:1,small:1", "--orca", "blackout=1"]
    args += ["--lrs-interval", "0.5", "--first-warmup", "2", "--measure", "2", "--grace", "2"]
    args += ["--adapt-before", "1", "--adapt-cycles", "1", "--adapt-slowed", "1"]
    args += ["--adapt-recovered", "1.5", "--no-plots", "--out", str(tmp_path), "--name", "small"]
    assert balance.main(args) == 0
    out = json.loads((tmp_path / "small.json").read_text())
    assert sorted(r["strategy"]["name"] for r in out["results"]) == ["cswrr-kv", "orca-lr"]
    for run in out["results"]:
        assert run["envoys"] == 2 and run["idle_before"]["idle"]
        (only,) = run["cells"]
        assert only["sent"] > 0 and only["errors"] == 0  # a timeout at the 2 s cut-off may be
        assert sum(only["per_server"].values()) >= only["sent"] - 5  # server-side count
        assert len(run["envoy_weights"]) == 2
        assert len(run["adaptation"]["cycles"]) == 1
    by_name = {r["strategy"]["name"]: r for r in out["results"]}
    # CS-WRR without application_utilization: weights Envoy computed (qps / KV fraction), not
    # the default 1 it keeps while no report has a usable utilization (a report answered with
    # an empty KV cache has none, so at this light load not every Envoy may have one yet).
    envoy_weights = by_name["cswrr-kv"]["envoy_weights"]
    assert all(len(weights) == 3 for weights in envoy_weights), envoy_weights
    assert max(w for weights in envoy_weights for w in weights.values()) > 1, envoy_weights
    assert by_name["orca-lr"]["weights"], "our weight engine's answers were sampled"


async def test_the_demos_round_robin_comparison_is_a_flag_of_the_demo() -> None:
    """README's round-robin comparison comes from `xds-lab demo --weighting static`."""
    args = build_parser().parse_args(["demo", "--weighting", "static"])
    assert args.weighting == "static"
    assert build_parser().parse_args(["demo"]).weighting == "orca"
    with pytest.raises(ValueError, match="weighting"):
        await run_weights_demo(duration=3.0, weighting="random")
    demo = WeightsDemo(Path("unused"), 3.0, 0.5, io.StringIO(), weighting="static")
    (pool,) = demo._snapshot()["pools"]
    assert pool["weighting"] == "static" and "lb_policy" not in pool  # round robin, the default
    assert summary([], [], "static").startswith("round robin (weighting: static): ")
