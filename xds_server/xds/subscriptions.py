"""Resource-name subscriptions, shared by every stream that subscribes to the same names.

A fleet's Envoys ask for the same endpoints: 10,000 streams each naming the same 100
clusters would otherwise each keep their own set of those names, the sorted list the
admin API shows and the strings themselves, parsed afresh from every request (about
15 KB per stream; measured with tracemalloc, bench/fanout.py). A subscription's names
never change, so one copy serves them all; it is held weakly here and goes when the
last stream that holds it lets go. It also remembers which resources its names select
from the cache's current set, so that on a change that selection is made once, not
once per stream (selecting and filtering per stream took a quarter of the server's CPU
in a 1,000-stream SotW fan-out, by cProfile).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from xds_server.xds.cache import Resource, TypeResources

__all__ = ["Selection", "Subscription", "subscription"]


@dataclass(slots=True, eq=False)
class Selection:
    """The resources of one type's current set that a subscription names, and their versions.

    A client that lacks all of them (its first response, or an edit of every pool) is sent
    their chunks joined once here, not joined again for every stream.
    """

    served: TypeResources
    resources: Mapping[str, Resource]
    versions: Mapping[str, str]
    _sotw: bytes | None = None
    _delta: bytes | None = None
    _joins: int = 0

    def chunks(self, delta: bool) -> bytes:
        """Every resource's Delta or SotW chunk, joined. Kept from the second join on: a
        subscription that only one stream has would hold a second copy of all it selects
        for nothing (a join per stream is what the sharing saves)."""
        kept = self._delta if delta else self._sotw
        if kept is not None:
            return kept
        joined = b"".join(r.delta_chunk if delta else r.sotw_chunk for r in self.resources.values())
        self._joins += 1
        if self._joins > 1:
            if delta:
                self._delta = joined
            else:
                self._sotw = joined
        return joined


@dataclass(slots=True, eq=False, weakref_slot=True)
class Subscription:
    """Resource names as a client listed them, as a set, and sorted (for the admin API).

    Shared between streams: never change `listed`, `names` or `ordered`, take another
    subscription. What they select from the cache is worked out once for all of them.
    """

    listed: tuple[str, ...]
    names: frozenset[str]
    ordered: list[str]
    _selection: Selection | None = None

    def select(self, served: TypeResources) -> Selection:
        """The named resources of `served` (in its order), computed once per version: on a
        change every stream with this subscription asks, and all but the first get this."""
        found = self._selection
        if found is None or found.served is not served:
            resources = {n: r for n, r in served.resources.items() if n in self.names}
            versions = {n: r.version for n, r in resources.items()}
            found = self._selection = Selection(served, resources, versions)
        return found


_shared: weakref.WeakValueDictionary[tuple[str, ...], Subscription] = weakref.WeakValueDictionary()


def subscription(names: Iterable[str]) -> Subscription:
    """The shared subscription to `names`, in the order given (SotW compares a client's
    next list with the last one as sent; Delta passes them sorted)."""
    listed = tuple(names)
    found = _shared.get(listed)
    if found is None:
        members = frozenset(listed)
        found = Subscription(listed, members, sorted(members))
        _shared[listed] = found
    return found
