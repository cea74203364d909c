"""The weight policy: parameters, the headroom policy's behaviour, plug-ins, and properties."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrs.contract import MAX_WEIGHT
from lrs.weights.headroom import HeadroomPolicy
from lrs.weights.params import SATURATED_ACTIONS, ParamError, Params, parse_params
from lrs.weights.policy import PolicyError, WeightPolicy, check_weights, load_policy
from lrs.weights.signals import EndpointInput, EndpointLoad, PoolWeights

KV = "named_metrics.kv_cache_usage_perc"
QUEUE = "named_metrics.num_requests_waiting"
LONG_AGO = -10_000.0
#: Rounds (1 s apart) that take every endpoint past the blackout after its first report.
SETTLE = 15
#: For fleets whose reports do not answer the weights (`steady`): what the estimate alone
#: gives. Probing a starved endpoint waits for its traffic to move, which it never does
#: here; tests/test_convergence.py closes the loop.
NO_PROBE = Params(explore_pressure=0.0)


def load(
    rps: float = 10.0,
    kv: float | None = None,
    queue: float | None = None,
    *,
    errors: float = 0.0,
    in_progress: float = 0.0,
    age: float = 0.0,
    metrics: dict[str, float] | None = None,
) -> EndpointLoad:
    values = dict(metrics or {})
    if kv is not None:
        values[KV] = kv
    if queue is not None:
        values[QUEUE] = queue
    return EndpointLoad(
        rps=rps, error_rps=errors, in_progress=in_progress, metrics=values, age=age, reporters=1
    )


def endpoint(
    key: str,
    report: EndpointLoad | None,
    zone: str = "zone-a",
    static: int = 1,
    known_since: float = LONG_AGO,
) -> EndpointInput:
    return EndpointInput(key, zone, static, report, known_since)


Fleet = Callable[[float], Sequence[EndpointInput]]


def run(policy: WeightPolicy, fleet: Fleet, start: float, rounds: int = SETTLE) -> PoolWeights:
    """Calls compute once a second for `rounds` rounds; returns the last answer."""
    result = None
    for index in range(rounds):
        now = start + index
        result = policy.compute(fleet(now), now)
        assert check_weights(fleet(now), result) == ""
    assert result is not None
    return result


def steady(**loads: EndpointLoad) -> Fleet:
    """The same fresh reports every round, one endpoint per keyword."""
    return lambda now: [endpoint(key, report) for key, report in loads.items()]


def states(result: PoolWeights) -> dict[str, object]:
    return {key: why["state"] for key, why in result.explain.items()}


# --------------------------------------------------------------------------- parameters


def test_defaults_follow_the_sources_they_cite() -> None:
    params = parse_params({})
    assert params == Params() == parse_params(None)
    assert (params.kv_cache_threshold, params.queue_threshold) == (0.8, 5.0)  # inference gateway
    assert params.blackout == 10.0 and params.error_penalty == 1.0  # CS-WRR, gRFC A58
    assert params.kv_cache_metrics[0] == KV and "kv_cache_utilization" in params.kv_cache_metrics[1]


def test_parse_params_reads_every_kind_of_value() -> None:
    params = parse_params(
        {
            "kv_cache_metrics": "named_metrics.gpu_cache_usage_perc",
            "utilization_metrics": [],
            "queue_threshold": 8,
            "saturated_action": "lower_priority",
            "weight_scale": 500,
            "hysteresis": 0,
            "blackout": None,  # null keeps the default
        }
    )
    assert params.kv_cache_metrics == ("named_metrics.gpu_cache_usage_perc",)
    assert params.utilization_metrics == ()
    assert params.queue_threshold == 8 and params.weight_scale == 500 and params.hysteresis == 0
    assert params.saturated_action == "lower_priority" and params.blackout == 10.0


def test_parse_params_reports_every_problem_with_its_key() -> None:
    with pytest.raises(ParamError) as caught:
        parse_params(
            {
                "kv_cache_threshold": 0,
                "ewma_alpha": "0.3",
                "bogus": 1,
                "queue_metrics": ["ok", 3],
                "saturated_action": "drop",
                "weight_scale": 10.5,
                "hysteresis": True,
                "expiry": math.inf,
                "min_rps": 10**400,
            }
        )
    problems = dict(caught.value.problems)
    assert set(problems) == {
        "kv_cache_threshold",
        "ewma_alpha",
        "bogus",
        "queue_metrics[1]",
        "saturated_action",
        "weight_scale",
        "hysteresis",
        "expiry",
        "min_rps",
    }
    assert "out of range (0, 1]" in problems["kv_cache_threshold"]
    assert "without quotes" in problems["ewma_alpha"]
    assert "unknown parameter" in problems["bogus"] and "kv_cache_threshold" in problems["bogus"]
    assert "min_weight, lower_priority" in problems["saturated_action"]
    assert "integer" in problems["weight_scale"]
    assert "expected a number" in problems["hysteresis"]
    assert "ewma_alpha: " in str(caught.value)


def test_parse_params_refuses_a_non_mapping() -> None:
    with pytest.raises(ParamError) as caught:
        parse_params(["kv_cache_threshold", 0.8])  # type: ignore[arg-type]
    assert caught.value.problems[0][0] == ""


# --------------------------------------------------------------------------- headroom policy


def test_weights_are_proportional_to_capacity() -> None:
    # Same pressure, twice the throughput: twice the capacity (the CS-WRR fixed point).
    result = run(HeadroomPolicy(NO_PROBE), steady(a=load(20, kv=0.4), b=load(10, kv=0.4)), 0.0)
    assert result.endpoints == {"a": 1000, "b": 500}
    assert result.explain["a"]["capacity"] == 40.0
    assert result.explain["a"]["bottleneck"] == "kv_cache"


def test_saturated_slow_endpoint_gets_less_than_one_with_headroom() -> None:
    fleet = steady(fast=load(10, kv=0.3, queue=0), slow=load(10, kv=0.95, queue=8))
    result = run(HeadroomPolicy(Params()), fleet, 0.0)
    weights = result.endpoints
    # Equal throughput, but the slow one is full: its share falls below its 50 %.
    assert weights["slow"] / (weights["fast"] + weights["slow"]) < 0.1
    assert states(result) == {"fast": "active", "slow": "saturated"}
    why = result.explain["slow"]
    assert why["bottleneck"] == "queue" and why["pressure"] == 1.6 and why["priority"] == 0
    assert result.saturated == frozenset()  # min_weight keeps it in priority 0


def test_weights_come_back_when_the_endpoint_recovers() -> None:
    policy = HeadroomPolicy(Params())
    run(policy, steady(fast=load(10, kv=0.3), slow=load(10, kv=0.95, queue=8)), 0.0)
    result = run(policy, steady(fast=load(10, kv=0.3), slow=load(10, kv=0.3, queue=0)), SETTLE)
    assert states(result) == {"fast": "active", "slow": "active"}
    # Back to its capacity: equal to the fast one's, give or take the hysteresis.
    assert result.endpoints["slow"] == pytest.approx(result.endpoints["fast"], rel=0.05)


def test_small_jitter_leaves_weights_unchanged() -> None:
    base = {"a": (20.0, 0.4), "b": (10.0, 0.4), "c": (10.0, 0.7), "d": (5.0, 0.2)}

    def jittered(size: float) -> Fleet:
        def fleet(now: float) -> list[EndpointInput]:
            out = []
            for phase, (key, (rps, kv)) in enumerate(base.items()):
                sign = 1 if (int(now) + phase) % 2 else -1  # worst case: rps and kv apart
                out.append(endpoint(key, load(rps * (1 + sign * size), kv * (1 - sign * size))))
            return out

        return fleet

    policy = HeadroomPolicy(NO_PROBE)
    settled = run(policy, jittered(0.0), 0.0).endpoints
    for index in range(40):
        now = SETTLE + index
        assert policy.compute(jittered(0.02)(now), now).endpoints == settled
    # A real change does move them: the test above could fail.
    assert run(policy, jittered(0.2), SETTLE + 40, rounds=3).endpoints != settled


def test_new_endpoint_gets_the_median_weight_during_blackout() -> None:
    policy = HeadroomPolicy(Params(blackout=10.0))
    others = {"a": load(20, kv=0.4), "b": load(10, kv=0.4), "c": load(5, kv=0.4)}
    run(policy, steady(**others), 0.0)

    def fleet(now: float) -> list[EndpointInput]:
        fresh = endpoint("new", load(100, kv=0.1), known_since=20.0)
        return [endpoint(key, report) for key, report in others.items()] + [fresh]

    during = run(policy, fleet, 20.0, rounds=5)
    assert during.explain["new"]["state"] == "blackout"
    assert during.endpoints["new"] == during.endpoints["b"]  # the median capacity
    after = run(policy, fleet, 30.0, rounds=3)
    assert after.explain["new"]["state"] == "active"
    assert after.endpoints["new"] == max(after.endpoints.values())


def test_neutral_weight_scales_with_static_weight() -> None:
    fleet = [endpoint(f"e{static}", None, static=static) for static in (1, 2, 4)]
    result = HeadroomPolicy(Params()).compute(fleet, 0.0)
    assert result.endpoints == {"e1": 250, "e2": 500, "e4": 1000}
    assert set(states(result).values()) == {"stale"}


def test_load_older_than_expiry_goes_neutral() -> None:
    policy = HeadroomPolicy(Params(expiry=30.0, explore_pressure=0.0))
    others = {"a": load(20, kv=0.4), "b": load(10, kv=0.4), "c": load(5, kv=0.4)}
    run(policy, steady(**others, quiet=load(40, kv=0.4)), 0.0)

    def envoy_stopped(now: float) -> list[EndpointInput]:
        # The store keeps handing over the last window; its age grows.
        frozen = load(40, kv=0.4, age=now - 14.0)
        return [endpoint(key, report) for key, report in others.items()] + [
            endpoint("quiet", frozen)
        ]

    still = run(policy, envoy_stopped, 15.0, rounds=25)  # up to 25 s old: still used
    assert still.explain["quiet"]["state"] == "active"
    assert still.endpoints["quiet"] == 1000
    expired = run(policy, envoy_stopped, 45.0, rounds=1)
    assert expired.explain["quiet"]["state"] == "stale"
    assert expired.endpoints["quiet"] == expired.endpoints["b"]


def test_endpoint_without_reports_goes_stale_then_blacks_out_when_they_resume() -> None:
    policy = HeadroomPolicy(Params())
    run(policy, steady(a=load(10, kv=0.4), b=load(10, kv=0.4)), 0.0)
    gone = run(policy, lambda now: [endpoint("a", load(10, kv=0.4)), endpoint("b", None)], 15.0, 31)
    assert states(gone) == {"a": "active", "b": "stale"}
    back = run(policy, steady(a=load(10, kv=0.4), b=load(40, kv=0.4)), 46.0, rounds=2)
    assert states(back) == {"a": "active", "b": "blackout"}
    assert back.endpoints["b"] == back.endpoints["a"]


def test_idle_or_silent_endpoints_are_neutral_never_zero_or_infinite() -> None:
    fleet = steady(
        idle=load(0.0, kv=0.0, queue=0),
        trickle=load(0.01, kv=0.01),
        silent=load(10),  # no metric at all
    )
    result = run(HeadroomPolicy(Params()), fleet, 0.0)
    assert states(result) == {"idle": "idle", "trickle": "idle", "silent": "no_signal"}
    assert set(result.endpoints.values()) == {1000}


def test_near_zero_pressure_under_traffic_counts_as_lightly_loaded_not_unknown() -> None:
    # Seen with a real Envoy: fast servers barely fill their KV cache while a slowed one
    # queues; treating the fast ones as unknown (median) gave everyone the same weight.
    result = run(
        HeadroomPolicy(Params()), steady(busy=load(10, kv=0.4), light=load(10, kv=0.004)), 0
    )
    assert states(result) == {"busy": "active", "light": "active"}
    # busy: 10 / 0.5 = 20 requests/s at pressure 1; light: 10 / min_utilization = 200.
    assert result.endpoints == {"busy": 100, "light": 1000}


def test_an_endpoint_starved_of_traffic_keeps_its_estimate_until_expiry() -> None:
    """A low weight means few requests; too few to estimate from must not reset the weight
    to the median (traffic would flood back and the weights flap)."""
    policy = HeadroomPolicy(Params(expiry=30.0))
    run(policy, steady(a=load(10, kv=0.4), slow=load(2, kv=0.8)), 0.0)  # slow: 2 / 1 = 2 rps
    starved = steady(a=load(10, kv=0.4), slow=load(0.0))
    held = run(policy, starved, 15.0, rounds=10)
    assert states(held) == {"a": "active", "slow": "held"}
    assert held.endpoints == {"a": 1000, "slow": 100}
    expired = run(policy, starved, 25.0, rounds=25)
    assert states(expired)["slow"] == "idle"
    assert expired.endpoints["slow"] == expired.endpoints["a"]


def test_lower_priority_moves_saturated_endpoint_out_of_its_zone() -> None:
    fleet = lambda now: [  # noqa: E731
        endpoint("a", load(10, kv=0.3)),
        endpoint("hot", load(10, kv=1.0, queue=9)),
        endpoint("c", load(10, kv=0.3), zone="zone-b"),
    ]
    result = run(HeadroomPolicy(Params(saturated_action="lower_priority")), fleet, 0.0)
    assert result.saturated == frozenset({"hot"})
    assert result.explain["hot"]["priority"] == 1
    assert result.localities == {"zone-a": result.endpoints["a"], "zone-b": result.endpoints["c"]}


def test_probe_brings_a_lower_priority_endpoint_back_when_reports_stop() -> None:
    policy = HeadroomPolicy(Params(saturated_action="lower_priority", probe_after=5.0))
    run(policy, steady(a=load(10, kv=0.3), hot=load(10, kv=1.0, queue=9)), 0.0)

    def no_traffic(now: float) -> list[EndpointInput]:
        return [endpoint("a", load(10, kv=0.3)), endpoint("hot", None)]

    held = run(policy, no_traffic, 15.0, rounds=4)
    assert held.saturated == frozenset({"hot"})
    probed = run(policy, no_traffic, 19.0, rounds=2)
    assert probed.saturated == frozenset()
    assert probed.explain["hot"]["state"] == "active"


def test_a_queueing_server_is_weighted_by_its_throughput_less_its_backlog() -> None:
    """Seen in the balancing benchmark: dividing throughput by queue / queue_threshold put a
    server serving 11 requests/s at 2.75; twin servers then swung traffic between them."""
    fleet = steady(busy=load(11, kv=0.9, queue=20), calm=load(8, kv=0.4))
    result = run(HeadroomPolicy(Params(drain_time=10.0)), fleet, 0.0)
    # busy: 11 - 20 / 10 = 9 requests/s; calm: 8 / 0.5 = 16.
    assert result.endpoints == {"busy": int(1000 * 9 / 16 + 0.5), "calm": 1000}
    assert result.explain["busy"]["bottleneck"] == "queue"
    # Its pressure (20 / 5 = 4) is averaged capped at 2, so it leaves saturation in time.
    assert result.explain["busy"]["pressure"] == pytest.approx(2.0)


def test_a_backlog_larger_than_the_drain_rate_leaves_a_trickle_not_zero() -> None:
    fleet = steady(swamped=load(5, kv=1.0, queue=100), calm=load(10, kv=0.4))
    result = run(HeadroomPolicy(Params(saturation_exit=0.99)), fleet, 0.0)
    # 5 - 100 / 10 < 0: kept at saturated_weight (5 %) of its capacity, 0.25 requests/s.
    assert result.endpoints["swamped"] == int(1000 * 0.25 / 20 + 0.5)
    assert result.endpoints["calm"] == 1000


def test_whole_pool_saturated_is_weighted_by_headroom() -> None:
    result = run(HeadroomPolicy(Params()), steady(a=load(20, 0.95, 6), b=load(10, 0.95, 6)), 0.0)
    assert states(result) == {"a": "active", "b": "active"}
    # Saturated: capacity is throughput, less the queue's drain rate (6 / drain_time 10).
    assert result.endpoints == {"a": 1000, "b": int(1000 * 9.4 / 19.4 + 0.5)}


def test_saturated_endpoint_stays_when_the_others_cannot_take_its_traffic() -> None:
    fleet = steady(almost=load(10, kv=0.76), hot=load(10, kv=1.0, queue=6))
    result = run(HeadroomPolicy(Params(saturated_action="lower_priority")), fleet, 0.0)
    assert result.saturated == frozenset()
    assert states(result) == {"almost": "active", "hot": "active"}
    assert result.endpoints["hot"] < result.endpoints["almost"]


def test_locality_weights_are_zone_sums_and_a_hot_zone_gets_less() -> None:
    def fleet(now: float) -> list[EndpointInput]:
        return [
            endpoint("a1", load(10, kv=0.3), zone="zone-a"),
            endpoint("a2", load(10, kv=0.3), zone="zone-a"),
            endpoint("b1", load(10, kv=0.7), zone="zone-b"),
            endpoint("b2", load(10, kv=0.75), zone="zone-b"),
        ]

    result = run(HeadroomPolicy(Params()), fleet, 0.0)
    weights = result.endpoints
    assert result.localities == {
        "zone-a": weights["a1"] + weights["a2"],
        "zone-b": weights["b1"] + weights["b2"],
    }
    assert result.localities["zone-b"] < result.localities["zone-a"] / 2


def test_errors_lower_the_weight() -> None:
    result = run(HeadroomPolicy(NO_PROBE), steady(ok=load(10, 0.4), bad=load(10, 0.4, errors=5)), 0)
    assert result.endpoints == {"ok": 1000, "bad": 500}  # utilization 0.5 + 0.5 errors


def test_a_report_is_taken_in_once_and_smoothing_follows_report_time() -> None:
    policy = HeadroomPolicy(Params(ewma_alpha=0.3))
    run(policy, steady(a=load(10, kv=0.4), b=load(10, kv=0.4)), 0.0)
    spike_at = 15.0
    for now in (15.0, 16.0, 17.0, 18.0):  # the same report, growing older
        fleet = [endpoint("a", load(10, kv=0.8, age=now - spike_at)), endpoint("b", load(10, 0.4))]
        result = policy.compute(fleet, now)
    assert result.explain["a"]["pressure"] == pytest.approx(0.5 + 0.3 * 0.5)
    # The next report comes 5 s after the last: it weighs 1 - 0.7**5.
    result = policy.compute([endpoint("a", load(10, kv=0.8)), endpoint("b", load(10, 0.4))], 20.0)
    assert result.explain["a"]["pressure"] == pytest.approx(0.65 + (1 - 0.7**5) * 0.35, abs=1e-4)


def test_in_flight_threshold_weights_by_envoy_observed_latency() -> None:
    fleet = steady(quick=load(10, in_progress=5), sluggish=load(10, in_progress=10))
    result = run(HeadroomPolicy(Params(in_flight_threshold=20, explore_pressure=0.0)), fleet, 0.0)
    assert result.endpoints == {"quick": 1000, "sluggish": 500}
    assert result.explain["sluggish"]["latency_s"] == 1.0
    assert result.explain["sluggish"]["bottleneck"] == "in_flight"
    off = run(HeadroomPolicy(Params()), fleet, 0.0)
    assert off.endpoints == {"quick": 1000, "sluggish": 1000}


def test_metric_names_fall_back_and_can_be_mapped_per_pool() -> None:
    triton = {"named_metrics.kv_cache_utilization": 0.6}
    result = run(HeadroomPolicy(Params()), steady(t=load(10, metrics=triton), v=load(10, 0.4)), 0)
    assert result.endpoints == {"t": 667, "v": 1000}
    custom = Params(kv_cache_metrics=("named_metrics.gpu_cache_usage_perc",))
    mine = {"named_metrics.gpu_cache_usage_perc": 0.4}
    result = run(HeadroomPolicy(custom), steady(x=load(20, metrics=mine), y=load(10, 0.4)), 0)
    assert result.endpoints == {"x": 1000, "y": 1000}  # y's vLLM name is not configured
    assert states(result) == {"x": "active", "y": "no_signal"}


def test_removed_endpoints_are_forgotten() -> None:
    policy = HeadroomPolicy(Params())
    run(policy, steady(a=load(10, 0.4), b=load(10, 0.4)), 0.0)
    run(policy, steady(a=load(10, 0.4)), 15.0, rounds=1)
    again = run(policy, steady(a=load(10, 0.4), b=load(10, 0.4)), 16.0, rounds=1)
    assert states(again) == {"a": "active", "b": "blackout"}


def test_explanation_is_json_ready() -> None:
    result = run(HeadroomPolicy(Params()), steady(a=load(10, 0.4), b=load(math.nan, math.inf)), 0)
    text = json.dumps({key: dict(why) for key, why in result.explain.items()}, allow_nan=False)
    assert json.loads(text)["a"]["report_age_s"] == 0.0
    assert len(result.explain) == 2 and list(result.explain) == ["a", "b"]


def test_empty_pool() -> None:
    assert HeadroomPolicy(Params()).compute([], 0.0) == PoolWeights(endpoints={}, localities={})


def test_emptied_pool_forgets_its_endpoints() -> None:
    policy = HeadroomPolicy(Params())
    fleet = steady(a=load(10, 0.4), b=load(20, 0.4))
    before = run(policy, fleet, 0.0)
    assert policy.compute([], 15.0).endpoints == {}
    again = run(policy, fleet, 15.0, rounds=1)
    assert again is not before and states(again) == {"a": "blackout", "b": "blackout"}


# --------------------------------------------------------------------------- no new data


def reported_at(at: float, **loads: EndpointLoad) -> Fleet:
    """The store's view when the last reports came at `at`: the same values, growing older."""
    return lambda now: [
        endpoint(key, replace(report, age=now - at)) for key, report in loads.items()
    ]


def test_a_call_with_nothing_new_returns_the_previous_answer_itself() -> None:
    policy = HeadroomPolicy(Params(probe_after=5.0))
    last = run(policy, steady(a=load(20, kv=0.4), b=load(10, kv=0.6)), 0.0)  # last report at 14
    quiet = reported_at(14.0, a=load(20, kv=0.4), b=load(10, kv=0.6))
    for now in (14.0, 15.0, 18.9):  # new input objects, but no new report and nothing due
        assert policy.compute(quiet(now), now) is last
    # A new report is taken in (here it changes nothing Envoy sees, yet it is a new answer).
    fresh = policy.compute([endpoint("a", load(20, kv=0.4)), quiet(18.9)[1]], 18.9)
    assert fresh is not last and fresh == last
    # An endpoint's static weight or zone, or another endpoint, is a change too.
    moved = [endpoint("a", quiet(18.9)[0].load, zone="zone-b"), quiet(18.9)[1]]
    assert policy.compute(moved, 18.9).localities == {
        "zone-a": last.endpoints["b"],
        "zone-b": last.endpoints["a"],
    }
    assert set(policy.compute(quiet(18.9)[:1], 18.9).endpoints) == {"a"}


def test_a_change_due_by_time_alone_is_not_skipped() -> None:
    params = Params(blackout=10.0, expiry=30.0, probe_after=5.0, explore_pressure=0.0)
    policy = HeadroomPolicy(params)
    quiet = reported_at(5.0, a=load(20, kv=0.4), b=load(10, kv=0.4))
    first = policy.compute(quiet(5.0), 5.0)
    assert policy.compute(quiet(9.9), 9.9) is first
    assert set(states(first).values()) == {"blackout"}
    assert states(policy.compute(quiet(15.0), 15.0)) == {"a": "active", "b": "active"}
    active = policy.compute(quiet(34.0), 34.0)
    assert policy.compute(quiet(34.9), 34.9) is active
    assert states(policy.compute(quiet(35.0), 35.0))["a"] == "active"  # 30 s old: still used
    assert set(states(policy.compute(quiet(35.1), 35.1)).values()) == {"stale"}


def test_a_saturated_endpoint_is_probed_when_its_reports_stop() -> None:
    params = Params(saturated_action="lower_priority", probe_after=5.0)
    policy = HeadroomPolicy(params)
    run(policy, steady(a=load(10, kv=0.3), hot=load(10, kv=1.0, queue=9)), 0.0)
    quiet = reported_at(14.0, a=load(10, kv=0.3), hot=load(10, kv=1.0, queue=9))
    moved = policy.compute(quiet(18.0), 18.0)
    assert moved.saturated == frozenset({"hot"}) and policy.compute(quiet(18.5), 18.5) is moved
    assert policy.compute(quiet(19.0), 19.0).saturated == frozenset()


def test_an_answer_the_same_inputs_would_not_give_again_is_not_reused() -> None:
    # "warm" was saturated and still counts as such (pressure 0.95 >= saturation_exit), so
    # its spare capacity is not counted and "hot" cannot leave; warm cannot either and is
    # let back in, so next time its spare counts and hot does leave.
    params = Params(saturated_action="lower_priority", ewma_alpha=1.0, blackout=0.0)
    policy = HeadroomPolicy(params)
    cool = load(1, kv=0.08)  # capacity 10: 9 requests/s to spare
    run(policy, steady(cool=cool, warm=load(5, kv=0.96), hot=load(10, kv=0.4)), 0.0, rounds=3)
    now_hot = {"cool": cool, "warm": load(100, kv=0.76), "hot": load(10, kv=0.96)}
    assert policy.compute(steady(**now_hot)(3.0), 3.0).saturated == frozenset()
    assert policy.compute(reported_at(3.0, **now_hot)(3.5), 3.5).saturated == {"hot"}


class _NoShortcut(HeadroomPolicy):
    """The reference: the same policy, recomputing on every call."""

    def _reusable(self, endpoints: Sequence[EndpointInput], now: float) -> PoolWeights | None:
        return None


# --------------------------------------------------------------------------- plug-ins


def test_load_policy_builds_the_headroom_policy() -> None:
    policy = load_policy("headroom", {"weight_scale": 10})
    assert isinstance(policy, HeadroomPolicy) and isinstance(policy, WeightPolicy)
    assert policy.params.weight_scale == 10
    assert load_policy("headroom", Params(hysteresis=0.2)).params.hysteresis == 0.2  # type: ignore[attr-defined]
    with pytest.raises(ParamError):
        load_policy("headroom", {"weight_scale": 0})


def test_load_policy_imports_a_custom_class_with_its_own_params() -> None:
    policy = load_policy("tests.custom_policy:RequestShare", {"boost_zone": "b", "boost": 3})
    assert isinstance(policy, WeightPolicy)
    fleet = [endpoint("x", load(4), zone="a"), endpoint("y", load(4), zone="b")]
    result = policy.compute(fleet, 0.0)
    assert result.endpoints == {"x": 4, "y": 12}
    assert result.localities == {"a": 4, "b": 12}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("roundrobin", "unknown policy 'roundrobin'; expected 'headroom' or 'module:Class'"),
        ("module:", "expected 'headroom' or 'module:Class'"),
        ("tests.no_such_module:Policy", "cannot import module 'tests.no_such_module'"),
        ("tests.custom_policy:Missing", "module 'tests.custom_policy' has no attribute 'Missing'"),
        ("tests.custom_policy:NOT_A_CLASS", "is a int, not a class"),
        ("tests.custom_policy:NoCompute", "built a NoCompute without a compute() method"),
        ("tests.custom_policy:Picky", "failed: ValueError: boost must be positive"),
    ],
)
def test_load_policy_errors_are_clear(spec: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(spec, {})
    assert message in str(caught.value)


def test_custom_policy_answers_are_checked() -> None:
    policy = load_policy("tests.custom_policy:ZeroWeights", {})
    with pytest.raises(PolicyError, match="endpoint 'x' has weight 0"):
        policy.compute([endpoint("x", None)], 0.0)


@pytest.mark.parametrize(
    ("weights", "problem"),
    [
        (PoolWeights({"x": 1}, {"zone-a": 1}), "differ from the pool's"),
        (PoolWeights({"x": 1, "y": 1}, {"zone-b": 2}), "locality keys"),
        (PoolWeights({"x": 1, "y": 1}, {"zone-a": 2}, frozenset({"x", "y"})), "priority 1"),
        (PoolWeights({"x": 1, "y": 1}, {"zone-a": 2}, frozenset({"z"})), "not in the pool"),
        (PoolWeights({"x": 1.0, "y": 1}, {"zone-a": 2}), "expected an integer"),  # type: ignore[dict-item]
        (PoolWeights({"x": MAX_WEIGHT, "y": 1}, {"zone-a": MAX_WEIGHT + 1}), "locality 'zone-a'"),
        ("weights", "expected PoolWeights"),
    ],
)
def test_check_weights_names_the_problem(weights: object, problem: str) -> None:
    fleet = [endpoint("x", None), endpoint("y", None)]
    assert problem in check_weights(fleet, weights)


# --------------------------------------------------------------------------- properties

_wild = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=0.0, max_value=100.0),
    st.sampled_from([0.0, -1.0, 1e-300, 1e300, math.nan, math.inf]),
)
_metric_names = st.sampled_from(
    [KV, QUEUE, "named_metrics.kv_cache_utilization", "application_utilization", "other"]
)
_loads = st.builds(
    EndpointLoad,
    rps=_wild,
    error_rps=_wild,
    in_progress=_wild,
    metrics=st.dictionaries(_metric_names, _wild, max_size=4),
    age=st.one_of(st.floats(min_value=0.0, max_value=60.0), _wild),
)
_params = st.builds(
    Params,
    saturated_action=st.sampled_from(SATURATED_ACTIONS),
    weight_scale=st.sampled_from([1, 1000, MAX_WEIGHT]),
    hysteresis=st.sampled_from([0.0, 0.05, 0.5]),
    in_flight_threshold=st.sampled_from([0.0, 8.0]),
    blackout=st.sampled_from([0.0, 10.0]),
)


@st.composite
def _rounds(draw: st.DrawFn) -> tuple[Params, list[tuple[float, list[EndpointInput]]]]:
    """A pool of 1..200 endpoints and a few rounds of wild reports, time moving forward."""
    size = draw(st.integers(min_value=1, max_value=200))
    zones = draw(st.lists(st.sampled_from(["", "a", "b", "c"]), min_size=size, max_size=size))
    statics = draw(
        st.lists(st.one_of(st.just(1), st.integers(1, MAX_WEIGHT)), min_size=size, max_size=size)
    )
    since = draw(st.lists(st.sampled_from([LONG_AGO, 0.0, 5.0]), min_size=size, max_size=size))
    rounds = []
    now = 0.0
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        now += draw(st.sampled_from([0.0, 0.5, 1.0, 7.0, 40.0]))
        loads = draw(st.lists(st.none() | _loads, min_size=size, max_size=size))
        rounds.append(
            (
                now,
                [
                    EndpointInput(f"10.0.0.{i}:80", zones[i], statics[i], loads[i], since[i])
                    for i in range(size)
                ],
            )
        )
    return draw(_params), rounds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rounds())
def test_weights_are_always_valid_for_envoy(case: tuple[Params, list]) -> None:
    params, rounds = case
    policy = HeadroomPolicy(params)
    for now, fleet in rounds:
        result = policy.compute(fleet, now)
        assert check_weights(fleet, result) == ""  # 1..MAX_WEIGHT, keys, uint32, not all moved
        weights = result.endpoints
        total = sum(weights.values())
        assert total <= MAX_WEIGHT
        # Never all minimal: the endpoint with most capacity gets the full scale when it fits.
        if params.weight_scale * len(fleet) <= MAX_WEIGHT - len(fleet):
            assert max(weights.values()) == params.weight_scale
        saturated = [key for key, why in result.explain.items() if why["state"] == "saturated"]
        assert len(saturated) < len(fleet)
        in_zone: dict[str, int] = {}
        for item in fleet:
            if item.key not in result.saturated:
                in_zone[item.zone] = in_zone.get(item.zone, 0) + weights[item.key]
        assert {z: w for z, w in result.localities.items() if z in in_zone} == in_zone
        json.dumps([dict(why) for why in result.explain.values()], allow_nan=False)


def assert_same_answer(one: PoolWeights, two: PoolWeights) -> None:
    """The same for Envoy, and explained alike."""
    assert (one.endpoints, one.localities, one.saturated) == (
        two.endpoints,
        two.localities,
        two.saturated,
    )
    assert [(key, dict(why)) for key, why in one.explain.items()] == [
        (key, dict(why)) for key, why in two.explain.items()
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rounds())
def test_same_calls_give_the_same_weights(case: tuple[Params, list]) -> None:
    params, rounds = case
    first, second = HeadroomPolicy(params), HeadroomPolicy(params)
    for now, fleet in rounds:
        assert_same_answer(first.compute(fleet, now), second.compute(fleet, now))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rounds(), st.data())
def test_the_shortcut_gives_what_a_full_recompute_gives(
    case: tuple[Params, list], data: st.DataObject
) -> None:
    """Each round is asked again a little later with the same reports, grown older (the
    shortcut's case), or with the very same inputs (new reports if their age is 0)."""
    params, rounds = case
    policy, reference = HeadroomPolicy(params), _NoShortcut(params)
    for now, fleet in rounds:
        calls = [(now, fleet)]
        for later in data.draw(st.lists(st.sampled_from([0.0, 0.5, 5.0, 9.5, 10.0, 30.0, 31.0]))):
            same = [
                replace(item, load=replace(item.load, age=item.load.age + later))
                if item.load is not None and data.draw(st.booleans())
                else item
                for item in fleet
            ]
            calls.append((now + later, same))
        for at, inputs in calls:
            assert_same_answer(policy.compute(inputs, at), reference.compute(inputs, at))
