"""Balancing-quality benchmark: one heterogeneous fleet, one real Envoy, five strategies.

What runs, all on 127.0.0.1 and in this one process and event loop except Envoy:

- the fleet: simulated vLLM servers (`xds_server.simulator`), two `fast` and two `slow`
  (half the speed, half the KV cache), with small batches and caches so the fleet saturates
  at request rates this 2-core machine can generate; each server logs every admission with
  its own KV-cache use and queue at that moment (the honest "sent to a saturated server");
- per strategy, a fresh `ControlPlane` (the product, in process) and a fresh Envoy 1.40;
- the load: open-loop Poisson arrivals (`balance_load.py`) at 50/70/90/110 % of the fleet's
  capacity, measured at the start of the run (every server driven straight at full batch).

Strategies (the same pool, only `lb_policy` / `weighting` change):
  rr       ROUND_ROBIN, static equal weights
  lr       LEAST_REQUEST, static equal weights
  cswrr    Envoy's client_side_weighted_round_robin; the servers add rps_fractional and
           application_utilization to their ORCA (vLLM sends neither: CS-WRR needs them)
  orca-rr  our weights (weighting: orca) over ROUND_ROBIN; vLLM's own ORCA only
  orca-lr  our weights over LEAST_REQUEST

Each strategy warms up (blackout) before its first cell, each cell warms up before it is
measured, and after the load cells an adaptation run slows one fast server down mid-run at
70 % load and times how long until its share of new requests halves.

    .venv/bin/python bench/balance.py            # ~8.5 minutes on 2 cores
    .venv/bin/python bench/balance.py --quick    # ~5 minutes: loads 70/110 %, shorter cells
    .venv/bin/python bench/balance.py --strategies rr,orca-rr --loads 0.9 --no-adapt
    .venv/bin/python bench/balance.py --loads 0.7,0.9,1.1 --no-adapt --repeats 3  # ~15 min:
        # every strategy three times, interleaved; the verdicts on the medians
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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.balance_load import LENGTHS, latency_summary
from bench.balance_verdict import median_cells, ms, pct, runs_of, verdict_lines
from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings, one_pool_snapshot
from xds_lab.loadgen import OK, Mix, Outcome, Request, percentile, poisson_schedule, send
from xds_lab.simulator.model_server import ModelServer
from xds_lab.simulator.openai import Api
from xds_lab.simulator.options import SimulatorConfig
from xds_server.app import ControlPlane
from xds_server.config.types import CSWRR

POOL = "llama"
MODEL = "llama-3-8b"
NODE = "bench-balance"
#: KV-cache use above which a server counts as saturated when a request reaches it.
SATURATED_KV = 0.95
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, slots=True)
class Strategy:
    name: str
    lb_policy: str
    weighting: str
    orca_rps: bool  # the servers add what CS-WRR needs to their ORCA reports


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("rr", "round_robin", "static", False),
        Strategy("lr", "least_request", "static", False),
        Strategy("cswrr", CSWRR, "static", True),
        Strategy("orca-rr", "round_robin", "orca", False),
        Strategy("orca-lr", "least_request", "orca", False),
    )
}


# --------------------------------------------------------------------------- the fleet


@dataclass(frozen=True, slots=True)
class Admission:
    at: float  # time.monotonic()
    server: str
    saturated: bool  # KV cache above SATURATED_KV
    queued: bool  # no free batch slot: it waits behind others


class CountingServer(ModelServer):
    """A simulated server that logs each request's arrival with its own state at that moment:
    what the server knew when the balancer's choice reached it."""

    def __init__(self, config: SimulatorConfig, name: str, log: list[Admission]) -> None:
        super().__init__(config, name=name)
        self._log = log

    async def _generate(self, request: Any, api: Api) -> Any:
        state = self.state
        busy = state.waiting > 0 or state.running >= self.config.max_num_seqs
        self._log.append(
            Admission(time.monotonic(), self.name, state.kv_cache_usage > SATURATED_KV, busy)
        )
        return await super()._generate(request, api)


def fleet_configs(
    fast: int, slow: int, batch: int, kv_fast: int, max_waiting: int = 0
) -> list[tuple[str, Any]]:
    """(name, config) per server: `slow` has half of `fast`'s speed and KV cache;
    `max_waiting` bounds each queue (503 beyond it), 0 leaves it unbounded as vLLM's is."""
    bound = {"max_waiting": max_waiting} if max_waiting else {}
    configs = []
    for profile, count, kv in (("fast", fast, kv_fast), ("slow", slow, kv_fast // 2)):
        for index in range(count):
            config = SimulatorConfig.profile(
                profile, model=MODEL, max_num_seqs=batch, kv_cache_tokens=kv, **bound
            )
            configs.append((f"{profile}-{index}", config))
    return configs


async def wait_idle(servers: list[CountingServer], timeout: float = 20.0) -> None:
    """Until no server runs or queues anything (aborted streams free at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.state.running == 0 and s.state.waiting == 0 for s in servers):
            return
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- load phases


@dataclass(slots=True)
class Phase:
    """One open-loop phase: its schedule's outcomes and what it cost the generator."""

    start: float
    outcomes: list[Outcome] = field(default_factory=list)
    cpu: float = 0.0  # process CPU seconds over the phase (this loop runs servers + clients)
    wall: float = 0.0


async def run_phase(
    session: aiohttp.ClientSession,
    url: str,
    rate: float,
    duration: float,
    rng: random.Random,
    mix: Mix,
    grace: float,
    timeout: float,
    at_offset: dict[float, Any] | None = None,
) -> Phase:
    """Send a Poisson schedule, then wait up to `grace` s for the stragglers (cut off after).

    `at_offset`: callables run when the phase reaches that many seconds (the slowdown).
    """
    schedule = poisson_schedule(rate, duration, rng, mix)
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
        "saturated_share": _share(a.saturated for a in arrived),
        "queued_share": _share(a.queued for a in arrived),
        "per_server": _count(a.server for a in arrived),
        "generator_lag_p99": percentile(lags, 99),
        "cpu_share": phase.cpu / phase.wall if phase.wall else math.nan,
    }


def _share(flags: Iterable[bool]) -> float:
    values = list(flags)
    return sum(values) / len(values) if values else math.nan


def _count(names: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- capacity


async def measure_capacity(
    servers: list[CountingServer], mix: Mix, seconds: float, seed: int
) -> dict[str, float]:
    """Each server's full-batch throughput, all at once and straight (no Envoy): a closed loop
    of twice its batch size per server; completed requests/s over `seconds` after a warm-up."""
    rng = random.Random(seed)
    counts = {s.name: 0 for s in servers}
    tokens = {s.name: 0 for s in servers}
    warm = 2.0
    start = time.monotonic()
    stop_at = start + warm + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(server: CountingServer) -> None:
            url = f"{server.url}/v1/completions"
            while time.monotonic() < stop_at:
                request = Request(0.0, *mix.draw(rng))
                outcome = Outcome(request, sent=time.monotonic(), lag=0.0)
                await send(session, url, outcome, MODEL, stop_at - time.monotonic() + 5)
                if outcome.status == OK and start + warm <= outcome.finished < stop_at:
                    counts[server.name] += 1
                    tokens[server.name] += outcome.output_tokens

        workers = [client(s) for s in servers for _ in range(2 * s.config.max_num_seqs)]
        await asyncio.gather(*workers)
    per_server = {name: count / seconds for name, count in counts.items()}
    return {
        "rps": sum(per_server.values()),
        "output_tps": sum(tokens.values()) / seconds,
        "per_server_rps": per_server,
    }


# --------------------------------------------------------------------------- one strategy


def snapshot(strategy: Strategy, servers: list[CountingServer], port: int, orca: dict) -> dict:
    pool: dict[str, Any] = {
        "name": POOL,
        "lb_policy": strategy.lb_policy,
        "weighting": strategy.weighting,
        "endpoints": [{"address": "127.0.0.1", "port": s.port, "zone": "zone-a"} for s in servers],
    }
    if orca:
        pool["orca"] = orca
    return one_pool_snapshot(port, pool, listener={"body_routing": False}, route={"timeout": 0})


class WeightLog:
    """Our weight engine's answers over time (orca strategies), sampled once a second."""

    def __init__(self, plane: ControlPlane, names: dict[str, str]) -> None:
        self.plane = plane
        self.names = names  # endpoint key -> server name
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def sample(self) -> None:
        state = self.plane.engine.pools.get(POOL)
        latest = state.latest if state is not None else None
        if latest is None:
            return
        self.samples.append(
            {
                "t": round(time.monotonic() - self.t0, 2),
                "weights": {self.names[k]: w for k, w in latest.endpoints.items()},
                "states": {self.names[k]: why["state"] for k, why in latest.explain.items()},
            }
        )

    def explain(self) -> dict[str, Any]:
        state = self.plane.engine.pools.get(POOL)
        if state is None or state.latest is None:
            return {}
        return {self.names[k]: dict(why) for k, why in state.latest.explain.items()}

    async def run(self) -> None:
        while True:
            self.sample()
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
    adapt_after: float
    slowdown: float
    orca: dict
    lrs_interval: float


@dataclass(slots=True)
class Bench:
    """What every strategy runs against: the fleet and its admission log, the measured
    capacity, the plan and the request mix."""

    servers: list[CountingServer]
    admissions: list[Admission]
    capacity: float
    plan: Plan
    mix: Mix
    seed: int

    async def phase(
        self,
        session: aiohttp.ClientSession,
        url: str,
        load: float,
        duration: float,
        rng: random.Random,
        at_offset: dict[float, Any] | None = None,
    ) -> Phase:
        """`load` as a fraction of capacity, for `duration` seconds."""
        plan = self.plan
        rate = load * self.capacity
        return await run_phase(
            session, url, rate, duration, rng, self.mix, plan.grace, plan.timeout, at_offset
        )


async def run_strategy(strategy: Strategy, bench: Bench, workdir: Path) -> dict[str, Any]:
    servers, plan = bench.servers, bench.plan
    for server in servers:
        server.update({"orca_rps": strategy.orca_rps})
    port = free_port()
    folder = workdir / strategy.name
    folder.mkdir()
    path = folder / "snapshot.yaml"
    path.write_text(yaml.safe_dump(snapshot(strategy, servers, port, plan.orca)))
    pair = PlaneWithEnvoy(local_settings(path, lrs_interval=plan.lrs_interval), folder, NODE)
    names = {f"127.0.0.1:{s.port}": s.name for s in servers}
    weights = WeightLog(pair.plane, names)
    sampler = asyncio.create_task(weights.run())
    url = f"http://127.0.0.1:{port}/v1/completions"
    result: dict[str, Any] = {"strategy": asdict(strategy), "cells": [], "explain": {}}
    try:
        await pair.start()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for index, load in enumerate(plan.loads):
                rng = random.Random(bench.seed * 1000 + index)  # the same for every strategy
                warmup = plan.first_warmup if index == 0 else plan.warmup
                phase = await bench.phase(session, url, load, warmup + plan.measure, rng)
                cell = cell_figures(phase, warmup, plan.measure, bench.admissions)
                cell |= {"load": load, "offered_rps": load * bench.capacity}
                result["cells"].append(cell)
                result["explain"][str(load)] = weights.explain()
                print(_row(strategy.name, cell), flush=True)
                await wait_idle(servers)
            if plan.adapt:
                result["adaptation"] = await adaptation(session, url, bench)
                print(_adapt_row(strategy.name, result["adaptation"]), flush=True)
    finally:
        sampler.cancel()
        await pair.stop()
        for server in servers:
            server.set_slowdown(1.0)
        await wait_idle(servers)
    result["weights"] = weights.samples
    return result


async def adaptation(session: aiohttp.ClientSession, url: str, bench: Bench) -> dict[str, Any]:
    """At `adapt_load`, slow the first server (a fast one) down after `adapt_before` s and
    time until its share of arrivals (2 s sliding window) falls to half its share before."""
    servers, plan, admissions = bench.servers, bench.plan, bench.admissions
    victim = servers[0]
    rng = random.Random(bench.seed * 1000 + 999)
    first = len(admissions)
    phase = await bench.phase(
        session,
        url,
        plan.adapt_load,
        plan.adapt_before + plan.adapt_after,
        rng,
        at_offset={plan.adapt_before: lambda: victim.set_slowdown(plan.slowdown)},
    )
    victim.set_slowdown(1.0)
    t0 = phase.start + plan.adapt_before
    log = [a for a in admissions[first:] if a.at >= phase.start]
    before = [a for a in log if t0 - (plan.adapt_before - 2.0) <= a.at < t0]  # skip the ramp
    base = _share(a.server == victim.name for a in before)
    arrivals = [(a.at, a.server == victim.name) for a in log]
    halved = halved_after(arrivals, t0, t0 + plan.adapt_after, base)
    after = [a for a in log if t0 + plan.adapt_after - 4.0 <= a.at < t0 + plan.adapt_after]
    timeline = []
    second = 0
    while phase.start + second < t0 + plan.adapt_after:
        window = [a for a in log if phase.start + second <= a.at < phase.start + second + 1]
        counts = _count(a.server for a in window)
        total = sum(counts.values())
        timeline.append(
            {
                "t": second - plan.adapt_before,
                **{s.name: counts.get(s.name, 0) / (total or 1) for s in servers},
            }
        )
        second += 1
    late = [o for o in phase.outcomes if o.sent >= t0]
    return {
        "victim": victim.name,
        "slowdown": plan.slowdown,
        "load": plan.adapt_load,
        "share_before": base,
        "share_end": _share(a.server == victim.name for a in after),
        "halved_after_s": None if halved is None else round(halved, 2),
        "p99_after": latency_summary(late)["p99"],
        "timeline": timeline,
    }


def halved_after(
    arrivals: list[tuple[float, bool]],
    t0: float,
    end: float,
    base: float,
    window: float = 2.0,
    hold: float = 3.0,
    step: float = 0.25,
) -> float | None:
    """Seconds after t0 until the victim's share of arrivals (`(time, to_victim)` pairs) over a
    sliding `window` falls to half of `base` and stays there for `hold` seconds; None if not
    before `end`. Holding matters: a strategy that oscillates dips below half now and then."""

    def halved(t: float) -> bool:
        flags = [victim for at, victim in arrivals if t - window <= at < t]
        return bool(flags) and _share(flags) <= base / 2

    checks = int(hold / step)
    t = t0 + window
    while t + hold <= end:
        if all(halved(t + i * step) for i in range(checks + 1)):
            return t - t0
        t += step
    return None


# --------------------------------------------------------------------------- output


HEADER = (
    f"{'strategy':8} {'load':>5} {'offer':>6} {'done/s':>6} {'tok/s':>6} {'p50':>6} {'p95':>6} "
    f"{'p99':>6} {'ttft50':>6} {'ttft99':>6} {'err%':>5} {'sat%':>5} {'queue%':>6} "
    f"{'lag99':>5} {'cpu':>4}"
)


def _row(name: str, c: dict[str, Any]) -> str:
    return (
        f"{name:8} {100 * c['load']:4.0f}% {c['offered_rps']:6.1f} {c['completed_rps']:6.1f} "
        f"{c['output_tps']:6.0f} {ms(c['p50']):>6} {ms(c['p95']):>6} {ms(c['p99']):>6} "
        f"{ms(c['ttft_p50']):>6} {ms(c['ttft_p99']):>6} {pct(c['error_rate']):>5} "
        f"{pct(c['saturated_share']):>5} {pct(c['queued_share']):>6} "
        f"{ms(c['generator_lag_p99']):>5} {c['cpu_share']:4.2f}"
    )


def _adapt_row(name: str, a: dict[str, Any]) -> str:
    halved = "never" if a["halved_after_s"] is None else f"{a['halved_after_s']:.2f} s"
    return (
        f"{name:8} adaptation: {a['victim']} x{a['slowdown']:g} at {100 * a['load']:.0f}%: share "
        f"{pct(a['share_before'])}% -> {pct(a['share_end'])}%, halved after {halved}, "
        f"p99 after {ms(a['p99_after'])} ms"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--loads", default="0.5,0.7,0.9,1.1", help="fractions of capacity")
    parser.add_argument("--quick", action="store_true", help="loads 0.7,1.1; 6 s cells")
    parser.add_argument("--measure", type=float, default=10.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each cell")
    parser.add_argument(
        "--first-warmup", type=float, default=12.0, help="before a strategy's first cell (blackout)"
    )
    parser.add_argument("--grace", type=float, default=8.0, help="cut-off after a cell's arrivals")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request")
    parser.add_argument("--no-adapt", dest="adapt", action="store_false")
    parser.add_argument("--adapt-after", type=float, default=15.0)
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument("--capacity-seconds", type=float, default=8.0)
    parser.add_argument("--capacity", type=float, default=0.0, help="skip measuring: this rps")
    parser.add_argument("--fast", type=int, default=2)
    parser.add_argument("--slow", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="max_num_seqs of every server")
    parser.add_argument("--kv-fast", type=int, default=4096, help="KV tokens of a fast server")
    parser.add_argument(
        "--max-waiting", type=int, default=0, help="queue bound per server (503 beyond); 0: none"
    )
    parser.add_argument(
        "--orca", action="append", default=[], metavar="KEY=VALUE", help="the pool's orca: params"
    )
    parser.add_argument("--lrs-interval", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1, help="of the first run's schedules")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of every strategy (seeds seed, seed+1, ...)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.loads, args.measure, args.adapt_after = "0.7,1.1", 6.0, 10.0
    if args.repeats < 1:
        parser.error(f"--repeats must be 1 or more, not {args.repeats}")
    unknown = set(args.strategies.split(",")) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
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
        adapt_before=6.0,
        adapt_after=args.adapt_after,
        slowdown=args.slowdown,
        orca=orca,
        lrs_interval=args.lrs_interval,
    )


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
    for path in sorted((root / "lrs").glob("*.py")):
        digest.update(path.read_bytes())
    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git("status", "--porcelain").splitlines(),
        "lrs_sha256": digest.hexdigest()[:16],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    plan = plan_from(args)
    mix = Mix(LENGTHS)
    admissions: list[Admission] = []
    configs = fleet_configs(args.fast, args.slow, args.batch, args.kv_fast, args.max_waiting)
    servers = [CountingServer(config, name, admissions) for name, config in configs]
    started = time.monotonic()
    out: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "source": source_state(),
        "load_average_before": os.getloadavg(),
        "plan": asdict(plan),
        "mix": asdict(mix),
        "fleet": {s.name: s.config.as_dict() for s in servers},
    }
    print(f"load average {os.getloadavg()[0]:.2f}; fleet {[s.name for s in servers]}", flush=True)
    try:
        for server in servers:
            await server.start()
        if args.capacity > 0:
            capacity = {"rps": args.capacity, "given": True}
        else:
            capacity = await measure_capacity(servers, mix, args.capacity_seconds, args.seed)
            await wait_idle(servers)
        out["capacity"] = capacity
        print(f"fleet capacity {capacity['rps']:.1f} req/s {capacity}", flush=True)
        print(HEADER, flush=True)
        results = []
        with tempfile.TemporaryDirectory(prefix="bench-balance-") as tmp:
            for run in range(args.repeats):  # interleaved: drift touches every strategy alike
                seed = args.seed + run
                folder = Path(tmp) / f"run-{run}"
                folder.mkdir()
                for name in args.strategies.split(","):
                    bench = Bench(servers, admissions, capacity["rps"], plan, mix, seed)
                    result = await run_strategy(STRATEGIES[name], bench, folder)
                    results.append(result | {"run": run, "seed": seed})
                    admissions.clear()
    finally:
        for server in servers:
            await server.stop()
    out["results"] = results
    if args.repeats > 1:
        medians = median_cells(runs_of(results))
        out["medians"] = {name: list(cells.values()) for name, cells in medians.items()}
    out["seconds"] = time.monotonic() - started
    out["load_average_after"] = os.getloadavg()
    return out


def report(out: dict[str, Any]) -> str:
    lines = [HEADER]
    for result in out["results"]:
        lines += [_row(result["strategy"]["name"], c) for c in result["cells"]]
    lines += [
        _adapt_row(r["strategy"]["name"], r["adaptation"])
        for r in out["results"]
        if "adaptation" in r
    ]
    runs = runs_of(out["results"])
    if len(runs) > 1:
        lines += ["", f"median of {len(runs)} runs (seeds from {out['results'][0]['seed']} on)"]
        lines.append(HEADER)
        for name, cells in median_cells(runs).items():
            lines += [_row(name, cell) for cell in cells.values()]
    lines += verdict_lines(runs)
    before, after = out["load_average_before"][0], out["load_average_after"][0]
    lines.append(
        f"capacity {out['capacity']['rps']:.1f} req/s; {out['seconds']:.0f} s; "
        f"load average {before:.2f} before, {after:.2f} after"
    )
    return "\n".join(lines)


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
    out = asyncio.run(main_async(args))
    print("\n" + report(out))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "balance.json"
    path.write_text(json.dumps(_json_ready(out), indent=1))
    print(f"wrote {path}")
    if args.plots:
        try:
            from bench.balance_plot import plot
        except ImportError as err:  # matplotlib is the optional `bench` extra
            print(f"no plots ({err}): pip install -e '.[bench]'")
            return 0
        for written in plot(out, args.out):
            print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
