"""LoadStore: rates, means and levels from crafted LoadStatsRequests, merged across reporters."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import pytest
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrs.claims import MAX_COUNT
from lrs.load_store import LoadStore, trimmed
from lrs.load_window import endpoint_address
from lrs.weights.signals import EndpointLoad
from lrs.wire import TrimmedReport

KV = "named_metrics.kv_cache_usage_perc"
A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def endpoint(
    key: str,
    ok: int = 0,
    errors: int = 0,
    issued: int | None = None,
    in_progress: int = 0,
    metrics: dict[str, tuple[int, float]] | None = None,
) -> load_report_pb2.UpstreamEndpointStats:
    """One endpoint's stats; metrics: name -> (requests with the metric, sum of values)."""
    address, port = endpoint_address(key) or ("", 0)
    stats = load_report_pb2.UpstreamEndpointStats(
        total_successful_requests=ok,
        total_error_requests=errors,
        total_issued_requests=ok + errors if issued is None else issued,
        total_requests_in_progress=in_progress,
    )
    stats.address.socket_address.address = address
    stats.address.socket_address.port_value = port
    for name, (num, total) in (metrics or {}).items():
        stats.load_metric_stats.add(
            metric_name=name, num_requests_finished_with_metric=num, total_metric_value=total
        )
    return stats


def report(
    cluster: str = "pool",
    *endpoints: load_report_pb2.UpstreamEndpointStats,
    zone: str = "zone-a",
    interval: float = 1.0,
) -> lrs_pb2.LoadStatsRequest:
    request = lrs_pb2.LoadStatsRequest()
    stats = request.cluster_stats.add(cluster_name=cluster)
    stats.load_report_interval.FromNanoseconds(round(interval * 1e9))
    locality = stats.upstream_locality_stats.add()
    locality.locality.zone = zone
    locality.upstream_endpoint_stats.extend(endpoints)
    return request


@pytest.fixture
def store() -> LoadStore:
    store = LoadStore(window=5.0, buckets=5)
    store.set_known({"pool": [A, B, C]})
    return store


def test_rates_and_means_from_one_reporter(store: LoadStore):
    for t in (1.0, 2.0, 3.0):
        stats = endpoint(A, ok=10, errors=2, in_progress=int(t), metrics={KV: (12, 8.4)})
        store.ingest("envoy-1", report("pool", stats), t)
    load = store.pool_load("pool", 3.2)[A]
    assert load.rps == pytest.approx(12.0)  # 36 requests over the 3 s the reports cover
    assert load.error_rps == pytest.approx(2.0)
    assert load.issued_rps == pytest.approx(12.0)
    assert load.metrics == {KV: pytest.approx(0.7)}
    assert load.in_progress == 3  # the latest level, not a sum over reports
    assert load.age == pytest.approx(0.2)
    assert load.reporters == 1
    assert set(store.pool_load("pool", 3.2)) == {A}  # B and C sent nothing
    assert store.endpoint_stats == 3 and store.reports == 3


def test_two_reporters_rates_add_and_means_weight_by_request_count():
    store = LoadStore(window=5.0, buckets=5, metric_weight_cap=None)  # uncapped weighting
    store.set_known({"pool": [A, B, C]})
    # Out of phase by half an interval, as two independent Envoys are.
    for t in (1.0, 2.0, 3.0, 4.0):
        light = endpoint(A, ok=10, in_progress=3, metrics={KV: (10, 2.0)})  # mean 0.2
        store.ingest("envoy-1", report("pool", light), t)
        heavy = endpoint(A, ok=30, in_progress=5, metrics={KV: (30, 18.0)})  # mean 0.6
        store.ingest("envoy-2", report("pool", heavy), t + 0.5)
    load = store.pool_load("pool", 4.6)[A]
    assert load.rps == pytest.approx(40.0)
    assert load.metrics[KV] == pytest.approx(0.5)  # (2 + 18) / (10 + 30), not (0.2 + 0.6) / 2
    assert load.in_progress == 8
    assert load.reporters == 2


def test_a_reporter_that_just_joined_does_not_dilute_the_rate(store: LoadStore):
    for t in range(1, 11):
        store.ingest("envoy-1", report("pool", endpoint(A, ok=10)), float(t))
    store.ingest("envoy-2", report("pool", endpoint(A, ok=10)), 10.0)
    assert store.pool_load("pool", 10.2)[A].rps == pytest.approx(20.0)


def test_window_expiry(store: LoadStore):
    store.ingest("envoy-1", report("pool", endpoint(A, ok=5, in_progress=2)), 10.0)
    assert A in store.pool_load("pool", 13.9)
    assert store.pool_load("pool", 15.0) == {}  # 5 s later: out of the window
    assert store.locality_load("pool", 15.0) == {}


def test_staleness_is_time_since_the_last_report_carrying_the_endpoint(store: LoadStore):
    store.ingest("envoy-1", report("pool", endpoint(A, ok=5), endpoint(B, ok=5)), 10.0)
    store.ingest("envoy-1", report("pool", endpoint(A, ok=5)), 11.0)
    loads = store.pool_load("pool", 12.5)
    assert loads[A].age == pytest.approx(1.5)
    assert loads[B].age == pytest.approx(2.5)


def test_endpoint_missing_from_a_reporters_next_report_is_idle_for_it(store: LoadStore):
    """Envoy lists only endpoints with activity: one it leaves out has nothing in flight."""
    store.ingest("envoy-1", report("pool", endpoint(A, ok=1, in_progress=4)), 1.0)
    store.ingest("envoy-2", report("pool", endpoint(A, ok=1, in_progress=2)), 1.0)
    store.ingest("envoy-1", report("pool", endpoint(B, ok=1)), 2.0)
    load = store.pool_load("pool", 2.1)[A]
    assert load.in_progress == 2 and load.reporters == 1


def test_forgotten_reporter_levels_go_at_once_and_its_counts_age_out(store: LoadStore):
    store.ingest("envoy-1", report("pool", endpoint(A, ok=10, in_progress=4)), 1.0)
    store.ingest("envoy-2", report("pool", endpoint(A, ok=10, in_progress=1)), 1.0)
    store.forget_reporter("envoy-1")
    load = store.pool_load("pool", 1.5)[A]
    assert load.in_progress == 1 and load.reporters == 1
    assert load.rps > 0  # envoy-1's requests still count until the window passes
    store.forget_reporter("envoy-1")  # twice is harmless
    store.forget_reporter("never-seen")
    assert store.reporters == 1


def test_silent_reporter_levels_expire_with_the_window(store: LoadStore):
    store.ingest("envoy-1", report("pool", endpoint(A, ok=1, in_progress=7)), 1.0)
    store.ingest("envoy-2", report("pool", endpoint(B, ok=1)), 5.5)
    assert store.pool_load("pool", 5.5)[A].in_progress == 7
    store.ingest("envoy-2", report("pool", endpoint(A, ok=1, in_progress=1)), 6.5)
    assert store.pool_load("pool", 6.5)[A].in_progress == 1  # envoy-1 fell out of the window


def test_unknown_clusters_and_endpoints_are_ignored_and_counted(store: LoadStore):
    request = report("pool", endpoint(A, ok=1), endpoint("10.9.9.9:80", ok=1))
    request.cluster_stats.append(report("xds_cluster", endpoint(A, ok=1)).cluster_stats[0])
    store.ingest("envoy-1", request, 1.0)
    assert set(store.pool_load("pool", 1.0)) == {A}
    assert store.pool_load("xds_cluster", 1.0) == {}
    assert store.ignored == {"unknown_endpoint": 1, "unknown_cluster": 1}


def test_reload_forgets_removed_endpoints_and_keeps_the_rest(store: LoadStore):
    store.ingest("envoy-1", report("pool", endpoint(A, ok=4), endpoint(B, ok=4)), 1.0)
    store.set_known({"pool": [A, C], "other": []})
    assert set(store.pool_load("pool", 1.1)) == {A}
    store.set_known({"other": []})
    assert store.pool_load("pool", 1.1) == {}


def test_ipv6_endpoints_match_bracketed_keys():
    store = LoadStore()
    store.set_known({"pool": ["[fd00::1]:8000"]})
    store.ingest("envoy-1", report("pool", endpoint("[fd00::1]:8000", ok=3)), 1.0)
    assert set(store.pool_load("pool", 1.0)) == {"[fd00::1]:8000"}


def test_locality_counts_and_metrics_including_the_dedicated_utilization_fields(store: LoadStore):
    request = report("pool", endpoint(A, ok=2), zone="zone-b")
    locality = request.cluster_stats[0].upstream_locality_stats[0]
    locality.total_successful_requests = 8
    locality.total_requests_in_progress = 3
    locality.load_metric_stats.add(
        metric_name=KV, num_requests_finished_with_metric=8, total_metric_value=4.0
    )
    locality.cpu_utilization.num_requests_finished_with_metric = 4
    locality.cpu_utilization.total_metric_value = 1.0
    # The same zone at another priority (saturated endpoints) adds to it.
    second = request.cluster_stats[0].upstream_locality_stats.add(priority=1)
    second.locality.zone = "zone-b"
    second.total_requests_in_progress = 2
    store.ingest("envoy-1", request, 1.0)
    zone = store.locality_load("pool", 1.0)["zone-b"]
    assert zone.rps == pytest.approx(8.0)
    assert zone.in_progress == 5
    assert zone.metrics == {KV: pytest.approx(0.5), "cpu_utilization": pytest.approx(0.25)}


def test_metric_name_cap_per_endpoint(store: LoadStore):
    store = LoadStore(max_metric_names=3)
    store.set_known({"pool": [A]})
    names = {f"named_metrics.m{i}": (1, 1.0) for i in range(5)}
    store.ingest("envoy-1", report("pool", endpoint(A, ok=1, metrics=names)), 1.0)
    store.ingest("envoy-1", report("pool", endpoint(A, ok=1, metrics=names)), 2.0)
    assert len(store.pool_load("pool", 2.0)[A].metrics) == 3
    assert store.ignored["metric_name_cap"] == 4
    # Names that left the window free their places.
    later = {"named_metrics.new": (1, 2.0)}
    store.ingest("envoy-1", report("pool", endpoint(A, ok=1, metrics=later)), 10.0)
    assert store.pool_load("pool", 10.0)[A].metrics == {"named_metrics.new": 2.0}


def test_reporter_cap_rejects_newcomers_until_someone_is_idle():
    store = LoadStore(window=5.0, max_reporters=2)
    store.set_known({"pool": [A]})
    for name in ("e1", "e2", "e3"):
        store.ingest(name, report("pool", endpoint(A, ok=1, in_progress=1)), 1.0)
    assert store.ignored["reporter_cap"] == 1 and store.reporters == 2
    assert store.pool_load("pool", 1.0)[A].in_progress == 2
    store.ingest("e3", report("pool", endpoint(A, ok=1, in_progress=1)), 7.0)  # e1 is idle
    assert store.reporters == 2 and store.ignored["reporter_cap"] == 1


def test_locality_cap():
    store = LoadStore(max_localities=2)
    store.set_known({"pool": [A]})
    for zone in ("z1", "z2", "z3"):
        store.ingest("e1", report("pool", endpoint(A, ok=1), zone=zone), 1.0)
    assert set(store.locality_load("pool", 1.0)) == {"z1", "z2"}
    assert store.ignored["locality_cap"] == 1


def test_ring_memory_does_not_grow_with_reports(store: LoadStore):
    for i in range(500):
        metrics = {KV: (1, 0.5)}
        store.ingest(f"e{i % 7}", report("pool", endpoint(A, ok=1, metrics=metrics)), i * 0.1)
    series = store._clusters["pool"].endpoints[("10.0.0.1", 8000)]
    assert len(series.ring) == 5 and len(series.names) == 1


@pytest.mark.parametrize(
    ("metric", "reason"),
    [
        ((10, math.nan), "not_finite"),
        ((10, math.inf), "not_finite"),
        ((10, -1.0), "negative"),
        ((0, 3.0), "metric_without_requests"),
        ((MAX_COUNT + 1, 1.0), "count_too_large"),
        ((1, 101.0), "too_large"),  # a utilization above 100
    ],
)
def test_bad_metric_values_are_dropped_by_reason(store: LoadStore, metric, reason):
    bad = endpoint(A, ok=1, metrics={KV: metric, "named_metrics.ok_usage": (2, 1.0)})
    store.ingest("envoy-1", report("pool", bad), 1.0)
    assert store.pool_load("pool", 1.0)[A].metrics == {"named_metrics.ok_usage": 0.5}
    assert store.dropped_values == {reason: 1}


def test_large_means_are_fine_for_metrics_that_are_not_utilizations(store: LoadStore):
    queue = endpoint(A, ok=1, metrics={"named_metrics.num_requests_waiting": (2, 900.0)})
    store.ingest("envoy-1", report("pool", queue), 1.0)
    assert store.pool_load("pool", 1.0)[A].metrics == {"named_metrics.num_requests_waiting": 450}


def test_absurd_counts_and_intervals_are_dropped_and_counted(store: LoadStore):
    huge = endpoint(A, ok=MAX_COUNT + 1, errors=1, issued=2, in_progress=2**63)
    store.ingest("envoy-1", report("pool", huge, interval=-3.0), 1.0)
    load = store.pool_load("pool", 1.0)[A]
    assert load.rps == pytest.approx(1 / 5.0)  # no usable interval yet: the whole window
    assert load.in_progress == 0
    assert store.dropped_values == {"count_too_large": 2, "bad_interval": 1}
    store.ingest("envoy-1", report("pool", endpoint(A, ok=1), interval=0.0), 3.0)
    assert store.dropped_values["bad_interval"] == 2  # then: the time since its last report


def test_snapshot_is_json_with_counters_and_loads(store: LoadStore):
    store.ingest("envoy-1", report("pool", endpoint(A, ok=3, metrics={KV: (3, 1.5)})), 1.0)
    store.ingest("envoy-1", report("gone", endpoint(A, ok=3)), 1.0)
    view = json.loads(json.dumps(store.snapshot(1.5)))
    assert view["ignored"] == {"unknown_cluster": 1}
    endpoint_view = view["clusters"]["pool"]["endpoints"][A]
    assert endpoint_view["metrics"] == {KV: 0.5} and endpoint_view["reporters"] == 1
    assert view["clusters"]["pool"]["localities"]["zone-a"]["rps"] == 0.0  # no locality counts
    assert view["reporters"] == 1 and view["reports"] == 2 and view["endpoint_stats"] == 1


def test_constructor_rejects_nonsense():
    with pytest.raises(ValueError):
        LoadStore(window=0)
    with pytest.raises(ValueError):
        LoadStore(buckets=0)


# --------------------------------------------------------------------------- bad input

_uint64 = st.integers(0, 2**64 - 1)
_counts = st.one_of(st.integers(0, 100), _uint64)
_values = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 1)
_names = st.sampled_from([KV, "cpu_utilization", "named_metrics.q", ""]) | st.text(max_size=300)
_keys = st.sampled_from([A, B, "10.9.9.9:1", "[::1]:0", "garbage"])


@st.composite
def _endpoint_stats(draw: st.DrawFn) -> load_report_pb2.UpstreamEndpointStats:
    stats = endpoint(
        draw(_keys),
        ok=draw(_counts),
        errors=draw(_counts),
        issued=draw(_counts),
        in_progress=draw(_counts),
    )
    for _ in range(draw(st.integers(0, 3))):
        stats.load_metric_stats.add(
            metric_name=draw(_names),
            num_requests_finished_with_metric=draw(_counts),
            total_metric_value=draw(_values),
        )
    return stats


@st.composite
def _requests(draw: st.DrawFn) -> lrs_pb2.LoadStatsRequest:
    request = lrs_pb2.LoadStatsRequest()
    for _ in range(draw(st.integers(0, 2))):
        stats = request.cluster_stats.add(cluster_name=draw(st.sampled_from(["pool", "x", ""])))
        if draw(st.booleans()):
            stats.load_report_interval.seconds = draw(st.integers(-(2**63), 2**63 - 1))
            stats.load_report_interval.nanos = draw(st.integers(-(2**31), 2**31 - 1))
        for _ in range(draw(st.integers(0, 2))):
            locality = stats.upstream_locality_stats.add(
                total_successful_requests=draw(_counts),
                total_requests_in_progress=draw(_counts),
            )
            locality.locality.zone = draw(st.text(max_size=5))
            if draw(st.booleans()):
                locality.cpu_utilization.num_requests_finished_with_metric = draw(_counts)
                locality.cpu_utilization.total_metric_value = draw(_values)
            locality.load_metric_stats.add(
                metric_name=draw(_names),
                num_requests_finished_with_metric=draw(_counts),
                total_metric_value=draw(_values),
            )
            locality.upstream_endpoint_stats.extend(draw(st.lists(_endpoint_stats(), max_size=3)))
    return request


def _sane(load: EndpointLoad) -> bool:
    numbers = [load.rps, load.error_rps, load.issued_rps, load.in_progress, load.age]
    numbers += list(load.metrics.values())
    return all(math.isfinite(n) and n >= 0 for n in numbers) and load.reporters >= 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["e1", "e2", "e3"]), _requests(), st.floats(0, 20)),
        max_size=6,
    ),
    st.floats(0, 30),
)
def test_arbitrary_reports_never_raise_nor_give_nan_or_negative(reports, read_at):
    store = LoadStore(window=5.0, max_metric_names=2, max_reporters=2, max_localities=2)
    store.set_known({"pool": [A, B, "[::1]:0"]})
    for reporter, request, at in sorted(reports, key=lambda r: r[2]):
        store.ingest(reporter, request, at)
        if at > 10:
            store.forget_reporter(reporter)
    for loads in (store.pool_load("pool", read_at), store.locality_load("pool", read_at)):
        assert all(_sane(load) for load in loads.values())
    json.dumps(store.snapshot(read_at), allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_that_parse_as_a_report_never_raise(payload):
    store = LoadStore()
    store.set_known({"pool": [A]})
    try:
        request = TrimmedReport.FromString(payload)
    except DecodeError:  # not a protobuf at all: the service counts it as rejected
        return
    store.ingest("e1", request, 1.0)
    assert all(_sane(load) for load in store.pool_load("pool", 1.0).values())


# --------------------------------------------------------------------------- slices, window


def test_ingest_in_slices_yields_between_endpoint_stats_and_equals_one_piece(store: LoadStore):
    stats = [endpoint(key, ok=2, in_progress=1, metrics={KV: (2, 1.0)}) for key in (A, B, C)]
    whole = LoadStore(window=5.0, buckets=5)
    whole.set_known({"pool": [A, B, C]})
    whole.ingest("envoy-1", report("pool", *stats), 1.0)
    steps = store.ingest_steps("envoy-1", report("pool", *stats), 1.0, slice_stats=1)
    assert next(steps) is None and store.endpoint_stats == 1  # paused after the first stat
    assert store.pool_load("pool", 1.0)[A].rps > 0  # readable at a pause
    assert sum(1 for _ in steps) == 2
    assert store.pool_load("pool", 1.0) == whole.pool_load("pool", 1.0)


def test_reporter_forgotten_while_its_report_is_paused_leaves_no_levels(store: LoadStore):
    store.ingest("envoy-1", report("pool", endpoint(A, ok=1, in_progress=4)), 1.0)
    steps = store.ingest_steps(
        "envoy-1", report("pool", endpoint(A, in_progress=9), endpoint(B, ok=1)), 2.0, 1
    )
    next(steps)
    store.forget_reporter("envoy-1")  # the stream closed: the service drops the iterator
    steps.close()
    load = store.pool_load("pool", 2.0)[A]
    assert load.in_progress == 0 and load.reporters == 0


def test_address_lookups_are_cached_and_garbage_addresses_are_unknown(store: LoadStore):
    request = trimmed(report("pool", endpoint(A, ok=1), endpoint(A, ok=1)))
    request.cluster_stats[0].upstream_locality_stats[0].upstream_endpoint_stats[
        1
    ].address = b"\x0a\xff"  # a socket_address whose length runs past the end
    for t in (1.0, 2.0):
        store.ingest("envoy-1", request, t)
    assert store.ignored["unknown_endpoint"] == 2 and store.endpoint_stats == 2
    assert len(store._clusters["pool"].addresses) == 2


def test_metric_names_that_are_empty_or_too_long_are_dropped(store: LoadStore):
    names = {"": (1, 0.5), "n" * 300: (1, 0.5), KV: (1, 0.5)}
    store.ingest("envoy-1", report("pool", endpoint(A, ok=1, metrics=names)), 1.0)
    assert store.pool_load("pool", 1.0)[A].metrics == {KV: 0.5}
    assert store.dropped_values == {"bad_name": 2}


@pytest.mark.parametrize("factor", [2.0, 4.0, 0.5])
def test_set_window_keeps_rates_means_and_levels(factor):
    store = LoadStore(window=4.0, buckets=4)
    store.set_known({"pool": [A]})
    for t in (1.0, 2.0, 3.0, 4.0):
        stats = endpoint(A, ok=10, in_progress=2, metrics={KV: (10, 5.0)})
        store.ingest("envoy-1", report("pool", stats), t)
    store.set_window(4.0 * factor)
    assert store.window == 4.0 * factor
    load = store.pool_load("pool", 4.5)[A]
    assert load.rps == pytest.approx(10.0)  # every report covers 1 s
    assert load.metrics == {KV: pytest.approx(0.5)} and load.in_progress == 2
    # Later reports land in the same kind of window.
    store.ingest("envoy-1", report("pool", endpoint(A, ok=10)), 5.0)
    assert store.pool_load("pool", 5.1)[A].rps == pytest.approx(10.0)


def test_a_wider_window_holds_reports_that_are_further_apart():
    store = LoadStore(window=5.0, buckets=5)
    store.set_known({"pool": [A]})
    store.set_window(40.0)  # the service asks for 10 s intervals
    for t in (10.0, 20.0, 30.0):
        store.ingest("envoy-1", report("pool", endpoint(A, ok=100, in_progress=3), interval=10), t)
    load = store.pool_load("pool", 35.0)[A]
    assert load.rps == pytest.approx(10.0) and load.in_progress == 3
    with pytest.raises(ValueError):
        store.set_window(0)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_the_trimmed_report_reads_what_the_full_message_says(request):
    """lrs.wire declares its own descriptor: every field the store reads must decode to the
    value the real LoadStatsRequest decodes, the address as that submessage's bytes."""
    payload = request.SerializeToString()
    full, trim = lrs_pb2.LoadStatsRequest.FromString(payload), trimmed(request)
    assert [c.cluster_name for c in trim.cluster_stats] == [
        c.cluster_name for c in full.cluster_stats
    ]
    counts = ("total_successful_requests", "total_error_requests", "total_issued_requests")
    counts += ("total_requests_in_progress",)
    for mine, theirs in zip(trim.cluster_stats, full.cluster_stats, strict=True):
        assert mine.load_report_interval == theirs.load_report_interval
        for ml, tl in zip(
            mine.upstream_locality_stats, theirs.upstream_locality_stats, strict=True
        ):
            assert ml.locality == tl.locality
            assert _wire([ml.cpu_utilization]) == _wire([tl.cpu_utilization])
            assert [getattr(ml, n) for n in counts] == [getattr(tl, n) for n in counts]
            assert _wire(ml.load_metric_stats) == _wire(tl.load_metric_stats)
            pairs = zip(ml.upstream_endpoint_stats, tl.upstream_endpoint_stats, strict=True)
            for me, te in pairs:
                assert me.address == te.address.SerializeToString()
                assert [getattr(me, n) for n in counts] == [getattr(te, n) for n in counts]
                assert _wire(me.load_metric_stats) == _wire(te.load_metric_stats)


def _wire(messages: Iterable[Message]) -> list[bytes]:
    """Messages as bytes: equal values compare equal, NaN included."""
    return [m.SerializeToString() for m in messages]
