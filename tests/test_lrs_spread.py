"""Spread reporting: the assignment of pools to reporters, and the store's scaling of what
the assigned few report, against every reporter reporting everything."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrs.load_store import LoadStore
from lrs.spread import Assignment
from tests.test_lrs_store import KV, A, B, endpoint, report
from xds_lab.lrs_fleet import Fleet, compare, run_fleet

POOLS = [f"pool-{i}" for i in range(6)]
SIZES = {pool: 5 + 3 * i for i, pool in enumerate(POOLS)}  # pools of different sizes


def _check(assignment: Assignment, groups: dict[int, list[str]]) -> None:
    """Every pool has min(K, reporters) holders, each allowed to report it; loads add up."""
    per_pool = assignment.per_pool
    for pool in POOLS:
        population = [s for s, pools in groups.items() if pool in pools]
        assert assignment.population(pool) == len(population)
        want = len(population) if per_pool is None else min(per_pool, len(population))
        assert assignment.holders(pool) == want
    for stream, pools in groups.items():
        asked = assignment.clusters(stream)
        assert set(asked) <= set(pools)
        assert list(asked) == [p for p in pools if p in asked]  # the group's order
        assert assignment.load(stream) == sum(SIZES[p] for p in asked)


_steps = st.lists(
    st.tuples(
        st.sampled_from(["join", "leave", "update"]),
        st.integers(0, 30),  # which stream (joins take a new id)
        st.lists(st.sampled_from(POOLS), max_size=len(POOLS), unique=True),
        st.integers(0, 3),  # its node, of a few: several streams per node
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(per_pool=st.one_of(st.none(), st.integers(1, 5)), steps=_steps)
def test_every_pool_is_covered_by_min_k_reporters_through_joins_and_leaves(per_pool, steps):
    assignment = Assignment(per_pool, SIZES.__getitem__)
    groups: dict[int, list[str]] = {}
    next_id = 0
    for action, pick, pools, node in steps:
        alive = sorted(groups)
        if action == "join" or not alive:
            changed = assignment.join(next_id, f"node-{node}", pools)
            assert next_id in changed
            groups[next_id] = pools
            next_id += 1
        elif action == "leave":
            stream = alive[pick % len(alive)]
            before = {s: assignment.clusters(s) for s in groups if s != stream}
            changed = assignment.leave(stream)
            del groups[stream]
            # Only the streams given the leaver's pools change, and they only gain.
            for s, asked in before.items():
                now = assignment.clusters(s)
                assert (now != asked) == (s in changed)
                assert set(asked) <= set(now)
        else:
            stream = alive[pick % len(alive)]
            assignment.regroup({stream: pools})
            groups[stream] = pools
        _check(assignment, groups)


def test_a_quiet_fleet_keeps_its_assignment():
    """Nothing changes when nothing joins or leaves: a reload with the same pools and a
    recount of loads move nothing."""
    assignment = Assignment(2, SIZES.__getitem__)
    for stream in range(8):
        assignment.join(stream, f"node-{stream}", POOLS)
    before = {s: assignment.clusters(s) for s in range(8)}
    moves = assignment.moves
    assert assignment.regroup({stream: POOLS for stream in range(8)}) == set()
    assignment.resize()
    assert {s: assignment.clusters(s) for s in range(8)} == before
    assert assignment.moves == moves


def test_load_is_balanced_and_an_even_spread_is_left_alone():
    """1,000 reporters of 100 equal pools, 4 each: every reporter carries at most one pool
    (the first ones gave theirs away as others joined); one more joiner takes nothing."""
    pools = [f"p{i}" for i in range(100)]
    assignment = Assignment(4, lambda _: 20)
    for stream in range(1000):
        assignment.join(stream, f"node-{stream}", pools)
    loads = [assignment.load(s) for s in range(1000)]
    assert max(loads) == 20 and sum(loads) == 100 * 4 * 20
    assert assignment.join(1000, "node-new", pools) == {1000}
    assert assignment.clusters(1000) == ()


def test_few_reporters_are_each_asked_for_everything_and_a_leaver_is_replaced():
    assignment = Assignment(3, SIZES.__getitem__)
    for stream in range(3):
        assignment.join(stream, f"node-{stream}", POOLS)
    assert all(assignment.clusters(s) == tuple(POOLS) for s in range(3))
    assignment.join(3, "node-3", POOLS)  # a fourth takes a share from the others
    assert 0 < len(assignment.clusters(3)) < len(POOLS)
    changed = assignment.leave(0)
    assert changed and all(assignment.holders(p) == 3 for p in POOLS)
    assert all(assignment.clusters(s) == tuple(POOLS) for s in (1, 2, 3))


def test_streams_of_one_node_are_not_stacked_on_a_pool():
    """A node with several streams does not get two of them onto one pool while other
    nodes could take it: it should not carry more of one pool's estimate."""
    assignment = Assignment(2, SIZES.__getitem__)
    for stream in range(4):
        assignment.join(stream, "greedy", POOLS)
    for stream in range(4, 8):
        assignment.join(stream, f"node-{stream}", POOLS)
    for stream in range(8, 10):
        assignment.leave(stream - 8)  # two of the greedy node's streams go
    greedy = [assignment.clusters(s) for s in (2, 3)]
    assert not set(greedy[0]) & set(greedy[1])


def test_assignment_rejects_nonsense():
    with pytest.raises(ValueError):
        Assignment(0, SIZES.__getitem__)


def test_population_scales_rates_and_levels_to_the_reporters_not_asked():
    """Two of ten reporters report; rates and levels stand for all ten, metric means not."""
    store = LoadStore(window=5.0)
    store.set_known({"pool": [A, B]})
    store.set_population("pool", 10)
    for n in range(2):
        stats = endpoint(A, ok=5, in_progress=2, metrics={KV: (5, 2.5)})
        store.ingest(f"r{n}", report("pool", stats, interval=1.0), 1.0 + n * 0.1)
    load = store.pool_load("pool", 1.5)[A]
    assert load.rps == pytest.approx(10 * 5.0)
    assert load.in_progress == pytest.approx(10 * 2.0)
    assert load.metrics[KV] == pytest.approx(0.5)
    store.set_population("pool", None)  # back to the reporters heard from
    assert store.pool_load("pool", 1.5)[A].rps == pytest.approx(2 * 5.0)


def test_spread_rates_and_weights_match_full_reporting_on_a_synthetic_fleet():
    """Same traffic, reported by all 80 Envoys or by 16 per pool (a tenth reconnecting
    halfway). The Envoys' volumes differ by ~35 % (lognormal), so 16 of them estimate a
    pool's total within ~9 %: rates land that close; weights, which compare endpoints of
    one pool (the pool-wide error cancels), land closer."""
    fleet = Fleet(envoys=80, pools=3, endpoints=10, rps=20.0, seconds=6)
    full = run_fleet(fleet, None)
    spread = run_fleet(fleet, 16)
    assert spread.endpoint_stats < 0.25 * full.endpoint_stats
    assert spread.moves > 0  # the reconnecting reporters' pools went to others
    diff = compare(spread, full)
    assert diff["kv"]["max"] < 1e-9  # a server property: the same whoever relays it
    assert diff["rps"]["median"] < 0.12
    assert diff["in_progress"]["median"] < 0.12
    assert diff["weights"]["median"] < 0.04
    assert diff["weights"]["p95"] < 0.10
    # Unscaled (the holders' own sums) the total would be 16/80 of it.
    assert sum(spread.rps.values()) == pytest.approx(sum(full.rps.values()), rel=0.06)
