"""Load reports in, one merged view per endpoint out: windows per cluster, locality, endpoint.

Envoy's LRS reports carry deltas (requests finished, failed and issued since its last
report of that cluster), a level (requests in flight) and ORCA metric sums. Every Envoy
reports the same endpoints, so the store merges them: rates add up, metric means are
weighted by how many requests carried the metric, and in-flight levels add up over each
reporter's latest report. Nothing of a report is kept but those sums.

The state the store merges into (per cluster: a ring of time buckets per endpoint and
locality, each reporter's latest levels, the time reports covered) and why it is shaped
so are in `lrs.load_window`; this module decides what of a report to believe and merges it.

What one reporter can do to the merge is bounded, so a buggy or compromised Envoy cannot
outvote the fleet. Each report's weight in an endpoint's metric mean is capped at
`metric_weight_cap` requests: metric means (KV cache, queue) are properties of the model
server, the same whichever Envoy relays them, so with every reporter past the cap the
mean is a plain mean of the reporters' means and one reporter moves it by at most its
1/N share, whatever request counts it claims. Request counts are capped at
`max_endpoint_rps` times the time since the reporter's previous report of that cluster
(measured here, not the interval the report claims), and at a few times the other
reporters' mean (`lrs.claims`). And a report merges only the
clusters its stream was asked for (`clusters`).

Bad input never raises: values that are NaN, infinite, negative or absurd are dropped and
counted in `dropped_values` by reason; input the store does not track (unknown clusters or
endpoints, anything past a cap) is counted in `ignored`. Memory is bounded by the known
endpoints and the caps, never by the number or content of reports.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import asdict
from operator import attrgetter
from typing import Any, Final, Protocol, cast

from google.protobuf import duration_pb2

from lrs.claims import (
    MAX_COUNT,
    MAX_NAME,
    MAX_UTILIZATION,
    SHARE_CAP,
    Claim,
    drop_large,
    plausible,
)
from lrs.load_window import Addresses, Cluster, Reporter, ReporterState, Series, endpoint_address
from lrs.weights.signals import EndpointLoad
from lrs.wire import TrimmedReport, unnamed_metrics

__all__ = [
    "MAX_ENDPOINT_RPS",
    "MAX_INTERVAL",
    "METRIC_WEIGHT_CAP",
    "MIN_INTERVAL",
    "SLICE_STATS",
    "LoadStore",
    "Report",
    "trimmed",
]

#: Plausible `load_report_interval` range in seconds; Envoy measures it, so outside is bad.
MIN_INTERVAL: Final = 0.001
MAX_INTERVAL: Final = 3600.0
#: Requests one report may weigh with in an endpoint's metric mean (see the module docstring).
METRIC_WEIGHT_CAP: Final = 4
#: Requests per second one reporter may claim for one endpoint; an LLM server finishes tens.
MAX_ENDPOINT_RPS: Final = 500.0
#: Endpoint stats merged between two yields of `LoadStore.ingest_steps` (~1 ms of work).
SLICE_STATS: Final = 256
#: What the merge reads of an endpoint or locality stat, in one C-level call per stat.
_STAT_FIELDS: Final = (
    "total_successful_requests",
    "total_error_requests",
    "total_issued_requests",
    "total_requests_in_progress",
    "load_metric_stats",
)
_STAT_ROW: Final = attrgetter(*_STAT_FIELDS)
_ENDPOINT_ROW: Final = attrgetter("address", *_STAT_FIELDS)
_METRIC_ROW: Final = attrgetter(
    "metric_name", "num_requests_finished_with_metric", "total_metric_value"
)


class Report(Protocol):
    """A LoadStatsRequest, or any message with its `cluster_stats` field.

    The service parses every report as `lrs.wire.TrimmedReport`; anything else (a full
    LoadStatsRequest from a test or a tool) is re-parsed as one first.
    """

    @property
    def cluster_stats(self) -> Iterable[Any]: ...

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


def trimmed(request: Report) -> Report:
    """The report as a TrimmedReport, the only shape the merge reads."""
    if isinstance(request, TrimmedReport):
        return request
    # TrimmedReport's class is made at run time: statically a bare Message, without fields.
    return cast(Report, TrimmedReport.FromString(request.SerializeToString()))


class LoadStore:
    """Per cluster, locality and endpoint windows of request rates and ORCA metric means.

    `window` seconds of reports are kept in `buckets` time buckets, so a report counts
    for between window * (1 - 1/buckets) and window seconds after it arrived.
    """

    def __init__(
        self,
        window: float = 5.0,
        max_metric_names: int = 16,
        max_reporters: int = 4096,
        max_localities: int = 64,
        buckets: int = 5,
        metric_weight_cap: int | None = METRIC_WEIGHT_CAP,
        max_endpoint_rps: float = MAX_ENDPOINT_RPS,
        reporter_share_cap: float | None = SHARE_CAP,
    ) -> None:
        """`metric_weight_cap` None weighs metric means by every request (one reporter can
        then outweigh the rest); `max_endpoint_rps` and `reporter_share_cap` bound one
        reporter's count per endpoint (lrs.claims; None: no share cap)."""
        if not window > 0 or buckets < 1 or max_reporters < 1 or not max_endpoint_rps > 0:
            raise ValueError("window and max_endpoint_rps must be > 0, buckets >= 1")
        self.window = window
        self.metric_weight_cap = metric_weight_cap
        self.max_endpoint_rps = max_endpoint_rps
        self.reporter_share_cap = reporter_share_cap
        self.max_metric_names = max_metric_names
        self.max_reporters = max_reporters
        self.max_localities = max_localities
        self._buckets = buckets
        self._width = window / buckets
        self._clusters: dict[str, Cluster] = {}
        #: reporter -> record, least recently reporting first.
        self._reporters: dict[str, Reporter] = {}
        self.reports = 0  # reports ingested (LoadStatsRequests)
        self.endpoint_stats = 0  # UpstreamEndpointStats of known endpoints ingested
        self.ignored: Counter[str] = Counter()  # untracked input: unknown names, past a cap
        self.dropped_values: Counter[str] = Counter()  # bad values, by reason

    # ------------------------------------------------------------------ config

    def set_known(self, clusters: Mapping[str, Collection[str]]) -> None:
        """Track exactly these clusters and endpoint keys; called on every config reload.

        Endpoints (and clusters) that stay keep their windows; removed ones are forgotten.
        """
        fresh: dict[str, Cluster] = {}
        for name, keys in clusters.items():
            cluster = self._clusters.get(name) or Cluster(self._buckets)
            endpoints: dict[tuple[str, int], Series] = {}
            for key in keys:
                address = endpoint_address(key)
                if address is not None:
                    found = cluster.endpoints.get(address)
                    endpoints[address] = found or Series(key, self._buckets)
            cluster.endpoints = endpoints
            cluster.addresses = Addresses(endpoints)
            fresh[name] = cluster
        self._clusters = fresh

    def set_window(self, window: float) -> None:
        """Change the window's length, keeping its bucket count and what it holds.

        The service scales the window with the reporting interval, so it stays a few
        intervals long. Every bucket is re-filed under the index its start time has at the
        new width: widening merges neighbours exactly; narrowing leaves each bucket's
        counts at its start, and what falls out of the shorter window ages out.
        """
        if not window > 0:
            raise ValueError("window must be > 0")
        old, new = self._width, window / self._buckets
        if old == new:
            return
        self.window, self._width = window, new

        def index_of(index: int) -> int:
            return math.floor(index * old / new)

        for cluster in self._clusters.values():
            cluster.refile(index_of)

    def set_population(self, cluster: str, reporters: int | None) -> None:
        """With spread reporting: the reporters `cluster`'s reporters stand for (see
        `lrs.spread`); rates and in-flight levels are scaled up to them. None: no scaling."""
        found = self._clusters.get(cluster)
        if found is not None:
            found.population = reporters

    def size(self, cluster: str) -> int:
        """Known endpoints of `cluster`: the stats one report of it carries at most."""
        found = self._clusters.get(cluster)
        return 0 if found is None else len(found.endpoints)

    @property
    def reporters(self) -> int:
        """Reporters the store knows now (at most max_reporters)."""
        return len(self._reporters)

    # ------------------------------------------------------------------ ingest

    def ingest(
        self, reporter: str, request: Report, now: float, clusters: Collection[str] | None = None
    ) -> None:
        """Merge one load report that arrived at monotonic time `now`; never raises on content.
        `clusters`: the clusters the reporter was asked for (None: any known cluster)."""
        for _ in self.ingest_steps(reporter, request, now, clusters=clusters):
            pass

    def ingest_steps(
        self,
        reporter: str,
        request: Report,
        now: float,
        slice_stats: int = SLICE_STATS,
        clusters: Collection[str] | None = None,
    ) -> Iterator[None]:
        """`ingest` in slices: yields after about every `slice_stats` endpoint stats.

        A report of thousands of endpoints takes milliseconds to merge; the service
        awaits the event loop at each yield so other streams are served in between.
        The store is consistent at every yield (reads, other reporters' reports and
        `set_known` may run there). Abandoning the iterator midway leaves a partly merged
        report: counts merged so far stay, levels are not replaced.
        """
        self.reports += 1
        report = trimmed(request)
        record = self._reporter(reporter, now)
        if record is None:
            self.ignored["reporter_cap"] += 1
            return
        index = math.floor(now / self._width)
        pending = 0
        for stats in report.cluster_stats:
            cluster = self._clusters.get(stats.cluster_name)
            if cluster is None:
                self.ignored["unknown_cluster"] += 1
                continue
            if clusters is not None and stats.cluster_name not in clusters:
                self.ignored["not_asked"] += 1  # a report for a cluster nobody asked it for
                continue
            record.clusters.add(stats.cluster_name)
            for merged in self._ingest_cluster(reporter, cluster, stats, now, index, slice_stats):
                pending += merged
                if pending >= slice_stats:
                    pending = 0
                    yield

    def forget_reporter(self, reporter: str) -> None:
        """The reporter is gone: its in-flight levels go now, its counts age out normally."""
        record = self._reporters.pop(reporter, None)
        if record is None:
            return
        for name in record.clusters:
            cluster = self._clusters.get(name)
            state = cluster.states.pop(reporter, None) if cluster is not None else None
            if state is not None:
                state.release()

    def _reporter(self, reporter: str, now: float) -> Reporter | None:
        """The reporter's record, most recent last; None when at the cap with nobody idle."""
        reporters = self._reporters
        record = reporters.pop(reporter, None)
        if record is None:
            if len(reporters) >= self.max_reporters:
                oldest = next(iter(reporters))
                if reporters[oldest].time >= now - self.window:
                    return None
                self.forget_reporter(oldest)
            record = Reporter()
        record.time = now
        reporters[reporter] = record
        return record

    def _ingest_cluster(
        self, reporter: str, cluster: Cluster, stats: Any, now: float, index: int, size: int
    ) -> Iterator[int]:
        """Merge one ClusterStats, yielding the endpoint stats merged after each chunk."""
        oldest = index - self._buckets + 1
        cluster.expire(oldest * self._width)
        # The state stays listed while the report is merged: forget_reporter or expire may
        # release it at a yield, and the replace below then starts from nothing.
        state = cluster.states.get(reporter)
        interval = self._interval(stats.load_report_interval, state, now)
        # A report covers the time this reporter really took, not more than it claims.
        elapsed = min(interval, now - state.time) if state is not None else interval
        cluster.add_cover(index, max(elapsed, MIN_INTERVAL))
        claim = Claim(
            max(elapsed, MIN_INTERVAL),
            self.max_endpoint_rps,
            self.reporter_share_cap,
            state.rates if state is not None else {},
            self.dropped_values,
        )
        levels: dict[Series, int] = {}
        for locality_stats in stats.upstream_locality_stats:
            locality = self._locality(cluster, locality_stats.locality.zone, oldest)
            if locality is not None:
                counts = _STAT_ROW(locality_stats)
                row = (locality, *counts[:4], [*counts[4], *unnamed_metrics(locality_stats)])
                self._merge([row], _same, levels, now, index, claim)
            rows = list(map(_ENDPOINT_ROW, locality_stats.upstream_endpoint_stats))
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                unknown = self._merge(
                    chunk, cluster.addresses.__getitem__, levels, now, index, claim
                )
                self.endpoint_stats += len(chunk) - unknown
                if unknown:
                    self.ignored["unknown_endpoint"] += unknown
                yield len(chunk)
        state = cluster.states.pop(reporter, None) or ReporterState()
        state.replace(levels, claim.rates, now)
        cluster.states[reporter] = state

    def _merge(
        self,
        rows: Iterable[tuple[Any, int, int, int, int, Iterable[Any]]],
        series_of: Callable[[Any], Series | None],
        levels: dict[Series, int],
        now: float,
        index: int,
        claim: Claim,
    ) -> int:
        """Add rows of (key, success, error, issued, in progress, metric stats) to the current
        buckets of the series `series_of(key)` names, noting each level; returns how many
        rows named no known series. Counts are capped by `claim`, and each metric's request
        count at `metric_weight_cap` (its mean kept).

        The hot loop of ingest (one pass per endpoint stat): locals bound, the common
        case tested in one comparison chain, the rare rest decided by `lrs.claims.plausible`.
        """
        oldest = index - self._buckets + 1
        slot = index % self._buckets
        cap = self.max_metric_names
        unknown = 0
        max_count, max_utilization, metric_row = MAX_COUNT, MAX_UTILIZATION, _METRIC_ROW
        weight_cap = self.metric_weight_cap or max_count
        capped = claim.cap
        for key, success, error, issued, level, metrics in rows:
            series = series_of(key)
            if series is None:
                unknown += 1
                continue
            if (success | error | issued | level) > max_count:
                success, error, issued, level = drop_large(
                    self.dropped_values, success, error, issued, level
                )
            success, error, issued = capped(series, success, error, issued)
            bucket = series.ring[slot]
            if bucket is None or bucket.index != index:
                bucket = series.bucket(index)
            bucket.success += success
            bucket.error += error
            bucket.issued += issued
            levels[series] = levels.get(series, 0) + level
            series.last_seen = now
            series.last_index = index
            sums = bucket.metrics
            for name, num, total in map(metric_row, metrics):
                if not (0 < num <= max_count and 0.0 <= total <= num * max_utilization):
                    if not plausible(self.dropped_values, name, num, total):
                        continue
                if num > weight_cap:
                    total *= weight_cap / num
                    num = weight_cap
                found = sums.get(name)
                if found is None:
                    if not self._admit(series, name, index, oldest, cap):
                        continue
                    found = sums[name] = [0, 0.0]
                found[0] += num
                found[1] += total
        return unknown

    def _interval(
        self, duration: duration_pb2.Duration, previous: ReporterState | None, now: float
    ) -> float:
        """The report's interval; if implausible, the time since the reporter's last one."""
        seconds = duration.seconds + duration.nanos * 1e-9
        if MIN_INTERVAL <= seconds <= MAX_INTERVAL:
            return seconds
        self.dropped_values["bad_interval"] += 1
        if previous is not None and MIN_INTERVAL <= now - previous.time <= MAX_INTERVAL:
            return now - previous.time
        return self.window

    def _locality(self, cluster: Cluster, zone: str, oldest: int) -> Series | None:
        """The zone's series, made on first sight; None past the cap or for a silly name."""
        series = cluster.localities.get(zone)
        if series is not None:
            return series
        if len(zone) > MAX_NAME:
            self.dropped_values["bad_name"] += 1
            return None
        localities = cluster.localities
        if len(localities) >= self.max_localities:
            for stale in [z for z, s in localities.items() if s.last_index < oldest]:
                del localities[stale]
            if len(localities) >= self.max_localities:
                self.ignored["locality_cap"] += 1
                return None
        series = localities[zone] = Series(zone, self._buckets)
        return series

    def _admit(self, series: Series, name: str, index: int, oldest: int, cap: int) -> bool:
        """Whether a metric name new to the bucket may start a sum there; counts why not."""
        if not 0 < len(name) <= MAX_NAME:
            self.dropped_values["bad_name"] += 1
            return False
        if not series.admit(name, index, oldest, cap):
            self.ignored["metric_name_cap"] += 1
            return False
        return True

    # ------------------------------------------------------------------ reads

    def pool_load(self, cluster: str, now: float) -> dict[str, EndpointLoad]:
        """Endpoint key -> merged load, for the cluster's endpoints with data in the window."""
        found = self._clusters.get(cluster)
        return {} if found is None else self._read(found, found.endpoints.values(), now)

    def locality_load(self, cluster: str, now: float) -> dict[str, EndpointLoad]:
        """Zone -> merged locality-level load (counts, locality ORCA metrics) in the window."""
        found = self._clusters.get(cluster)
        return {} if found is None else self._read(found, found.localities.values(), now)

    def _read(
        self, cluster: Cluster, series: Iterable[Series], now: float
    ) -> dict[str, EndpointLoad]:
        newest = math.floor(now / self._width)
        oldest = newest - self._buckets + 1
        cluster.expire(oldest * self._width)
        span, scale = cluster.span(oldest, newest), cluster.level_scale()
        return {
            s.key: s.read(oldest, newest, span, now, scale)
            for s in series
            if s.last_index >= oldest
        }

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-ready view for the admin API: counters, and per cluster what pool_load sees."""
        clusters: dict[str, Any] = {}
        for name in sorted(self._clusters):
            endpoints = self.pool_load(name, now)
            localities = self.locality_load(name, now)
            if endpoints or localities:
                clusters[name] = {
                    "reporters": len(self._clusters[name].states),
                    "endpoints": {key: asdict(load) for key, load in sorted(endpoints.items())},
                    "localities": {zone: asdict(load) for zone, load in sorted(localities.items())},
                }
        return {
            "window_s": self.window,
            "reporters": len(self._reporters),
            "reports": self.reports,
            "endpoint_stats": self.endpoint_stats,
            "ignored": dict(self.ignored),
            "dropped_values": dict(self.dropped_values),
            "clusters": clusters,
        }


def _same(series: Series) -> Series:
    return series
