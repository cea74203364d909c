"""Weight recompute benchmark: how long HeadroomPolicy takes to weight a whole fleet.

Every round gives each pool fresh load reports (new values, so every sample is
folded into the averages: the full path, not the "nothing new" shortcut) and times
one `compute` per pool, back to back, as the weight engine would run them. Inputs are
built before the clock starts. Target: a full recompute of 10,000 endpoints (500
pools x 20) under 20 ms.

Each round is followed by a quiet tick, QUIET_TICK seconds later: the same reports,
grown older, as the store hands them over on an engine tick between two LRS reports.
Nothing is new, so every pool should give its previous answer back.

Signals are drawn to look like a vLLM fleet behind Envoy: each endpoint has a
steady 1-20 requests/s and 10-90 % KV-cache use, jittered every round; 5 % are
hot (KV-cache full, a queue of 4-12: the saturation path runs); a few report
errors, 2 % of reports are missing and 1 % of endpoints are new (blackout).

    .venv/bin/python bench/weights.py                    # 500 pools x 20, 50 rounds
    .venv/bin/python bench/weights.py --pools 50 --repeat 20
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import cli

from lrs.weights.headroom import HeadroomPolicy
from lrs.weights.params import Params
from lrs.weights.signals import EndpointInput, EndpointLoad, PoolWeights

TARGET_MS = 20.0
ZONES = ("zone-a", "zone-b", "zone-c")
#: Seconds between rounds: the LRS reporting interval the engine would recompute on.
INTERVAL = 1.0
#: Seconds from a round to its quiet tick: the weight engine's default tick.
QUIET_TICK = 0.25


@dataclass(frozen=True, slots=True)
class Profile:
    """One endpoint's steady load, jittered every round: busy, mostly healthy, a few hot."""

    key: str
    zone: str
    static_weight: int
    rps: float
    kv_cache: float
    hot: bool  # a queue builds up: the saturation path runs


def fleet(rng: random.Random, pools: int, size: int) -> list[list[Profile]]:
    return [
        [
            Profile(
                key=f"10.{pool // 250}.{pool % 250}.{index + 1}:8000",
                zone=ZONES[index % len(ZONES)],
                static_weight=1 + index % 2,
                rps=rng.uniform(1.0, 20.0),
                kv_cache=rng.uniform(0.1, 0.9),
                hot=rng.random() < 0.05,
            )
            for index in range(size)
        ]
        for pool in range(pools)
    ]


def fleet_round(
    rng: random.Random, profiles: list[list[Profile]], now: float
) -> list[list[EndpointInput]]:
    """One round of inputs for every pool: fresh reports, a few missing, a few new endpoints."""
    result = []
    for pool in profiles:
        endpoints = []
        for profile in pool:
            known_since = now - rng.uniform(0.0, 15.0) if rng.random() < 0.01 else -3600.0
            load = None
            if rng.random() >= 0.02:
                rps = profile.rps * rng.uniform(0.9, 1.1)
                kv_cache = 0.98 if profile.hot else profile.kv_cache * rng.uniform(0.95, 1.05)
                load = EndpointLoad(
                    rps=rps,
                    error_rps=rps * 0.05 if rng.random() < 0.05 else 0.0,
                    issued_rps=rps,
                    in_progress=rps * rng.uniform(2.0, 8.0),
                    metrics={
                        "named_metrics.kv_cache_usage_perc": kv_cache,
                        "named_metrics.num_requests_waiting": (
                            rng.uniform(4.0, 12.0) if profile.hot else 0.0
                        ),
                    },
                    age=rng.uniform(0.0, 0.9),
                    reporters=3,
                )
            endpoints.append(
                EndpointInput(profile.key, profile.zone, profile.static_weight, load, known_since)
            )
        result.append(endpoints)
    return result


def aged(inputs: list[list[EndpointInput]], seconds: float) -> list[list[EndpointInput]]:
    """The same reports `seconds` later: new objects, as the store builds them on each tick."""
    return [
        [
            replace(item, load=item.load and replace(item.load, age=item.load.age + seconds))
            for item in endpoints
        ]
        for endpoints in inputs
    ]


def _p99(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _full_collections() -> int:
    """Full (generation 2) garbage collections so far: the usual cause of a slow round."""
    return gc.get_stats()[2]["collections"]


class Engine:
    """The weight engine's tick: every pool's policy, back to back. The previous tick's
    answers are let go inside it (the engine replaces them), so freeing them is timed too."""

    def __init__(self, policies: list[HeadroomPolicy]) -> None:
        self.policies = policies
        self.latest: list[PoolWeights] = []

    def tick(self, inputs: list[list[EndpointInput]], now: float) -> list[PoolWeights]:
        self.latest = [
            policy.compute(endpoints, now)
            for policy, endpoints in zip(self.policies, inputs, strict=True)
        ]
        return self.latest


class Timer:
    """Wall and process CPU time of the timed ticks, and the full collections within them."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.full_collections = 0

    def tick(
        self, engine: Engine, inputs: list[list[EndpointInput]], now: float, record: bool
    ) -> list[PoolWeights]:
        collections = _full_collections()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = engine.tick(inputs, now)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if record:
            self.wall.append(elapsed * 1000.0)
            self.cpu.append(cpu * 1000.0)
            self.full_collections += _full_collections() - collections
        return result

    def figures(self, prefix: str) -> dict[str, float]:
        wall, cpu = sorted(self.wall), sorted(self.cpu)
        return {
            f"{prefix}median_ms": statistics.median(wall),
            f"{prefix}p99_ms": _p99(wall),
            f"{prefix}min_ms": wall[0],
            f"{prefix}max_ms": wall[-1],
            f"{prefix}cpu_median_ms": statistics.median(cpu),
            f"{prefix}cpu_p99_ms": _p99(cpu),
            f"{prefix}full_collections": self.full_collections,
        }


def run(pools: int, size: int, repeat: int, warmup: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    profiles = fleet(rng, pools, size)
    engine = Engine([HeadroomPolicy(Params()) for _ in range(pools)])
    full, quiet = Timer(), Timer()
    states: dict[str, int] = {}
    reused = 0
    now = 1000.0
    for round_number in range(warmup + repeat):
        record = round_number >= warmup
        now += INTERVAL
        inputs = fleet_round(rng, profiles, now)
        results = full.tick(engine, inputs, now, record)
        later = aged(inputs, QUIET_TICK)
        again = quiet.tick(engine, later, now + QUIET_TICK, record)
        if record:
            reused += sum(one is two for one, two in zip(results, again, strict=True))
            for weights in results:
                for why in weights.explain.values():
                    state = str(why["state"])
                    states[state] = states.get(state, 0) + 1
        del results, again  # the engine alone holds the answers, and lets them go when timed
    endpoints = pools * size
    figures = full.figures("") | quiet.figures("quiet_")
    return figures | {
        "endpoints": endpoints,
        "rounds": repeat,
        "us_per_endpoint": figures["median_ms"] * 1000.0 / endpoints,
        "quiet_reused_share": reused / (repeat * pools),
        "load_average": os.getloadavg()[0],
        "states_per_round": {k: v / repeat for k, v in sorted(states.items())},
    }


def report(figures: dict[str, Any], pools: int, per_pool: int) -> str:
    lines: list[str] = []
    lines.append(
        f"full recompute, {figures['endpoints']:,} endpoints "
        f"({pools} pools x {per_pool}), {figures['rounds']} rounds:"
    )
    lines.append(f"  median {figures['median_ms']:.2f} ms   p99 {figures['p99_ms']:.2f} ms")
    lines.append(f"  min {figures['min_ms']:.2f} ms   max {figures['max_ms']:.2f} ms")
    lines.append(
        f"  process CPU: median {figures['cpu_median_ms']:.2f} ms   "
        f"p99 {figures['cpu_p99_ms']:.2f} ms   (1-min load average {figures['load_average']:.2f})"
    )
    lines.append(f"  {figures['us_per_endpoint']:.2f} us per endpoint")
    lines.append(
        f"  full garbage collections within the timed rounds: {figures['full_collections']}"
    )
    lines.append(
        f"quiet tick ({QUIET_TICK:g} s later, no new report): "
        f"median {figures['quiet_median_ms']:.2f} ms   p99 {figures['quiet_p99_ms']:.2f} ms   "
        f"({figures['quiet_median_ms'] / figures['median_ms']:.0%} of a full recompute; "
        f"{figures['quiet_reused_share']:.0%} of the answers given back unchanged)"
    )
    states = ", ".join(f"{k} {v:.0f}" for k, v in figures["states_per_round"].items())
    lines.append(f"  endpoint states per round: {states}")
    verdict = "met" if figures["median_ms"] < TARGET_MS else "NOT met"
    lines.append(f"  target: median under {TARGET_MS:.0f} ms: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--pools", type=int, default=500, help="pools (default 500)")
    parser.add_argument("--endpoints", type=int, default=20, help="endpoints per pool (20)")
    parser.add_argument("--repeat", type=int, default=50, help="timed rounds (default 50)")
    parser.add_argument("--warmup", type=int, default=15, help="untimed rounds first (15)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the signals")
    args = parser.parse_args(argv)
    figures = run(args.pools, args.endpoints, args.repeat, args.warmup, args.seed)
    cli.publish(report(figures, args.pools, args.endpoints), figures, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
