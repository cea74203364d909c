"""A synthetic reporting fleet: the same traffic reported in full or spread, compared.

Spread reporting (`lrs.spread`) asks each pool of a few Envoys only and scales their
counts by the pool's population. Whether that is as good as every Envoy reporting depends
on how alike the Envoys' traffic is and how many requests the few see, so this fleet has
Envoys that differ: each has its own volume (lognormal), its own share of each pool
(lognormal) and its own split over a pool's endpoints (a few percent apart); counts per
report are Poisson; each endpoint's KV-cache use follows its true load over its capacity,
as a model server's would, and reads the same whichever Envoy relays it.

`run_fleet` plays the fleet for some seconds of simulated time into the real `LoadStore`
(through the real `Assignment` when spreading, with a share of the Envoys leaving and
coming back halfway), then reads every endpoint's merged load and the headroom policy's
weights. Every Envoy draws its counts from its own seeded generator in a fixed order,
whatever it reports, so a full and a spread run see exactly the same traffic.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

from envoy.service.load_stats.v3 import lrs_pb2

from lrs.load_store import LoadStore
from lrs.spread import Assignment
from lrs.weights import EndpointInput, load_policy

__all__ = ["Fleet", "FleetRun", "compare", "run_fleet"]

KV = "named_metrics.kv_cache_usage_perc"
#: Headroom policy without smoothing, blackout or hysteresis: weights from this window only.
POLICY = {"blackout": 0, "ewma_alpha": 1.0, "hysteresis": 0}


@dataclass(frozen=True)
class Fleet:
    """The fleet's shape and how its Envoys differ from one another."""

    envoys: int = 200
    pools: int = 10
    endpoints: int = 20
    #: Mean requests per second one Envoy sends one endpoint.
    rps: float = 5.0
    volume_sigma: float = 0.3  # Envoys' total traffic, lognormal
    pool_sigma: float = 0.2  # an Envoy's share of one pool, lognormal
    split_noise: float = 0.05  # an Envoy's split over a pool's endpoints, relative
    seconds: int = 8
    window: float = 5.0
    churn: float = 0.1  # share of the Envoys that leave and reconnect halfway
    seed: int = 7

    def pool(self, p: int) -> str:
        return f"pool-{p:03d}"

    def endpoint(self, p: int, e: int) -> str:
        return f"10.{p // 250}.{p % 250}.{e + 1}:8000"


@dataclass
class FleetRun:
    """What the store and the policy made of one run, per endpoint key."""

    rps: dict[str, float]
    in_progress: dict[str, float]
    kv: dict[str, float]
    weights: dict[str, float]  # share of its pool's weight
    true_rps: dict[str, float]
    endpoint_stats: int
    moves: int


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (normal approximation above a mean of 10, where it is close)."""
    if mean > 10.0:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def _rates(fleet: Fleet) -> list[list[list[float]]]:
    """[envoy][pool][endpoint] -> the requests per second it sends there."""
    rng = random.Random(fleet.seed)
    rates = []
    for _ in range(fleet.envoys):
        volume = rng.lognormvariate(-(fleet.volume_sigma**2) / 2, fleet.volume_sigma)
        per_pool = []
        for _ in range(fleet.pools):
            share = rng.lognormvariate(-(fleet.pool_sigma**2) / 2, fleet.pool_sigma)
            per_pool.append(
                [
                    fleet.rps * volume * share * max(0.0, 1.0 + rng.gauss(0.0, fleet.split_noise))
                    for _ in range(fleet.endpoints)
                ]
            )
        rates.append(per_pool)
    return rates


def _endpoint_loads(fleet: Fleet, rates: list[list[list[float]]]) -> dict[tuple[int, int], Any]:
    """(pool, endpoint) -> (true rps, KV use): each server's load over a capacity of its
    own, so the true weights differ from endpoint to endpoint."""
    rng = random.Random(fleet.seed + 1)
    loads = {}
    for p in range(fleet.pools):
        for e in range(fleet.endpoints):
            total = sum(rates[i][p][e] for i in range(fleet.envoys))
            loads[p, e] = (total, rng.uniform(0.2, 0.7))  # KV use below the 0.8 threshold
    return loads


def _keys(fleet: Fleet, p: int) -> list[str]:
    return [fleet.endpoint(p, e) for e in range(fleet.endpoints)]


def run_fleet(fleet: Fleet, per_pool: int | None) -> FleetRun:
    """Play the fleet into a LoadStore: every Envoy reports all pools (`per_pool` None) or
    the pools an `Assignment` of `per_pool` reporters per pool gives it."""
    rates = _rates(fleet)
    loads = _endpoint_loads(fleet, rates)
    store = LoadStore(window=fleet.window)
    names = [fleet.pool(p) for p in range(fleet.pools)]
    store.set_known({name: _keys(fleet, p) for p, name in enumerate(names)})
    assignment = Assignment(per_pool, store.size) if per_pool is not None else None
    streams = {i: i for i in range(fleet.envoys)}  # envoy -> its current stream id
    if assignment is not None:
        for i in random.Random(fleet.seed + 2).sample(range(fleet.envoys), fleet.envoys):
            assignment.join(i, f"envoy-{i}", names)
        for name in names:
            store.set_population(name, assignment.population(name))
    generators = [random.Random(fleet.seed * 1_000_003 + i) for i in range(fleet.envoys)]
    churned = random.Random(fleet.seed + 3).sample(
        range(fleet.envoys), round(fleet.churn * fleet.envoys)
    )
    next_stream = fleet.envoys
    for second in range(1, fleet.seconds + 1):
        if second == fleet.seconds // 2:
            for i in churned:  # leave, and reconnect on a new stream
                store.forget_reporter(f"envoy-{i}#{streams[i]}")
                if assignment is not None:
                    assignment.leave(streams[i])
                    assignment.join(next_stream, f"envoy-{i}", names)
                streams[i] = next_stream
                next_stream += 1
        for i in range(fleet.envoys):
            now = second + i / fleet.envoys
            asked = names if assignment is None else assignment.clusters(streams[i])
            report = _report(fleet, rates[i], loads, generators[i], set(asked))
            store.ingest(f"envoy-{i}#{streams[i]}", report, now, clusters=asked)
    return _read(fleet, store, loads, assignment)


def _report(
    fleet: Fleet,
    rates: list[list[float]],
    loads: dict[tuple[int, int], Any],
    rng: random.Random,
    asked: set[str],
) -> lrs_pb2.LoadStatsRequest:
    """One Envoy's report of one second; every count is drawn, reported or not."""
    request = lrs_pb2.LoadStatsRequest()
    for p in range(fleet.pools):
        counts = [_poisson(rng, rate) for rate in rates[p]]
        levels = [_poisson(rng, 2.0 * rate) for rate in rates[p]]  # ~2 s in flight each
        if fleet.pool(p) not in asked:
            continue
        stats = request.cluster_stats.add(cluster_name=fleet.pool(p))
        stats.load_report_interval.FromSeconds(1)
        locality = stats.upstream_locality_stats.add()
        locality.locality.zone = "zone-a"
        for e, (count, level) in enumerate(zip(counts, levels, strict=True)):
            host, port = fleet.endpoint(p, e).rsplit(":", 1)
            endpoint = locality.upstream_endpoint_stats.add(
                total_successful_requests=count,
                total_issued_requests=count,
                total_requests_in_progress=level,
            )
            endpoint.address.socket_address.address = host
            endpoint.address.socket_address.port_value = int(port)
            if count:
                endpoint.load_metric_stats.add(
                    metric_name=KV,
                    num_requests_finished_with_metric=count,
                    total_metric_value=count * loads[p, e][1],
                )
    return request


def _read(
    fleet: Fleet,
    store: LoadStore,
    loads: dict[tuple[int, int], Any],
    assignment: Assignment | None,
) -> FleetRun:
    now = fleet.seconds + 0.999
    run = FleetRun({}, {}, {}, {}, {}, store.endpoint_stats, assignment.moves if assignment else 0)
    policy = load_policy("headroom", POLICY)
    for p in range(fleet.pools):
        merged = store.pool_load(fleet.pool(p), now)
        keys = _keys(fleet, p)
        for e, key in enumerate(keys):
            load = merged[key]
            run.rps[key], run.in_progress[key] = load.rps, load.in_progress
            run.kv[key], run.true_rps[key] = load.metrics.get(KV, math.nan), loads[p, e][0]
        inputs = [EndpointInput(k, "zone-a", 1, merged.get(k), 0.0) for k in keys]
        weights = policy.compute(inputs, now).endpoints
        total = sum(weights.values())
        run.weights.update({k: weights[k] / total for k in keys})
    return run


def _errors(mine: dict[str, float], truth: dict[str, float]) -> dict[str, float]:
    """Median, 95th percentile and largest relative difference over the endpoints."""
    errors = sorted(abs(mine[k] / truth[k] - 1.0) for k in truth if truth[k])
    return {
        "median": statistics.median(errors),
        "p95": errors[min(len(errors) - 1, int(0.95 * len(errors)))],
        "max": errors[-1],
    }


def compare(spread: FleetRun, full: FleetRun) -> dict[str, dict[str, float]]:
    """How far spread reporting lands from full reporting, per signal."""
    return {
        "rps": _errors(spread.rps, full.rps),
        "in_progress": _errors(spread.in_progress, full.in_progress),
        "kv": _errors(spread.kv, full.kv),
        "weights": _errors(spread.weights, full.weights),
    }
