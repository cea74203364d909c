"""Balancing-quality benchmark: a fleet of three GPU classes, 1 or N real Envoys, six strategies.

What runs, all on 127.0.0.1 and in this one process and event loop except the Envoys:

- the fleet (`balance_fleet.py`): 8 simulated vLLM servers, 3 `fast`, 3 `slow` (half the
  speed and KV cache) and 2 `small` (fast, with a small KV cache); each logs every arrival
  with its own KV-cache use and queue at that moment (the honest "sent to a saturated server");
- per strategy and Envoy count, a fresh `ControlPlane` (the product, in process) and N fresh
  Envoys 1.40 (`balance_rig.py`), each with its own listener; the load generator spreads the
  requests over them (round robin over the listener ports, or at random);
- the load: open-loop Poisson arrivals of a heavy-tailed mix of chat, long-context and
  long-answer requests (`balance_load.py`) at 90 and 110 % of the fleet's capacity, measured
  at the start of the run (every server driven straight at full batch);
- after the load cells, the adaptation run (`balance_measure.py`): at 70 % load one fast
  server is slowed 4x and recovered, in cycles; the victim's mean share while slowed and the
  report intervals until its share is back.

Strategies (the same pool, only `lb_policy` / `weighting` / what the servers report change):
  rr        ROUND_ROBIN, static equal weights
  lr        LEAST_REQUEST, static equal weights
  cswrr     Envoy's client_side_weighted_round_robin; the servers add rps_fractional and
            application_utilization = batch occupancy to their ORCA (vLLM sends neither)
  cswrr-kv  the same with rps_fractional only: CS-WRR's utilization is then the KV-cache
            fraction (metric_names_for_computing_utilization; application_utilization wins
            over those names when present, so it must be absent)
  orca-rr   our weights (weighting: orca) over ROUND_ROBIN; vLLM's own ORCA only
  orca-lr   our weights over LEAST_REQUEST (the product default for weighting: orca)

Every (strategy, N) runs once per repeat, in a seeded order that rotates from repeat to
repeat; before each the fleet is checked idle (a busy server is restarted, and it is recorded).

    .venv/bin/python bench/balance.py            # ~19 min on 2 cores: N = 1 and 4
    .venv/bin/python bench/balance.py --quick    # < 5 min: N = 4, short cells, one cycle
    .venv/bin/python bench/balance.py --strategies lr,orca-lr --envoys 4 --no-adapt
    .venv/bin/python bench/balance.py --repeats 3   # ~1 hour: verdicts on medians
    .venv/bin/python bench/balance_verdict.py bench/results/balance.json  # the targets
    .venv/bin/python bench/balance_tables.py bench/results/balance.json   # README tables
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.balance_fleet import (
    Admission,
    CountingServer,
    ensure_idle,
    fleet_configs,
    measure_capacity,
    parse_fleet,
)
from bench.balance_load import MIX, LengthMix, latency_summary
from bench.balance_measure import (
    Cycle,
    Phase,
    cell_figures,
    cycle_figures,
    run_phase,
    summarize_cycles,
    victim_share,
)
from bench.balance_rig import POOL, PlaneWithEnvoys, snapshot_document
from bench.balance_tables import HEADER, adapt_row, report_lines, row
from xds_lab.envoy_rig import free_port
from xds_lab.simulator.orca import VLLM
from xds_server.app import ControlPlane
from xds_server.config.types import CSWRR

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, slots=True)
class Strategy:
    name: str
    lb_policy: str
    weighting: str
    orca_signals: str  # what the servers' ORCA reports carry (xds_lab.simulator.orca.SIGNALS)


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("rr", "round_robin", "static", VLLM),
        Strategy("lr", "least_request", "static", VLLM),
        Strategy("cswrr", CSWRR, "static", "cswrr"),
        Strategy("cswrr-kv", CSWRR, "static", "cswrr-kv"),
        Strategy("orca-rr", "round_robin", "orca", VLLM),
        Strategy("orca-lr", "least_request", "orca", VLLM),
    )
}


def pool_spec(strategy: Strategy, ports: list[int], orca: dict[str, Any]) -> dict[str, Any]:
    pool: dict[str, Any] = {
        "name": POOL,
        "lb_policy": strategy.lb_policy,
        "weighting": strategy.weighting,
        "endpoints": [{"address": "127.0.0.1", "port": p, "zone": "zone-a"} for p in ports],
    }
    if orca:
        pool["orca"] = orca
    return pool


class WeightLog:
    """Our weight engine's answers over time (orca strategies), sampled once a second."""

    def __init__(self, plane: ControlPlane, names: dict[str, str]) -> None:
        self.plane = plane
        self.names = names  # endpoint key -> server name
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def explain(self) -> dict[str, Any]:
        state = self.plane.engine.pools.get(POOL)
        if state is None or state.latest is None:
            return {}
        return {self.names[k]: dict(why) for k, why in state.latest.explain.items()}

    async def run(self) -> None:
        while True:
            state = self.plane.engine.pools.get(POOL)
            if state is not None and state.latest is not None:
                latest = state.latest
                self.samples.append(
                    {
                        "t": round(time.monotonic() - self.t0, 2),
                        "weights": {self.names[k]: w for k, w in latest.endpoints.items()},
                        "states": {self.names[k]: w["state"] for k, w in latest.explain.items()},
                    }
                )
            await asyncio.sleep(1.0)


@dataclass(slots=True)
class Plan:
    loads: tuple[float, ...]
    first_warmup: float
    warmup: float
    measure: float
    grace: float
    timeout: float
    adapt: bool
    adapt_load: float
    adapt_before: float
    adapt_slowed: float
    adapt_recovered: float
    adapt_cycles: int
    slowdown: float
    orca: dict[str, Any]
    lrs_interval: float
    spread: str


@dataclass(slots=True)
class Bench:
    """What every strategy runs against: the fleet and its admission log, the measured
    capacity, the plan, the request mix and this repeat's seed."""

    servers: list[CountingServer]
    admissions: list[Admission]
    capacity: float
    plan: Plan
    mix: LengthMix
    seed: int

    async def phase(
        self,
        session: aiohttp.ClientSession,
        urls: list[str],
        load: float,
        duration: float,
        rng: random.Random,
        at_offset: dict[float, Any] | None = None,
    ) -> Phase:
        """`load` as a fraction of capacity, for `duration` seconds."""
        plan = self.plan
        return await run_phase(
            session,
            urls,
            plan.spread,
            load * self.capacity,
            duration,
            rng,
            self.mix,
            plan.grace,
            plan.timeout,
            at_offset,
        )


async def run_strategy(
    strategy: Strategy, envoys: int, bench: Bench, workdir: Path
) -> dict[str, Any]:
    servers, plan = bench.servers, bench.plan
    label = f"{strategy.name}/{envoys}"
    result: dict[str, Any] = {
        "strategy": asdict(strategy),
        "envoys": envoys,
        "idle_before": await ensure_idle(servers),
        "cells": [],
        "explain": {},
    }
    if not result["idle_before"]["idle"]:
        print(f"{label}: fleet not idle, restarted {result['idle_before']}", flush=True)
    for server in servers:
        server.update({"orca_signals": strategy.orca_signals})
        server.set_slowdown(1.0)
    ports = [free_port() for _ in range(envoys)]
    folder = workdir / f"{strategy.name}-{envoys}"
    folder.mkdir()
    path = folder / "snapshot.yaml"
    pool = pool_spec(strategy, [s.port for s in servers], plan.orca)
    path.write_text(yaml.safe_dump(snapshot_document(pool, ports)))
    rig = PlaneWithEnvoys(path, folder, envoys, plan.lrs_interval)
    weights = WeightLog(rig.plane, {f"127.0.0.1:{s.port}": s.name for s in servers})
    sampler = asyncio.create_task(weights.run())
    urls = [f"http://127.0.0.1:{port}/v1/completions" for port in ports]
    try:
        await rig.start()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for index, load in enumerate(plan.loads):
                rng = random.Random(bench.seed * 1000 + index)  # the same for every strategy
                warmup = plan.first_warmup if index == 0 else plan.warmup
                phase = await bench.phase(session, urls, load, warmup + plan.measure, rng)
                cell = cell_figures(phase, warmup, plan.measure, bench.admissions)
                cell |= {"load": load, "offered_rps": load * bench.capacity}
                cell["load_average"] = os.getloadavg()[0]  # the machine is shared: a record
                if index == 0:
                    result["envoy_weights"] = await rig.host_weights()
                result["cells"].append(cell)
                result["explain"][str(load)] = weights.explain()
                print(row(label, cell), flush=True)
                cell["idle_after"] = await ensure_idle(servers)
            if plan.adapt:
                result["adaptation"] = await adaptation(session, urls, bench)
                print(adapt_row(label, result["adaptation"]), flush=True)
    finally:
        sampler.cancel()
        await rig.stop()
        for server in servers:
            server.set_slowdown(1.0)
    result["weights"] = weights.samples
    return result


async def adaptation(
    session: aiohttp.ClientSession, urls: list[str], bench: Bench
) -> dict[str, Any]:
    """At `adapt_load`, after `adapt_before` s, `adapt_cycles` times: slow the first server (a
    fast one) down for `adapt_slowed` s, then let it run normally for `adapt_recovered` s."""
    servers, plan, admissions = bench.servers, bench.plan, bench.admissions
    victim = servers[0]
    period = plan.adapt_slowed + plan.adapt_recovered
    offsets = [plan.adapt_before + k * period for k in range(plan.adapt_cycles)]
    events: dict[float, Any] = {}
    for at in offsets:
        events[at] = lambda: victim.set_slowdown(plan.slowdown)
        events[at + plan.adapt_slowed] = lambda: victim.set_slowdown(1.0)
    first = len(admissions)
    rng = random.Random(bench.seed * 1000 + 999)
    duration = plan.adapt_before + plan.adapt_cycles * period
    phase = await bench.phase(session, urls, plan.adapt_load, duration, rng, events)
    victim.set_slowdown(1.0)
    arrivals = [(a.at, a.server == victim.name) for a in admissions[first:]]
    t0 = phase.start
    # Before any slowdown; the first 2 s are the ramp from an idle fleet.
    base = victim_share(arrivals, t0 + min(2.0, plan.adapt_before / 2), t0 + plan.adapt_before)
    cycles = [Cycle(t0 + at, t0 + at + plan.adapt_slowed, t0 + at + period) for at in offsets]
    figures = cycle_figures(arrivals, cycles, base, plan.lrs_interval)
    slowed = [o for o in phase.outcomes for c in cycles if c.slowed <= o.sent < c.recovered]
    timeline = [
        round(victim_share(arrivals, t0 + s, t0 + s + 1), 3) for s in range(math.ceil(duration))
    ]
    return {
        "victim": victim.name,
        "slowdown": plan.slowdown,
        "load": plan.adapt_load,
        "share_before": base,
        "cycles": figures,
        **summarize_cycles(figures),
        "p99_slowed": latency_summary(slowed)["p99"],
        "timeline_start": -plan.adapt_before,
        "timeline": timeline,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--envoys", default="1,4", help="Envoy counts to run every strategy at")
    parser.add_argument(
        "--spread", choices=("rr", "random"), default="rr", help="how requests pick an Envoy"
    )
    parser.add_argument("--loads", default="0.9,1.1", help="fractions of capacity")
    parser.add_argument("--quick", action="store_true", help="< 5 min: N=4, short cells")
    parser.add_argument("--measure", type=float, default=15.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each cell")
    parser.add_argument(
        "--first-warmup", type=float, default=12.0, help="before a strategy's first cell (blackout)"
    )
    parser.add_argument("--grace", type=float, default=6.0, help="cut-off after a cell's arrivals")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request")
    parser.add_argument("--no-adapt", dest="adapt", action="store_false")
    parser.add_argument("--adapt-before", type=float, default=6.0, help="seconds before the first")
    parser.add_argument("--adapt-cycles", type=int, default=2, help="slowdowns of the victim")
    parser.add_argument("--adapt-slowed", type=float, default=6.0, help="seconds per slowdown")
    parser.add_argument(
        "--adapt-recovered", type=float, default=6.0, help="seconds after each slowdown"
    )
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument("--capacity-seconds", type=float, default=8.0)
    parser.add_argument("--capacity", type=float, default=0.0, help="skip measuring: this rps")
    parser.add_argument("--fleet", default="fast:3,slow:3,small:2", help="CLASS:COUNT,...")
    parser.add_argument("--batch", type=int, default=8, help="max_num_seqs of every server")
    parser.add_argument("--kv-fast", type=int, default=6144, help="KV tokens of a fast server")
    parser.add_argument(
        "--max-waiting", type=int, default=0, help="queue bound per server (503 beyond); 0: none"
    )
    parser.add_argument(
        "--orca", action="append", default=[], metavar="KEY=VALUE", help="the pool's orca: params"
    )
    parser.add_argument("--lrs-interval", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1, help="of the first repeat's schedules")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of every strategy (seeds seed, seed+1, ...)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", help="results file stem (default balance, balance-quick)")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.envoys, args.measure, args.warmup, args.grace = "4", 5.0, 2.0, 4.0
        args.first_warmup, args.capacity_seconds = 3.0, 5.0
        args.adapt_before, args.adapt_cycles, args.adapt_slowed = 3.0, 1, 4.0
        args.adapt_recovered = 5.0
        if not any(item.startswith("blackout=") for item in args.orca):
            args.orca.append("blackout=2")  # ours and CS-WRR alike: weights from 2 s on
    args.name = args.name or ("balance-quick" if args.quick else "balance")
    if args.repeats < 1 or args.adapt_cycles < 1:
        parser.error("--repeats and --adapt-cycles must be 1 or more")
    unknown = set(args.strategies.split(",")) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
    try:
        args.envoy_counts = [int(n) for n in args.envoys.split(",")]
        args.classes = parse_fleet(args.fleet)
    except ValueError as err:
        parser.error(str(err))
    if any(n < 1 for n in args.envoy_counts):
        parser.error("--envoys takes counts of 1 or more")
    return args


def plan_from(args: argparse.Namespace) -> Plan:
    orca = {}
    for item in args.orca:
        key, _, value = item.partition("=")
        orca[key] = yaml.safe_load(value)
    return Plan(
        loads=tuple(float(x) for x in args.loads.split(",")),
        first_warmup=args.first_warmup,
        warmup=args.warmup,
        measure=args.measure,
        grace=args.grace,
        timeout=args.timeout,
        adapt=args.adapt,
        adapt_load=0.7,
        adapt_before=args.adapt_before,
        adapt_slowed=args.adapt_slowed,
        adapt_recovered=args.adapt_recovered,
        adapt_cycles=args.adapt_cycles,
        slowdown=args.slowdown,
        orca=orca,
        lrs_interval=args.lrs_interval,
        spread=args.spread,
    )


def run_order(names: list[str], counts: list[int], seed: int, run: int) -> list[tuple[str, int]]:
    """Every (strategy, Envoy count) once: a seeded shuffle, rotated by one place per repeat,
    so each takes every position across repeats and drift on the machine touches all alike."""
    combos = [(name, n) for n in counts for name in names]
    random.Random(seed).shuffle(combos)
    shift = run % len(combos)
    return combos[shift:] + combos[:shift]


def source_state() -> dict[str, Any]:
    """The commit and any uncommitted files, with a digest of the weight policy's modules as
    they were when this run imported them: figures are only comparable with their code."""
    root = Path(__file__).resolve().parent.parent

    def git(*command: str) -> str:
        try:
            done = subprocess.run(
                ["git", *command], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.rstrip()

    digest = hashlib.sha256()
    for path in sorted((root / "lrs").rglob("*.py")):
        digest.update(path.read_bytes())
    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git("status", "--porcelain").splitlines(),
        "lrs_sha256": digest.hexdigest()[:16],
    }


async def main_async(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Fills `out` as it goes (`results` after each strategy), so that a run cut short still
    leaves what it measured."""
    plan = plan_from(args)
    admissions: list[Admission] = []
    configs = fleet_configs(args.classes, args.kv_fast, args.batch, MIX, args.max_waiting)
    servers = [CountingServer(config, name, admissions) for name, config in configs]
    started = time.monotonic()
    out |= {
        "command": " ".join(sys.argv),
        "source": source_state(),
        "machine": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()},
        "plan": asdict(plan),
        "mix": {"kinds": [asdict(k) for k in MIX.kinds], "quantiles": MIX.quantiles()},
        "fleet": {s.name: s.config.as_dict() for s in servers},
    }
    print(f"load average {os.getloadavg()[0]:.2f}; fleet {[s.name for s in servers]}", flush=True)
    print(f"request lengths {out['mix']['quantiles']}", flush=True)
    try:
        for server in servers:
            await server.start()
        if args.capacity > 0:
            capacity = {"rps": args.capacity, "given": True}
        else:
            capacity = await measure_capacity(servers, MIX, args.capacity_seconds, args.seed)
        out["capacity"] = capacity
        print(f"fleet capacity {capacity['rps']:.1f} req/s {capacity}", flush=True)
        print(HEADER, flush=True)
        results: list[dict[str, Any]] = []
        out["results"] = results
        with tempfile.TemporaryDirectory(prefix="bench-balance-") as tmp:
            for run in range(args.repeats):
                seed = args.seed + run
                order = run_order(args.strategies.split(","), args.envoy_counts, args.seed, run)
                for position, (name, envoys) in enumerate(order):
                    bench = Bench(servers, admissions, capacity["rps"], plan, MIX, seed)
                    folder = Path(tmp) / f"run-{run}"
                    folder.mkdir(exist_ok=True)
                    result = await run_strategy(STRATEGIES[name], envoys, bench, folder)
                    results.append(result | {"run": run, "seed": seed, "position": position})
                    admissions.clear()
    finally:
        for server in servers:
            await server.stop()
        out["seconds"] = time.monotonic() - started
        out["machine"]["load_average_after"] = os.getloadavg()


def _json_ready(value: Any) -> Any:
    """inf (over the cut-off) and NaN (nothing measured) as strings: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: dict[str, Any] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    try:
        asyncio.run(main_async(args, out))
    except BaseException as err:
        if out.get("results"):  # keep what was measured, marked as cut short
            out["incomplete"] = repr(err)
            path.with_suffix(".incomplete.json").write_text(json.dumps(_json_ready(out), indent=1))
            print(f"cut short; wrote {path.with_suffix('.incomplete.json')}", file=sys.stderr)
        raise
    print("\n" + "\n".join(report_lines(out)))
    path.write_text(json.dumps(_json_ready(out), indent=1))
    print(f"wrote {path}")
    if args.plots:
        from bench.balance_plot import plot

        for written in plot(out, args.out, args.name):
            print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
