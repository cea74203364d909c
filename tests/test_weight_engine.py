"""The weight engine: per-pool debounce, reload handling, and failures that must not stop it.

Real LoadStore and policies; time comes from a clock the test moves.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import yaml

from lrs.load_store import LoadStore
from lrs.weights.engine import WeightEngine
from lrs.weights.signals import PoolWeights
from tests.test_lrs_store import KV, endpoint, report
from xds_server.config.reader import parse_config
from xds_server.config.types import Config

A, B = "127.0.0.1:8001", "127.0.0.1:8002"
ORCA = {"blackout": 0.0, "push_interval": 1.0, "ewma_alpha": 1.0, "hysteresis": 0.0}


def config(policy: str = "headroom", orca: dict | None = None, endpoints=(A, B)) -> Config:
    pool = {
        "name": "llama",
        "weighting": "orca",
        "policy": policy,
        "orca": orca if orca is not None else ORCA,
        "endpoints": [
            {"address": key.split(":")[0], "port": int(key.split(":")[1])} for key in endpoints
        ],
    }
    static = {"name": "plain", "endpoints": [{"address": "127.0.0.1", "port": 9000}]}
    doc = {
        "listeners": [{"name": "l", "port": 10000, "routes": [{"prefix": "/", "pool": "llama"}]}],
        "pools": [pool, static],
    }
    # Custom policies (tests/custom_policy.py) load only through the allow-list.
    return parse_config(
        yaml.safe_dump(doc), "test.yaml", allowed_policy_modules=["tests.custom_policy"]
    )


class Rig:
    def __init__(self, cfg: Config) -> None:
        self.now = 100.0
        self.store = LoadStore(window=5.0, buckets=5)
        self.pushed: list[tuple[str, PoolWeights]] = []
        self.engine = WeightEngine(
            self.store.pool_load,
            lambda name, w: self.pushed.append((name, w)),
            clock=lambda: self.now,
        )
        self.reload(cfg)

    def reload(self, cfg: Config) -> None:
        self.store.set_known({p.name: [e.key for e in p.endpoints] for p in cfg.pools})
        self.engine.configure(cfg.orca_pools)

    def report(self, kv_a: float, kv_b: float, rps: int = 10) -> None:
        stats = [
            endpoint(A, ok=rps, metrics={KV: (rps, kv_a * rps)}),
            endpoint(B, ok=rps, metrics={KV: (rps, kv_b * rps)}),
        ]
        self.store.ingest("envoy-1", report("llama", *stats), self.now)

    def advance(self, seconds: float) -> list[str]:
        self.now += seconds
        return self.engine.step()


def test_only_load_weighted_pools_are_run_and_changes_are_pushed() -> None:
    rig = Rig(config())
    assert list(rig.engine.pools) == ["llama"]
    rig.report(0.2, 0.8)
    assert rig.advance(0.5) == ["llama"]
    name, weights = rig.pushed[-1]
    assert name == "llama"
    assert weights.endpoints[A] > weights.endpoints[B]  # B's KV cache is fuller
    # The same load again: nothing moved, nothing is pushed.
    rig.report(0.2, 0.8)
    assert rig.advance(1.5) == []


def test_pushes_are_debounced_per_pool_and_the_latest_weights_win() -> None:
    rig = Rig(config())
    rig.report(0.2, 0.8)
    rig.advance(0.1)
    first = len(rig.pushed)
    rig.report(0.8, 0.2)  # the load flips right away
    assert rig.advance(0.3) == []  # within push_interval of the last push: held back
    rig.report(0.8, 0.3)
    rig.advance(0.3)
    assert len(rig.pushed) == first
    assert rig.advance(0.5) == ["llama"]  # first tick after the interval: the latest answer
    weights = rig.pushed[-1][1]
    assert weights is rig.engine.pools["llama"].latest
    assert weights.endpoints[B] > weights.endpoints[A]


def test_a_reload_keeps_smoothing_state_unless_the_policy_changes() -> None:
    rig = Rig(config())
    policy = rig.engine.pools["llama"].policy
    rig.reload(config())  # the same pool again (e.g. another pool was edited)
    assert rig.engine.pools["llama"].policy is policy
    rig.reload(config(orca={**ORCA, "queue_threshold": 9}))
    assert rig.engine.pools["llama"].policy is not policy
    rig.reload(config(endpoints=(A,)))
    assert [e.key for e in rig.engine.pools["llama"].pool.endpoints] == [A]


def test_an_endpoint_added_by_a_reload_starts_its_blackout_then() -> None:
    rig = Rig(config(orca={**ORCA, "blackout": 5.0}, endpoints=(A,)))
    rig.advance(10.0)
    rig.reload(config(orca={**ORCA, "blackout": 5.0}))
    state = rig.engine.pools["llama"]
    assert state.known_since[B] == rig.now and state.known_since[A] == 100.0


def test_a_failing_policy_is_counted_and_the_others_keep_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(config(policy="tests.custom_policy:ZeroWeights", orca={}))
    with caplog.at_level(logging.ERROR):
        assert rig.advance(1.0) == []
    assert rig.engine.policy_errors == 1 and rig.pushed == []
    assert "tests.custom_policy:ZeroWeights" in caplog.text


async def test_run_survives_a_failing_round() -> None:
    rig = Rig(config())
    rounds = 0

    def publish(name: str, weights: PoolWeights) -> None:
        nonlocal rounds
        rounds += 1
        raise RuntimeError("publisher broke")

    rig.engine.publish = publish
    rig.engine.tick = 0.01
    rig.report(0.2, 0.8)
    task = asyncio.create_task(rig.engine.run())
    await asyncio.sleep(0.2)
    task.cancel()
    assert rig.engine.step_errors >= 2 and rounds >= 2


def test_restored_weights_stand_while_the_policy_warms_up_on_fresh_load() -> None:
    rig = Rig(config(orca={**ORCA, "blackout": 3.0, "expiry": 30.0}))
    before = PoolWeights({A: 900, B: 100}, {"": 1})
    assert rig.engine.restore("llama", before, age=5.0)
    assert rig.advance(1.0) == []  # no load yet: the restored weights are what EDS carries
    for _ in range(2):  # load arrives; the policy is in its blackout (neutral answers)...
        rig.report(0.2, 0.8)
        assert rig.advance(1.0) == []  # ...which never reach Envoy: no snap back to static
    assert rig.engine.pools["llama"].published == before and rig.pushed == []
    rig.report(0.2, 0.8)
    assert rig.advance(2.5) == ["llama"]  # warmed up: its own answer goes out
    weights = rig.pushed[-1][1]
    assert weights.endpoints[A] > weights.endpoints[B] and weights != before


def test_restored_weights_expire_like_any_stale_weight() -> None:
    rig = Rig(config(orca={**ORCA, "expiry": 30.0}))
    stale = PoolWeights({A: 900, B: 100}, {"": 1})
    assert not rig.engine.restore("llama", stale, age=31.0)  # already too old: not taken
    assert not rig.engine.restore("unknown-pool", stale, age=1.0)
    assert rig.engine.restore("llama", stale, age=20.0)
    assert rig.advance(5.0) == []  # held: 10 s of its 30 s life are left
    assert rig.advance(6.0) == ["llama"]  # expired without load: the policy's answer goes out
    assert rig.pushed[-1][1] != stale
