"""Spread reporting: which pools each LRS stream is asked to report.

An Envoy reports every cluster it is asked for, every interval, and the ingest cost is
per endpoint stat: 1,000 Envoys each reporting 2,000 endpoints every second is two million
stats a second, more than one core merges. But most of what a report says does not depend
on who says it: an endpoint's ORCA metrics are properties of its model server, identical
whichever Envoy relays them, and its request rate is the rate each reporter sees times the
number of reporters. So each pool is asked of `per_pool` reporters only (all of them when
it has fewer), and the store scales what they report by the pool's population, the
reporters that could report it (`LoadStore.set_population`).

The assignment keeps, for every pool, min(per_pool, population) holders, and moves as
little as it can: a stream that joins tops up the pools short of holders, then takes
pools from streams that carry more endpoint stats than it does (so the load per reporter
stays even, and the first streams of a fleet do not carry every pool for good); a stream
that leaves hands each of its pools to the least-loaded stream that could report it;
nothing else ever moves, so a holder's reports (and the store's windows) go on undisturbed.
Two streams of one node are not given the same pool while another node could take it: a
node opening several streams gets no more say over one pool's load.

Pure bookkeeping: no clock, no I/O, cheap enough to run on the event loop at every join,
leave and config reload (a join costs a pass over the joining stream's pools and their
holders; a leave a pass over the candidates of each pool it held).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

__all__ = ["REPORTERS_PER_POOL", "Assignment"]

#: The default reporters per pool (serve --lrs-reporters-per-pool), chosen on measurement
#: (bench/lrs_spread.py): see the README's *Load reports at scale* for what
#: accuracy it costs.
REPORTERS_PER_POOL: Final = 8


class Assignment:
    """Per stream, the pools it is asked to report; per pool, who holds it.

    `per_pool` None asks every stream for all of its pools (full reporting). `size(pool)`
    is the pool's endpoint count: the stats one report of it carries, the unit of balance.
    """

    def __init__(self, per_pool: int | None, size: Callable[[str], int]) -> None:
        if per_pool is not None and per_pool < 1:
            raise ValueError("per_pool must be >= 1 (or None: every stream reports every pool)")
        self.per_pool = per_pool
        self._size = size
        self._pools: dict[int, tuple[str, ...]] = {}  # stream -> pools it may report, in order
        self._node: dict[int, str] = {}  # stream -> its node
        self._held: dict[int, set[str]] = {}  # stream -> pools it is asked for
        self._load: dict[int, int] = {}  # stream -> endpoint stats of those pools
        self._candidates: dict[str, set[int]] = {}  # pool -> streams that may report it
        self._holders: dict[str, set[int]] = {}  # pool -> streams asked for it
        self._node_holds: dict[str, Counter[str]] = {}  # node -> pool -> its streams holding it
        self._loads: Counter[int] = Counter()  # load -> streams carrying it
        self.moves = 0  # pools taken from one stream and given to another

    # ------------------------------------------------------------------ reads

    def clusters(self, stream: int) -> tuple[str, ...]:
        """The pools `stream` is asked for, in the order of its group's pools."""
        held = self._held.get(stream, set())
        return tuple(pool for pool in self._pools.get(stream, ()) if pool in held)

    def pools(self) -> list[str]:
        """Every pool some stream may report."""
        return list(self._candidates)

    def population(self, pool: str) -> int:
        """Streams that may report `pool`: the reporters its holders' reports stand for."""
        return len(self._candidates.get(pool, ()))

    def holders(self, pool: str) -> int:
        return len(self._holders.get(pool, ()))

    def load(self, stream: int) -> int:
        """Endpoint stats one report of `stream` carries."""
        return self._load.get(stream, 0)

    def _want(self, pool: str) -> int:
        population = self.population(pool)
        return population if self.per_pool is None else min(self.per_pool, population)

    # ------------------------------------------------------------------ changes

    def join(self, stream: int, node: str, pools: Sequence[str]) -> set[int]:
        """A new stream that may report `pools`; returns the streams whose pools changed
        (the new one always among them)."""
        self._pools[stream] = tuple(dict.fromkeys(pools))
        self._node[stream] = node
        self._held[stream] = set()
        self._set_load(stream, 0)
        changed = {stream}
        for pool in self._pools[stream]:
            self._add_candidate(pool, stream)
        if self.per_pool is not None:
            changed |= self._take_share(stream)
        return changed

    def leave(self, stream: int) -> set[int]:
        """The stream ended; its pools go to others. Returns the streams given pools."""
        held = self.clusters(stream)
        for pool in held:
            self._drop(pool, stream)
        for pool in self._pools.pop(stream, ()):
            self._forget_candidate(pool, stream)
        self._set_load(stream, None)
        del self._node[stream], self._held[stream]
        return self._top_up_all(held)

    def regroup(self, groups: Mapping[int, Sequence[str]]) -> set[int]:
        """Streams' groups now have these pools (a config reload); returns the streams whose
        pools changed. Every candidacy changes first, then the pools short of holders go
        to the least loaded candidates; the pools a stream keeps stay where they are."""
        changed: set[int] = set()
        short: set[str] = set()
        for stream, pools in groups.items():
            before = self._pools[stream]
            after = self._pools[stream] = tuple(dict.fromkeys(pools))
            for pool in before:
                if pool in after:
                    continue
                if pool in self._held[stream]:
                    self._drop(pool, stream)
                    changed.add(stream)
                self._forget_candidate(pool, stream)
                short.add(pool)
            for pool in after:
                if pool not in before:
                    self._candidates.setdefault(pool, set()).add(stream)
                    short.add(pool)
        return changed | self._top_up_all(sorted(short))

    def resize(self) -> None:
        """Pool sizes changed (a config reload): recount every stream's load."""
        for stream, held in self._held.items():
            self._set_load(stream, sum(self._weight(pool) for pool in held))

    # ------------------------------------------------------------------ internals

    def _weight(self, pool: str) -> int:
        return max(1, self._size(pool))

    def _give(self, pool: str, stream: int) -> None:
        self._holders.setdefault(pool, set()).add(stream)
        self._held[stream].add(pool)
        self._set_load(stream, self._load[stream] + self._weight(pool))
        self._node_holds.setdefault(self._node[stream], Counter())[pool] += 1

    def _drop(self, pool: str, stream: int) -> None:
        self._holders[pool].discard(stream)
        self._held[stream].discard(pool)
        self._set_load(stream, self._load[stream] - self._weight(pool))
        node = self._node[stream]
        holds = self._node_holds[node]
        holds[pool] -= 1
        if holds[pool] <= 0:
            del holds[pool]
            if not holds:
                del self._node_holds[node]

    def _set_load(self, stream: int, load: int | None) -> None:
        """Set (None: drop) a stream's load, keeping the count of streams per load."""
        before = self._load.pop(stream, None)
        if before is not None:
            self._loads[before] -= 1
            if not self._loads[before]:
                del self._loads[before]
        if load is not None:
            self._load[stream] = load
            self._loads[load] += 1

    def _add_candidate(self, pool: str, stream: int) -> bool:
        """`stream` may report `pool`; it is given the pool (True) when that is short."""
        self._candidates.setdefault(pool, set()).add(stream)
        if self.holders(pool) < self._want(pool):
            self._give(pool, stream)
            return True
        return False

    def _forget_candidate(self, pool: str, stream: int) -> None:
        candidates = self._candidates[pool]
        candidates.discard(stream)
        if not candidates:
            del self._candidates[pool]
            self._holders.pop(pool, None)

    def _top_up_all(self, pools: Iterable[str]) -> set[int]:
        """Top up those of `pools` that still have candidates; the streams given some."""
        changed: set[int] = set()
        for pool in pools:
            if pool in self._candidates:
                changed |= self._top_up(pool)
        return changed

    def _doubles(self, stream: int, pool: str) -> int:
        """Streams of `stream`'s node that hold `pool` already."""
        holds = self._node_holds.get(self._node[stream])
        return 0 if holds is None else holds[pool]

    def _top_up(self, pool: str) -> set[int]:
        """Give `pool` to the least-loaded candidates until it has its holders."""
        given: set[int] = set()
        holders = self._holders.setdefault(pool, set())
        while self.holders(pool) < self._want(pool):
            free = self._candidates[pool] - holders
            best = min(free, key=lambda s: (self._doubles(s, pool), self._load[s], s))
            self._give(pool, best)
            given.add(best)
            self.moves += 1
        return given

    def _take_share(self, stream: int) -> set[int]:
        """Move pools to a newcomer from holders that carry more, while each move narrows
        the gap by a whole pool, so an even spread is left alone (no churn).

        Greedy from the most loaded holder down (a heap of each pool's most loaded holder,
        re-checked when popped); with loads even, one look at the largest load ends it."""
        changed: set[int] = set()
        pools = [p for p in self._pools[stream] if p not in self._held[stream]]
        if not pools:
            return changed
        least = min(self._weight(pool) for pool in pools)
        if max(self._loads) < self._load[stream] + 2 * least:
            return changed
        heap = [entry for pool in pools if (entry := self._top_holder(stream, pool))]
        heapq.heapify(heap)
        while heap:
            negative, pool, holder = heapq.heappop(heap)
            load = self._load[holder]
            if -negative != load or pool not in self._held[holder]:
                entry = self._top_holder(stream, pool)  # stale: look again
                if entry:
                    heapq.heappush(heap, entry)
                continue
            if load < self._load[stream] + 2 * self._weight(pool):
                break
            self._drop(pool, holder)
            self._give(pool, stream)
            changed.add(holder)
            self.moves += 1
        return changed

    def _top_holder(self, stream: int, pool: str) -> tuple[int, str, int] | None:
        """(-load, pool, holder) of `pool`'s most loaded holder, if `stream` may take it."""
        holders = self._holders.get(pool)
        if not holders or stream in holders or self._doubles(stream, pool):
            return None
        holder = max(holders, key=lambda s: (self._load[s], s))
        return (-self._load[holder], pool, holder)
