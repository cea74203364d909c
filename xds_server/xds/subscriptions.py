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


@dataclass(frozen=True, slots=True)
class Selection:
    """The resources of one type's current set that a subscription names, and their versions."""

    served: TypeResources
    resources: Mapping[str, Resource]
    versions: Mapping[str, str]


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
