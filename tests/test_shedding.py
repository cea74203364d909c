"""Shedding at saturation: the controller's law, the engine feeding it, and the snapshot key.

The controller is driven through a small closed model of a pool (what it admits it serves up
to its capacity; pressure is the admitted share of capacity), with noise where it says so;
the engine through a real LoadStore and the headroom policy, as in test_weight_engine.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
import yaml
from envoy.type.v3 import percent_pb2
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from lrs.weights.shedding import BAND, MIN_CHANGE, Shedder, Shedding
from lrs.weights.signals import PPM, PoolWeights, Saturation
from tests.test_lrs_store import KV, endpoint, report
from tests.test_weight_engine import A, B, Rig
from xds_server.config.reader import parse_config
from xds_server.config.types import Config, SnapshotError
from xds_server.resources.build import DROP_METADATA, build_all
from xds_server.resources.incremental import Rebuilder
from xds_server.xds import typeurls

SETTLE = 5.0


def shedder(max_drop: float = 0.5) -> Shedder:
    return Shedder(Shedding(max_drop=max_drop, settle=SETTLE), release=0.9)


def run(
    control: Shedder,
    offered: float,
    capacity: float,
    seconds: int,
    rng: random.Random | None = None,
    noise: float = 0.0,
    start: int = 0,
) -> list[float]:
    """A pool offered `offered` requests/s, one tick a second: Envoy issues what it does not
    drop, the pool's pressure is the issued share of its capacity. Measurements are off by
    up to `noise` (relative), drawn anew every 5 s as a rate window would be. Returns the
    fraction in force after each tick."""
    fractions = []
    jitter = [1.0, 1.0, 1.0]
    for second in range(start, start + seconds):
        if rng is not None and second % 5 == 0:
            jitter = [1 + rng.uniform(-noise, noise) for _ in range(3)]
        issued = offered * (1 - control.fraction) * jitter[0]
        seen = Saturation(issued / capacity * jitter[1], capacity * jitter[2])
        control.update(seen, issued, now=float(second))
        fractions.append(control.fraction)
    return fractions


# --------------------------------------------------------------------------- the controller


@pytest.mark.parametrize("load", [1.2, 1.5, 2.0])
def test_it_sheds_what_the_pool_cannot_serve(load: float) -> None:
    fractions = run(shedder(max_drop=0.9), offered=10 * load, capacity=10, seconds=60)
    assert fractions[0] == pytest.approx(1 - 1 / load, abs=0.001)  # at once: the estimate
    assert fractions[-1] == fractions[0]  # and it holds


def test_the_fraction_never_passes_max_drop() -> None:
    assert run(shedder(max_drop=0.25), offered=30, capacity=10, seconds=30)[-1] == 0.25


def test_it_never_engages_while_some_endpoint_has_room() -> None:
    control = shedder()
    # Far more offered than capacity, but the least pressure is below 1 (one endpoint idle).
    for second in range(60):
        control.update(Saturation(pressure=0.95, capacity=10), issued=30, now=second)
    assert control.fraction == 0.0


def test_it_releases_once_the_pool_has_headroom_again() -> None:
    control = shedder()
    run(control, offered=15, capacity=10, seconds=20)
    assert control.fraction > 0.3
    fractions = run(control, offered=6, capacity=10, seconds=60, start=20)  # load went away
    assert fractions[-1] == 0.0
    assert fractions == sorted(fractions, reverse=True)  # down, never up again on the way


def test_headroom_below_the_release_level_lowers_the_fraction_even_if_the_estimate_would_not():
    """A capacity estimate can lag (a draining queue): pressure below saturation_exit is
    headroom whatever the estimate says, so each decision lowers the fraction."""
    control = shedder()
    run(control, offered=20, capacity=10, seconds=10)
    before = control.fraction
    for second in range(100, 111):
        control.update(Saturation(pressure=0.5, capacity=1), issued=10, now=second)
    assert 0 < control.fraction <= before - max(MIN_CHANGE, BAND * before)


def test_it_starts_at_once_then_holds_for_settle_and_measures_for_as_long() -> None:
    control = shedder()
    saturated, idle = Saturation(pressure=1.3, capacity=10), Saturation(0.1, capacity=100)
    assert control.update(saturated, issued=15, now=0) == 333_000  # starts on the tick
    # Settling (rates still mix the old fraction), then a period measuring the idle pool.
    answers = [control.update(idle, issued=1, now=second) for second in range(1, 11)]
    assert answers == [333_000] * 9 + [0]


def test_no_signal_or_no_traffic_means_no_shedding() -> None:
    control = shedder()
    run(control, offered=20, capacity=10, seconds=10)
    assert control.fraction > 0
    for second in range(100, 106):
        control.update(None, issued=20, now=second)
    assert control.fraction == 0
    run(control, offered=20, capacity=10, seconds=10, start=200)
    assert control.fraction > 0
    for second in range(300, 306):
        control.update(Saturation(1.5, 10), issued=0.0, now=second)
    assert control.fraction == 0


def test_follow_takes_the_fraction_eds_carries() -> None:
    control = shedder()
    control.follow(400_000)  # restored: offered is issued / 0.6 from now on
    for second in range(6):
        control.update(Saturation(pressure=1.2, capacity=10), issued=9, now=second)
    assert control.fraction == pytest.approx(1 - 10 / 15, abs=0.001)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 3, allow_nan=False),  # least pressure
            st.floats(0, 1e4, allow_nan=False),  # capacity
            st.floats(0, 1e4, allow_nan=False),  # issued
        ),
        max_size=80,
    ),
    st.floats(0.01, 0.99),
)
def test_any_signal_trace_keeps_the_fraction_bounded_and_changes_in_steps(trace, max_drop):
    control = shedder(max_drop)
    last, changed_at = 0.0, None
    for second, (pressure, capacity, issued) in enumerate(trace):
        ppm = control.update(Saturation(pressure, capacity), issued, now=second)
        assert 0 <= ppm <= round(max_drop * PPM)
        assert ppm == round(control.fraction * PPM)
        if control.fraction > last:  # raised only after saturated ticks
            assert any(p >= 1.0 for p, _, _ in trace[max(0, second - 5) : second + 1])
        if control.fraction != last:
            assert changed_at is None or second - changed_at >= SETTLE
            assert abs(control.fraction - last) >= MIN_CHANGE - 1e-9 or control.fraction in (
                0.0,
                max_drop,
            )
            changed_at = second
        last = control.fraction


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32), st.floats(0.7, 1.0))
def test_noise_around_capacity_never_engages_it(seed: int, load: float) -> None:
    """Offered load up to capacity, measured with 5 % noise: no shedding at all."""
    fractions = run(shedder(), 10 * load, 10, 500, random.Random(seed), noise=0.05)
    assert max(fractions) == 0.0


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([1.2, 1.5]))
def test_noise_under_overload_moves_the_fraction_little(seed: int, load: float) -> None:
    """120 % and 150 % load measured with 5 % noise: the fraction stays near what the pool
    cannot serve and is rarely pushed again."""
    fractions = run(shedder(), 10 * load, 10, 500, random.Random(seed), noise=0.05)
    ideal = 1 - 1 / load
    engaged = fractions[20:]  # noise may delay the start by a period or two
    assert all(abs(f - ideal) <= 0.09 for f in engaged), (min(engaged), max(engaged))
    changes = sum(a != b for a, b in itertools.pairwise(engaged))
    # Without the dead band it would move at nearly every one of its ~48 decisions.
    assert changes <= 25, changes


# --------------------------------------------------------------------------- the engine


def shed_config(shedding: object = None, weighting: str = "orca") -> Config:
    pool: dict[str, object] = {
        "name": "llama",
        "weighting": weighting,
        "orca": {"blackout": 0.0, "push_interval": 0.0, "ewma_alpha": 1.0, "hysteresis": 0.0},
        "endpoints": [{"address": "127.0.0.1", "port": port} for port in (8001, 8002)],
    }
    if weighting != "orca":
        del pool["orca"]
    if shedding is not None:
        pool["shedding"] = shedding
    doc = {
        "listeners": [{"name": "l", "port": 10000, "routes": [{"prefix": "/", "pool": "llama"}]}],
        "pools": [pool],
    }
    return parse_config(yaml.safe_dump(doc), "test.yaml")


def overload(rig: Rig, kv: float, finished: int, offered: int) -> None:
    """One second of reports: each endpoint finished `finished` and was sent what Envoy did
    not drop of `offered`."""
    issued = round(offered * (1 - drops(rig) / PPM))
    stats = [
        endpoint(key, ok=finished, issued=issued, metrics={KV: (finished, kv * finished)})
        for key in (A, B)
    ]
    rig.store.ingest("envoy-1", report("llama", *stats), rig.now)


def drops(rig: Rig) -> int:
    return rig.pushed[-1][1].drop_ppm if rig.pushed else 0


def test_the_engine_sheds_a_saturated_pool_and_stops_when_it_recovers() -> None:
    rig = Rig(shed_config({"max_drop": 0.6, "settle": 5}))  # as long as the store's window
    for _ in range(8):  # saturated (KV 0.95 > 0.8): 10/s served of 15/s sent, per endpoint
        overload(rig, kv=0.95, finished=10, offered=15)
        rig.advance(1.0)
    assert drops(rig) == pytest.approx(PPM / 3, abs=0.01 * PPM)
    assert rig.pushed[-1][1].saturation is not None
    for _ in range(10):  # served as much as it can, the queue steady: the fraction holds
        overload(rig, kv=0.95, finished=10, offered=15)
        rig.advance(1.0)
    assert drops(rig) == pytest.approx(PPM / 3, abs=0.01 * PPM)
    for _ in range(30):  # light load: the pool has headroom, the fraction goes to 0
        overload(rig, kv=0.3, finished=5, offered=5)
        rig.advance(1.0)
    assert drops(rig) == 0


def test_a_pool_without_shedding_never_drops_and_a_reload_can_turn_it_off() -> None:
    rig = Rig(shed_config())
    for _ in range(5):
        overload(rig, kv=0.95, finished=10, offered=30)
        rig.advance(1.0)
    assert rig.pushed and all(w.drop_ppm == 0 for _, w in rig.pushed)
    rig.reload(shed_config(True))
    for _ in range(6):  # a measuring period
        overload(rig, kv=0.95, finished=10, offered=30)
        rig.advance(1.0)
    assert drops(rig) == 500_000  # the default max_drop
    rig.reload(shed_config())
    rig.advance(1.0)
    assert drops(rig) == 0


def test_restored_weights_give_the_controller_the_fraction_in_force() -> None:
    rig = Rig(shed_config(True))
    restored = PoolWeights({A: 1, B: 1}, {"": 2}, drop_ppm=400_000)
    assert rig.engine.restore("llama", restored, age=0.0)
    shedder = rig.engine.pools["llama"].shedder
    assert shedder is not None and shedder.fraction == 0.4


def test_pool_weights_json_carries_the_drop_only_when_shedding() -> None:
    plain = PoolWeights({A: 1}, {"": 1})
    assert "drop_ppm" not in plain.to_json()
    shed = PoolWeights({A: 1}, {"": 1}, drop_ppm=250_000)
    assert PoolWeights.from_json(shed.to_json()) == shed
    assert PoolWeights.from_json(plain.to_json()).drop_ppm == 0
    for bad in (-1, PPM, 0.5, "1"):
        with pytest.raises(ValueError, match="drop_ppm"):
            PoolWeights.from_json({**shed.to_json(), "drop_ppm": bad})


# --------------------------------------------------------------------------- the snapshot key


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (False, None),
        (True, Shedding()),
        ({}, Shedding()),
        ({"max_drop": 0.3}, Shedding(max_drop=0.3)),
        ({"max_drop": 0.9, "settle": 10}, Shedding(max_drop=0.9, settle=10.0)),
    ],
)
def test_the_shedding_key_forms(value: object, expected: Shedding | None) -> None:
    assert shed_config(value).pool("llama").shedding == expected


@pytest.mark.parametrize(
    ("value", "weighting", "where", "says"),
    [
        ({"max_drop": 1}, "orca", "shedding.max_drop", "above 0 and below 1, got 1"),
        ({"max_drop": 0}, "orca", "shedding.max_drop", "above 0 and below 1"),
        ({"max_drop": "0.5"}, "orca", "shedding.max_drop", "without quotes"),
        ({"settle": -1}, "orca", "shedding.settle", "expected seconds"),
        ({"drop": 0.5}, "orca", "shedding.drop", "unknown key 'drop'; expected one of: max_drop"),
        (0.5, "orca", "shedding", "expected true, false or a mapping"),
        (True, "static", "shedding", "set weighting: orca"),
    ],
)
def test_bad_shedding_settings_name_the_file_and_the_field(
    value: object, weighting: str, where: str, says: str
) -> None:
    with pytest.raises(SnapshotError) as caught:
        shed_config(value, weighting)
    lines = str(caught.value).splitlines()
    assert any(
        line.startswith(f"test.yaml: pools[0].{where}: ") and says in line for line in lines
    ), lines


# --------------------------------------------------------------------------- the build


def drop_overloads(config: Config, weights: dict[str, PoolWeights]) -> dict[str, list[tuple]]:
    """Per pool, its ClusterLoadAssignment's drop_overloads as (category, numerator, denominator),
    built both from scratch and incrementally (the two must agree)."""
    built = build_all(config, weights)["default"][typeurls.ENDPOINT]
    again = Rebuilder()
    again.build_all(config, {})
    assert again.build_all(config, weights)["default"][typeurls.ENDPOINT] == built
    return {
        name: [
            (d.category, d.drop_percentage.numerator, d.drop_percentage.denominator)
            for d in cla.policy.drop_overloads
        ]
        for name, cla in built.items()
    }


def two_pools(shedding: object) -> Config:
    pools = [
        {
            "name": name,
            "weighting": "orca",
            "endpoints": [{"address": "127.0.0.1", "port": 8001}],
            **({"shedding": shedding} if name == "shed" else {}),
        }
        for name in ("shed", "plain")
    ]
    doc = {
        "listeners": [{"name": "l", "port": 10000, "routes": [{"prefix": "/", "pool": "shed"}]}],
        "pools": pools,
    }
    return parse_config(yaml.safe_dump(doc), "test.yaml")


def test_only_a_pool_that_sheds_carries_drop_overloads() -> None:
    million = percent_pb2.FractionalPercent.MILLION
    config = two_pools({"max_drop": 0.4})
    dropping = PoolWeights({"127.0.0.1:8001": 1}, {"": 1}, drop_ppm=250_000)
    assert drop_overloads(config, {"shed": dropping, "plain": dropping}) == {
        "shed": [("overload", 250_000, million)],
        "plain": [],  # weights from elsewhere (a replica, a restart) do not make it shed
    }
    assert drop_overloads(config, {"shed": replace(dropping, drop_ppm=0)}) == {
        "shed": [],
        "plain": [],
    }
    # Capped at the pool's max_drop (an edit lowered it since the fraction was decided).
    assert drop_overloads(config, {"shed": replace(dropping, drop_ppm=900_000)})["shed"] == [
        ("overload", 400_000, million)
    ]


def test_the_first_endpoint_carries_the_fraction_in_its_metadata_while_shedding() -> None:
    """Envoy 1.40 takes a new drop fraction only with a host change (ENVOY-NOTES)."""
    config = two_pools(True)
    key = "127.0.0.1:8001"

    def marker(ppm: int) -> dict[str, object]:
        weights = {"shed": PoolWeights({key: 1}, {"": 1}, drop_ppm=ppm)}
        cla = build_all(config, weights)["default"][typeurls.ENDPOINT]["shed"]
        metadata = cla.endpoints[0].lb_endpoints[0].metadata.filter_metadata
        return json_format.MessageToDict(metadata[DROP_METADATA]) if metadata else {}

    assert marker(250_000) == {"drop_ppm": 250_000}
    assert marker(300_000) == {"drop_ppm": 300_000}
    assert marker(0) == {}
