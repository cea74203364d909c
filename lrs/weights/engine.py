"""The weight engine: every tick, each load-weighted pool's policy turns fresh signals into weights.

It only produces weights. What it weighs, where load comes from and where weights go are
handed in by the host (the control plane) through the small protocol below, so the engine
knows nothing of snapshot files, stores or EDS: `configure(pools)` with the pools to weigh,
`loads(pool, now)` for their endpoints' merged load, `publish(pool, weights)` for changed
weights. Pushes are debounced per pool: a pool whose weights moved is re-sent at most once
per its `push_interval`, and a pool is weighed at most once per interval too (as CS-WRR
recomputes once per weight_update_period): with several Envoys reporting out of step, a pool
has new reports on nearly every tick, and weighing it four times for one push cost four
times the CPU. A pool weighed without a push (its weights did not move) is weighed again a
full interval later; a failed publish is retried on the next tick.

A pool with shedding settings also gets a drop fraction with its weights, from its
`Shedder` (lrs.weights.shedding): the policy says how saturated the pool is, the loads say
how many requests Envoy issued to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from lrs.weights.params import Params
from lrs.weights.policy import WeightPolicy, load_policy
from lrs.weights.shedding import Shedder, Shedding
from lrs.weights.signals import EndpointInput, EndpointLoad, PoolWeights

__all__ = ["Loads", "Publish", "WeighedEndpoint", "WeighedPool", "WeightEngine"]

log = logging.getLogger(__name__)


class WeighedEndpoint(Protocol):
    """An endpoint as the engine sees it: its load key, zone and static weight."""

    @property
    def key(self) -> str: ...
    @property
    def zone(self) -> str: ...
    @property
    def weight(self) -> int: ...


class WeighedPool(Protocol):
    """A pool whose weights come from load: its policy, the policy's parameters, endpoints."""

    @property
    def name(self) -> str: ...
    @property
    def policy(self) -> str: ...
    @property
    def orca(self) -> Params: ...
    @property
    def endpoints(self) -> Sequence[WeighedEndpoint]: ...
    @property
    def shedding(self) -> Shedding | None: ...


#: (pool name, monotonic now) -> endpoint key -> that endpoint's merged load.
Loads = Callable[[str, float], Mapping[str, EndpointLoad]]
#: (pool name, weights) -> None: hands a pool's new weights to whoever serves them.
Publish = Callable[[str, PoolWeights], None]


@dataclass(slots=True)
class _PoolState:
    pool: WeighedPool
    policy: WeightPolicy
    known_since: dict[str, float] = field(default_factory=dict)
    latest: PoolWeights | None = None  # the policy's latest answer
    published: PoolWeights | None = None  # what EDS carries now
    pushed_at: float = float("-inf")
    computed_at: float = float("-inf")
    pushes: int = 0
    #: Restored weights (a restart, another replica's table) are held until they expire,
    #: or until load has arrived and the policy has had its blackout to warm up on it
    #: (`warm_until`): no snap back to static weights while it learns the fleet again.
    held_until: float = float("-inf")
    warm_until: float = float("-inf")
    #: The pool's drop fraction controller; None when the pool does not shed.
    shedder: Shedder | None = None


class WeightEngine:
    """Runs the policies of the pools it is given and publishes changed weights."""

    def __init__(
        self,
        loads: Loads,
        publish: Publish,
        tick: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loads = loads
        self.publish = publish
        self.tick = tick
        self.clock = clock
        self.pools: dict[str, _PoolState] = {}
        self.policy_errors = 0
        self.step_errors = 0

    def configure(self, pools_to_weigh: Iterable[WeighedPool]) -> None:
        """Follow a reload: weigh exactly these pools; keep each pool's policy (and its
        smoothing state) unless its policy or parameters changed; endpoints new to a pool
        start their blackout now."""
        now = self.clock()
        pools: dict[str, _PoolState] = {}
        for pool in pools_to_weigh:
            old = self.pools.get(pool.name)
            if old is not None and (old.pool.policy, old.pool.orca) == (pool.policy, pool.orca):
                state = old
                state.pool = pool
            else:
                state = _PoolState(pool, load_policy(pool.policy, pool.orca))
                if old is not None:
                    state.published, state.pushed_at = old.published, old.pushed_at
                    state.known_since = old.known_since
            state.known_since = {e.key: state.known_since.get(e.key, now) for e in pool.endpoints}
            state.shedder = _shedder(pool, old.shedder if old is not None else None)
            pools[pool.name] = state
        self.pools = pools

    def restore(self, pool_name: str, weights: PoolWeights, age: float) -> bool:
        """Take over weights published `age` seconds ago (before a restart): they are what
        EDS carries and are held until they are as old as the pool's `expiry`, or until
        load arrives and the policy has warmed up on it for its `blackout` (its answers are
        neutral until then). False if the pool is not weighed here or the weights have
        already expired."""
        state = self.pools.get(pool_name)
        params = state.pool.orca if state is not None else None
        if state is None or params is None or age >= params.expiry:
            return False
        now = self.clock()
        state.published, state.latest = weights, weights
        if state.shedder is not None:
            state.shedder.follow(weights.drop_ppm)
        state.held_until = now + params.expiry - age
        state.warm_until = float("inf")  # the warm-up starts with the first load
        return True

    def adopt(self, pool_name: str, weights: PoolWeights) -> None:
        """Weights another engine published (another replica's) are what EDS carries now."""
        state = self.pools.get(pool_name)
        if state is not None:
            state.published = weights
            if state.shedder is not None:
                state.shedder.follow(weights.drop_ppm)

    def forget_published(self) -> None:
        """Publish every pool's current answer on the next round (a replica now leading)."""
        for state in self.pools.values():
            state.published = None
            state.pushed_at = float("-inf")

    def step(self) -> list[str]:
        """One round over every pool; returns the names of the pools whose weights went out."""
        now = self.clock()
        pushed = []
        for name, state in self.pools.items():
            if now - state.computed_at < state.pool.orca.push_interval:
                continue  # weighed this interval already: new weights could not go out sooner
            if self._weigh(name, state, now):
                pushed.append(name)
            state.computed_at = now  # not when publishing failed: the next tick tries again
        return pushed

    def _weigh(self, name: str, state: _PoolState, now: float) -> bool:
        """One pool's round: its policy's answer, its drop fraction, and the push if due."""
        loads = self.loads(name, now)
        weights = self._compute(state, loads, now)
        if weights is None:
            return False
        if state.shedder is not None:
            issued = sum(load.issued_rps for load in loads.values())
            drop = state.shedder.update(weights.saturation, issued, now)
            weights = replace(weights, drop_ppm=drop)
        state.latest = weights
        if _same(weights, state.published):
            return False
        if now - state.pushed_at < state.pool.orca.push_interval:
            return False  # debounced: the next round after the interval sends the latest
        self.publish(name, weights)
        state.published, state.pushed_at = weights, now
        state.pushes += 1
        return True

    async def run(self) -> None:
        """Tick until cancelled; a failing round is logged and counted, never the end of it."""
        while True:
            try:
                self.step()
            except Exception:
                self.step_errors += 1
                log.exception("weight engine round failed; weights stay as published")
            await asyncio.sleep(self.tick)

    def _compute(
        self, state: _PoolState, loads: Mapping[str, EndpointLoad], now: float
    ) -> PoolWeights | None:
        pool = state.pool
        if now < state.held_until:
            if loads and state.warm_until == float("inf"):
                state.warm_until = now + pool.orca.blackout
            if not loads or now < state.warm_until:
                if loads:
                    self._answer(state, loads, now)  # the policy learns; the answer waits
                return None  # the restored weights stand
            state.held_until = float("-inf")
        return self._answer(state, loads, now)

    def _answer(
        self, state: _PoolState, loads: Mapping[str, EndpointLoad], now: float
    ) -> PoolWeights | None:
        pool = state.pool
        inputs = [
            EndpointInput(e.key, e.zone, e.weight, loads.get(e.key), state.known_since[e.key])
            for e in pool.endpoints
        ]
        if not inputs:
            return None
        try:
            # Custom policies come wrapped by load_policy, which refuses answers Envoy would NACK.
            return state.policy.compute(inputs, now)
        except Exception:  # a custom policy's bug (or invalid answer) must not stop the others
            self.policy_errors += 1
            log.exception("weight policy %r of pool %s failed", pool.policy, pool.name)
            return None


def _shedder(pool: WeighedPool, old: Shedder | None) -> Shedder | None:
    """The pool's controller under its current settings; one it had keeps its fraction."""
    if pool.shedding is None:
        return None
    shedder = old or Shedder(pool.shedding, pool.orca.saturation_exit)
    shedder.settings, shedder.release = pool.shedding, pool.orca.saturation_exit
    return shedder


def _same(a: PoolWeights, b: PoolWeights | None) -> bool:
    """Whether Envoy would be sent the same (equality leaves out explanations)."""
    return b is not None and a == b
