"""What a load store keeps: windows per cluster, locality and endpoint; a record per reporter.

`lrs.load_store` decides what of a report to believe and merges it; this module holds the
state it merges into (a ring of time buckets per endpoint and locality, each reporter's
latest levels and the time its reports covered, per cluster) with the reads, re-indexing
and expiry of that state, so neither job's code is buried in the other's.

Why fixed time buckets and not a list of samples: 1,000 Envoys reporting every second
put 5,000 samples per endpoint into a 5 s window. A ring of buckets, each summing every
reporter's deltas that arrived during it, keeps an ingest at one addition per value and
a read at one pass over the ring, whatever the fleet size.

Why levels are kept per (reporter, cluster): Envoy lists an endpoint (or a locality) in
a cluster's report only when something happened on it, so one missing from a reporter's
latest report of the cluster is idle as far as that reporter knows. Each report of a
cluster therefore replaces that reporter's previous levels wholesale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

from envoy.config.core.v3 import address_pb2
from google.protobuf.message import DecodeError

from lrs.weights.signals import EndpointLoad

__all__ = [
    "MIN_SPAN",
    "Addresses",
    "Cluster",
    "Reporter",
    "ReporterState",
    "Series",
    "endpoint_address",
]

#: Floor of the time span rates are divided by.
MIN_SPAN: Final = 0.001


def endpoint_address(key: str) -> tuple[str, int] | None:
    """("address", port) of an "address:port" or "[v6 address]:port" key, as LRS carries it."""
    host, colon, port = key.rpartition(":")
    if not colon or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Bucket:
    """What every reporter said about one series during one bucket of time."""

    __slots__ = ("error", "index", "issued", "metrics", "success")

    def __init__(self, index: int) -> None:
        self.index = index
        self.success = 0
        self.error = 0
        self.issued = 0
        #: metric name -> [requests finished with the metric, sum of its values]
        self.metrics: dict[str, list[float]] = {}

    def absorb(self, other: _Bucket) -> None:
        """Add another bucket's sums to this one (buckets merging when the window widens)."""
        self.success += other.success
        self.error += other.error
        self.issued += other.issued
        for name, (num, total) in other.metrics.items():
            found = self.metrics.setdefault(name, [0, 0.0])
            found[0] += num
            found[1] += total


class Series:
    """One endpoint's or one locality's load: a ring of buckets plus live levels."""

    __slots__ = (
        "in_progress",
        "key",
        "last_index",
        "last_seen",
        "names",
        "rate_sum",
        "reporters",
        "ring",
    )

    def __init__(self, key: str, buckets: int) -> None:
        self.key = key
        self.ring: list[_Bucket | None] = [None] * buckets
        #: metric name -> the last bucket index it arrived in (the per-series name cap).
        self.names: dict[str, int] = {}
        self.last_seen = -math.inf
        self.last_index = -(2**62)
        #: Sum over live reporter states of the level each reported last.
        self.in_progress = 0
        #: Live reporter states whose latest report listed this series.
        self.reporters = 0
        #: Sum over those states of the finished rate each reported last (lrs.claims).
        self.rate_sum = 0.0

    def bucket(self, index: int) -> _Bucket:
        """The bucket for time index `index`, recycling the slot it displaces."""
        slot = index % len(self.ring)
        bucket = self.ring[slot]
        if bucket is None or bucket.index != index:
            bucket = self.ring[slot] = _Bucket(index)
        return bucket

    def refile(self, index_of: Callable[[int], int]) -> None:
        """Move every bucket to its new time index (see LoadStore.set_window)."""
        ring: list[_Bucket | None] = [None] * len(self.ring)
        for bucket in sorted((b for b in self.ring if b is not None), key=lambda b: b.index):
            bucket.index = index_of(bucket.index)
            slot = bucket.index % len(ring)
            found = ring[slot]
            if found is not None and found.index == bucket.index:
                found.absorb(bucket)
            else:
                ring[slot] = bucket  # a newer bucket displaces an older one
        self.ring = ring
        self.names = {name: index_of(last) for name, last in self.names.items()}
        self.last_index = index_of(self.last_index)

    def admit(self, name: str, index: int, oldest: int, cap: int) -> bool:
        """Whether a metric name may start a sum in bucket `index`: at most `cap` live names."""
        names = self.names
        if name not in names and len(names) >= cap:
            for stale in [n for n, last in names.items() if last < oldest]:
                del names[stale]
            if len(names) >= cap:
                return False
        names[name] = index
        return True

    def read(
        self, oldest: int, newest: int, span: float, now: float, level_scale: float = 1.0
    ) -> EndpointLoad:
        """The merged load over buckets oldest..newest; counts become rates over `span`,
        the summed in-flight levels are multiplied by `level_scale` (Cluster.level_scale)."""
        success = error = issued = 0
        sums: dict[str, list[float]] = {}
        for bucket in self.ring:
            if bucket is None or not oldest <= bucket.index <= newest:
                continue
            success += bucket.success
            error += bucket.error
            issued += bucket.issued
            for name, (num, total) in bucket.metrics.items():
                found = sums.get(name)
                if found is None:
                    sums[name] = [num, total]
                else:
                    found[0] += num
                    found[1] += total
        return EndpointLoad(
            rps=(success + error) / span,
            error_rps=error / span,
            issued_rps=issued / span,
            in_progress=self.in_progress * level_scale,
            metrics={name: total / num for name, (num, total) in sums.items()},
            age=max(0.0, now - self.last_seen),
            reporters=self.reporters,
        )


class ReporterState:
    """One reporter's latest report of one cluster: when it came, and the levels it listed."""

    __slots__ = ("levels", "rates", "time")

    def __init__(self) -> None:
        self.time = -math.inf
        self.levels: dict[Series, int] = {}
        self.rates: dict[Series, float] = {}

    def replace(self, levels: dict[Series, int], rates: dict[Series, float], now: float) -> None:
        """Swap in a new report's levels and rates (the same series), keeping each series'
        sums over reporters exact."""
        previous = self.levels
        old_rates = self.rates
        for series, level in levels.items():
            before = previous.pop(series, None)
            rate = rates.get(series, 0.0)
            if before is None:
                series.reporters += 1
                series.in_progress += level
                series.rate_sum += rate
            else:
                series.in_progress += level - before
                series.rate_sum += rate - old_rates.get(series, 0.0)
        for series, before in previous.items():
            series.reporters -= 1
            series.in_progress -= before
            series.rate_sum -= old_rates.get(series, 0.0)
        self.levels = levels
        self.rates = rates
        self.time = now

    def release(self) -> None:
        """Take this reporter's levels and rates out of every series it listed."""
        self.replace({}, {}, self.time)


class Addresses(dict[bytes, "Series | None"]):
    """Serialized Address submessage -> the known endpoint it names (None: not known).

    Reports name the same endpoints by the same bytes every time, so each address is
    decoded once; a lookup is then one dict access in C. Bounded: cleared when full.
    """

    __slots__ = ("endpoints", "limit")

    def __init__(self, endpoints: dict[tuple[str, int], Series]) -> None:
        super().__init__()
        self.endpoints = endpoints
        self.limit = 2 * len(endpoints) + 64

    def __missing__(self, wire: bytes) -> Series | None:
        try:
            socket = address_pb2.Address.FromString(wire).socket_address
        except DecodeError:
            series = None
        else:
            series = self.endpoints.get((socket.address, socket.port_value))
        if len(self) >= self.limit:
            self.clear()
        self[wire] = series
        return series


class Cluster:
    """One tracked cluster: its known endpoints, its localities, and who reports it."""

    __slots__ = ("addresses", "cover", "endpoints", "localities", "population", "states")

    def __init__(self, buckets: int) -> None:
        self.endpoints: dict[tuple[str, int], Series] = {}
        self.addresses = Addresses(self.endpoints)
        self.localities: dict[str, Series] = {}
        #: reporter -> its latest report, least recently reported first.
        self.states: dict[str, ReporterState] = {}
        #: Per bucket [index, sum of the report intervals that arrived in it].
        self.cover: list[list[float] | None] = [None] * buckets
        #: With spread reporting, the reporters that could report this cluster, of which
        #: only some are asked to: what they report stands for all of them. None: the
        #: reporters heard from are all there are (every reporter reports every cluster).
        self.population: int | None = None

    def expire(self, cutoff: float) -> None:
        """Forget the levels of reporters that have not reported this cluster since cutoff."""
        states = self.states
        while states:
            reporter, state = next(iter(states.items()))
            if state.time >= cutoff:
                return
            del states[reporter]
            state.release()

    def refile(self, index_of: Callable[[int], int]) -> None:
        """Move the cover and every series to new time indexes (see LoadStore.set_window)."""
        cover: list[list[float] | None] = [None] * len(self.cover)
        for entry in sorted((c for c in self.cover if c is not None), key=lambda c: c[0]):
            index = index_of(int(entry[0]))
            found = cover[index % len(cover)]
            if found is not None and found[0] == index:
                found[1] += entry[1]
            else:
                cover[index % len(cover)] = [index, entry[1]]
        self.cover = cover
        for series in (*self.endpoints.values(), *self.localities.values()):
            series.refile(index_of)

    def add_cover(self, index: int, interval: float) -> None:
        slot = index % len(self.cover)
        cover = self.cover[slot]
        if cover is None or cover[0] != index:
            self.cover[slot] = [index, interval]
        else:
            cover[1] += interval

    def span(self, oldest: int, newest: int) -> float:
        """Seconds the window's counts cover: the mean over live reporters of their intervals.

        For one reporter that is exactly the time its reports in the window cover; for
        several that joined at different times (or report out of phase) it is their mean,
        so a reporter that just joined does not make the others' rates look smaller.
        With a population (spread reporting), the reporter-seconds covered divided by it:
        counts per reporter-second times the reporters they stand for, so the rate is
        scaled by the covered fraction, and a holder handing the cluster to another
        mid-window changes neither the counts nor the time they cover.
        """
        covered = sum(c[1] for c in self.cover if c is not None and oldest <= c[0] <= newest)
        return max(covered / max(self.population or len(self.states), 1), MIN_SPAN)

    def level_scale(self) -> float:
        """What the live reporters' summed in-flight levels are multiplied by: with spread
        reporting, their mean times the population; else 1 (the sum is the fleet's)."""
        if self.population is None or not self.states:
            return 1.0
        return self.population / len(self.states)


class Reporter:
    """A reporter the store knows: when it last reported, and which clusters it reported."""

    __slots__ = ("clusters", "time")

    def __init__(self) -> None:
        self.time = -math.inf
        self.clusters: set[str] = set()
