"""The LoadReportingService: Envoys stream load reports in, the store merges them.

Protocol (envoy.service.load_stats.v3, as Envoy 1.40 speaks it): a stream's first
LoadStatsRequest carries the node; we answer with the clusters of the node's group, the
reporting interval and endpoint granularity, and from then on Envoy sends a report every
interval. A config reload that changes a group's clusters re-sends the LoadStatsResponse
on that group's open streams, which Envoy applies mid-stream.

Spread reporting (`reporters_per_pool`, see `lrs.spread`): each pool is asked of a few of
the streams that could report it, spread so each carries a like number of endpoint stats;
the store scales their rates to the pool's population. A stream that joins or leaves
re-spreads only what it must (the streams whose lists change are sent a new response);
a stream asked for nothing reports at `max_interval`.

Every report repeats the node (~61 KB, ~500 extensions), so only a stream's first message
is parsed as a full LoadStatsRequest; later ones are parsed as `lrs.wire.TrimmedReport`,
which skips the node and everything else the store does not read.

The event loop is shared with xDS, and one large report takes milliseconds to merge, so
reports are merged in slices (`LoadStore.ingest_steps`) with the loop awaited in between:
a stream opening during an LRS flood waits for a slice, not for a queue of reports.
Ingest CPU (parse and merge, on the loop's thread) feeds an `IntervalGovernor`: when it
exceeds `cpu_budget` of a core, every open stream is sent a LoadStatsResponse with a longer
interval (Envoy applies it mid-stream), shortened again once the load falls; the store's
window is scaled with it.

Trust: the host hands in a `gate` that every stream passes (per-client limits, and with
mTLS the certificate's identities) and an `authorize(node.cluster, identities)` that
refuses a node claiming a group its certificate may not claim (PERMISSION_DENIED). A
reporter is its authenticated peer plus node.id; each node holds at most
`max_streams_per_node` LRS streams; only the clusters a stream was asked for are merged;
a report over `max_report_bytes` ends the stream (RESOURCE_EXHAUSTED); and a reporter
that reports faster than the interval it was asked for has the early reports dropped
before they are parsed (they cost no ingest CPU, so they cannot lengthen the interval for
everyone) and, after `MAX_EARLY` in a row, its stream closed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Final, Protocol, cast

import grpc
from envoy.service.load_stats.v3 import lrs_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError

from lrs.contract import raw_bytes
from lrs.load_store import SLICE_STATS, LoadStore, Report
from lrs.pacing import EARLY_FACTOR, MAX_EARLY, REPORT_BURST, IntervalGovernor, ReportAllowance
from lrs.spread import Assignment
from lrs.wire import TrimmedReport

__all__ = [
    "EARLY_FACTOR",
    "MAX_EARLY",
    "MAX_NODE_ID",
    "MAX_REPORT_BYTES",
    "METHOD",
    "REASK_AFTER",
    "REPORT_BURST",
    "SERVICE",
    "Authorize",
    "Gate",
    "LoadReportingService",
    "Peer",
    "open_gate",
]

log = logging.getLogger(__name__)

SERVICE: Final = "envoy.service.load_stats.v3.LoadReportingService"
METHOD: Final = "StreamLoadStats"
#: Largest load report accepted (a full node is ~61 KB; 2,000 endpoint stats ~200 KB).
MAX_REPORT_BYTES: Final = 8 * 1024 * 1024
#: Longest node id kept in a reporter's identity; the rest of a huge id is noise.
MAX_NODE_ID: Final = 256
#: Seconds (at least; 4 intervals if longer) before re-asking a reporter for clusters it ignores.
REASK_AFTER: Final = 2.0

_streams = itertools.count(1)


class Peer(Protocol):
    """Who is on the other end of a stream, as the host's gate established it."""

    @property
    def key(self) -> str: ...  # the certificate identity with mTLS, else the client's address

    @property
    def identities(self) -> tuple[str, ...] | None: ...  # None: no verified certificate


#: (service name, call) -> a context holding the stream's admission; it aborts the call
#: itself when the client is over a limit.
Gate = Callable[[str, grpc.aio.ServicerContext], AbstractAsyncContextManager[Peer]]
#: (node.cluster, identities) -> why the node may not claim its group, or None.
Authorize = Callable[[str, "tuple[str, ...] | None"], "str | None"]


@dataclass(frozen=True, slots=True)
class _Anonymous:
    key: str
    identities: tuple[str, ...] | None = None


@asynccontextmanager
async def open_gate(_service: str, context: grpc.aio.ServicerContext) -> AsyncIterator[Peer]:
    """The gate of a service run without a host's limits: every peer is its address."""
    yield _Anonymous(context.peer())


def _anyone(_node_cluster: str, _identities: tuple[str, ...] | None) -> str | None:
    return None


class _Stream:
    """One open LRS stream: who reports on it, the clusters it was told, what to send."""

    def __init__(self, peer: Peer) -> None:
        self.id = next(_streams)
        self.peer = peer.key
        self.identities = peer.identities
        self.reporter = ""  # set by the first message: "peer/node.id#stream id"
        self.node_cluster = ""
        self.pools: tuple[str, ...] = ()  # the clusters of its node's group
        self.clusters: tuple[str, ...] = ()  # those it is asked to report (lrs.spread)
        self.outbox: asyncio.Queue[lrs_pb2.LoadStatsResponse | None] = asyncio.Queue()
        self.failure = ""
        self.failure_code = grpc.StatusCode.INVALID_ARGUMENT
        self.asked_at = 0.0  # monotonic time the clusters were last sent
        self.pace = ReportAllowance()  # how soon it may report again


class LoadReportingService:
    """Serves StreamLoadStats on the shared gRPC server and feeds a LoadStore.

    `clusters_for(node.cluster)` names the clusters (pools) of the node's group;
    the control plane calls `clusters_changed()` after each config reload.
    """

    def __init__(
        self,
        store: LoadStore,
        clusters_for: Callable[[str], Sequence[str]],
        interval: float = 1.0,
        *,
        cpu_budget: float = 0.5,
        max_interval: float = 60.0,
        slice_stats: int = SLICE_STATS,
        governor: IntervalGovernor | None = None,
        gate: Gate = open_gate,
        authorize: Authorize = _anyone,
        max_streams_per_node: int = 4,
        max_report_bytes: int = MAX_REPORT_BYTES,
        reporters_per_pool: int | None = None,
    ) -> None:
        """`interval` is the shortest reporting interval asked for; ingest may lengthen it
        up to `max_interval` to keep within `cpu_budget` cores (see lrs.pacing).
        `reporters_per_pool`: spread reporting, each pool asked of that many of the streams
        that could report it (lrs.spread); None asks every stream for all its pools."""
        if not interval > 0:
            raise ValueError("interval must be > 0")
        self.store = store
        self.clusters_for = clusters_for
        self.gate = gate
        self.authorize = authorize
        self.max_streams_per_node = max_streams_per_node
        self.max_report_bytes = max_report_bytes
        self.assignment = Assignment(reporters_per_pool, store.size)
        self.interval = interval
        self.governor = governor or IntervalGovernor(interval, cpu_budget, max_interval)
        self.slice_stats = slice_stats
        self._merging = asyncio.Lock()
        #: The store's window at the base interval; scaled in proportion with the interval.
        self._base_window = store.window
        self._streams: dict[int, _Stream] = {}
        self.reports_received = 0  # every LoadStatsRequest, the first of each stream included
        self.reports_rejected = 0  # not parseable, or a first message without node.id
        self.clusters_reasked = 0  # responses re-sent because asked-for clusters went unreported
        self.reports_early = 0  # dropped unparsed: sooner than the asked interval allows
        #: Streams ended by a limit or a refusal, by reason (identity, streams_per_peer, ...).
        self.refused: dict[str, int] = {}

    @property
    def connected_reporters(self) -> int:
        """Open streams whose node has identified itself."""
        return sum(1 for stream in self._streams.values() if stream.reporter)

    @property
    def endpoint_stats_ingested(self) -> int:
        return self.store.endpoint_stats

    @property
    def reporting_interval(self) -> float:
        """The interval reporters are asked for now (seconds); at least `interval`."""
        return self.governor.interval

    @property
    def cpu_budget(self) -> float:
        """Cores ingest may use before reporters are asked to report less often."""
        return self.governor.budget

    @property
    def ingest_cpu_share(self) -> float:
        """Cores' worth of CPU spent on ingest (parse and merge) recently."""
        return self.governor.usage(time.monotonic())

    @property
    def budget_use(self) -> float:
        """`ingest_cpu_share` over `cpu_budget`: above 1 lengthens the interval."""
        return self.ingest_cpu_share / self.governor.budget

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        method = grpc.stream_stream_rpc_method_handler(
            self._serve,
            request_deserializer=raw_bytes,  # parsed in _read: the first message differently
            response_serializer=lrs_pb2.LoadStatsResponse.SerializeToString,
        )
        return [grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})]

    def clusters_changed(self) -> None:
        """Re-send LoadStatsResponse on streams whose asked-for clusters changed: their
        group's clusters changed, or the assignment moved some to or from them."""
        lists: dict[str, tuple[str, ...]] = {}
        regrouped: dict[int, tuple[str, ...]] = {}
        self.assignment.resize()
        for stream in self._streams.values():
            if not stream.reporter:
                continue
            pools = lists.get(stream.node_cluster)
            if pools is None:
                pools = lists[stream.node_cluster] = self._clusters(stream.node_cluster)
            if pools != stream.pools:
                stream.pools = regrouped[stream.id] = pools
        self._reassigned(self.assignment.regroup(regrouped), self.assignment.pools())

    def _reassigned(
        self, changed: Iterable[int], pools: Iterable[str], first: _Stream | None = None
    ) -> None:
        """Ask the `changed` streams (and a new stream, `first`) for the clusters now
        assigned to them, and tell the store the population of those of `pools` that
        only some of their reporters report."""
        for stream_id in changed:
            stream = self._streams.get(stream_id)
            if stream is None or not stream.reporter:
                continue
            clusters = self.assignment.clusters(stream_id)
            if clusters != stream.clusters or stream is first:
                stream.clusters = clusters
                self._ask(stream)
        for pool in pools:  # a pool every reporter reports needs no scaling
            population = self.assignment.population(pool)
            spread = self.assignment.holders(pool) < population
            self.store.set_population(pool, population if spread else None)

    def _clusters(self, node_cluster: str) -> tuple[str, ...]:
        return tuple(self.clusters_for(node_cluster))

    def _response(self, clusters: tuple[str, ...], seconds: float) -> lrs_pb2.LoadStatsResponse:
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(round(seconds * 1e9))
        return lrs_pb2.LoadStatsResponse(
            clusters=clusters, load_reporting_interval=interval, report_endpoint_granularity=True
        )

    async def _serve(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        """Pass the gate, then serve the stream until the client goes away."""
        async with self.gate("lrs", context) as peer:
            await self._serve_admitted(_Stream(peer), requests, context)

    async def _serve_admitted(
        self, stream: _Stream, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        """Read reports in a task, write responses here."""
        self._streams[stream.id] = stream
        reader = asyncio.create_task(self._read(stream, requests))
        try:
            while (response := await stream.outbox.get()) is not None:
                await context.write(response)
            if stream.failure:
                await context.abort(stream.failure_code, stream.failure)
        finally:
            reader.cancel()
            del self._streams[stream.id]
            if stream.reporter:
                self.store.forget_reporter(stream.reporter)
                self._reassigned(self.assignment.leave(stream.id), stream.pools)

    async def _read(self, stream: _Stream, requests: AsyncIterator[bytes]) -> None:
        try:
            async for payload in requests:
                self.reports_received += 1
                if len(payload) > self.max_report_bytes:
                    self._refuse(
                        stream,
                        "message_size",
                        f"a load report of {len(payload)} bytes is over the limit of "
                        f"{self.max_report_bytes}",
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    )
                    return
                if stream.reporter:
                    if self._early(stream, time.monotonic()):
                        continue
                    await self._take(stream, payload)
                elif not await self._take_first(stream, payload):
                    return
        except grpc.RpcError as err:
            log.debug("LRS stream %d: read ended: %s", stream.id, err)
        finally:
            stream.outbox.put_nowait(None)

    async def _take_first(self, stream: _Stream, payload: bytes) -> bool:
        """Answer a stream's first message; False ends the stream. A reconnecting Envoy's
        first message already carries the clusters it reported: those are merged."""
        request = self._identify(stream, payload)
        if request is None:
            return False
        if request.cluster_stats:
            async with self._merging:
                await self._ingest(stream, request, time.thread_time())
        return True

    async def _take(self, stream: _Stream, payload: bytes) -> None:
        """Parse and merge one report. Both happen under the merge lock, one report at a
        time: with every reporter's merge in flight at once, each turn of the loop would
        run a slice of each, and a new stream would wait for all of them at every step of
        its handshake; and reports parsed while waiting would hold megabytes each.
        Queued payloads wait in turn (their streams' HTTP/2 windows slow the reporters)."""
        async with self._merging:
            started = time.thread_time()
            report = self._parse(stream, payload)
            if report is None:
                return
            if report.cluster_stats:
                await self._ingest(stream, report, started)
        self._ask_again_if_ignored(stream, report, time.monotonic())

    def _identify(self, stream: _Stream, payload: bytes) -> lrs_pb2.LoadStatsRequest | None:
        """Take the node from a stream's first message and answer it; None ends the stream."""
        try:
            request = lrs_pb2.LoadStatsRequest.FromString(payload)
        except DecodeError:
            request = None
        if request is None or not request.node.id:
            self.reports_rejected += 1
            stream.failure = "the first LoadStatsRequest must carry the node, with node.id"
            log.warning("LRS stream %d from %s: %s", stream.id, stream.peer, stream.failure)
            return None
        denied = self.authorize(request.node.cluster, stream.identities)
        if denied is not None:
            self._refuse(stream, "identity", denied, grpc.StatusCode.PERMISSION_DENIED)
            return None
        node = f"{stream.peer}/{request.node.id[:MAX_NODE_ID]}"
        same_node = sum(1 for s in self._streams.values() if s.reporter.startswith(node + "#"))
        if same_node >= self.max_streams_per_node:
            self._refuse(
                stream,
                "streams_per_node",
                f"node {request.node.id!r} from {stream.peer} already has {same_node} LRS "
                "streams, the most one node may hold (an Envoy needs one)",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            return None
        stream.reporter = f"{node}#{stream.id}"
        stream.node_cluster = request.node.cluster
        stream.pools = self._clusters(stream.node_cluster)
        joined = self.assignment.join(stream.id, node, stream.pools)
        self._reassigned(joined, stream.pools, first=stream)
        return request

    def _parse(self, stream: _Stream, payload: bytes) -> Report | None:
        try:
            # TrimmedReport is built at import time, so its type is only known as Message.
            return cast(Report, TrimmedReport.FromString(payload))
        except DecodeError:
            self.reports_rejected += 1
            log.debug("LRS stream %d: unparseable report of %d bytes", stream.id, len(payload))
            return None

    async def _ingest(self, stream: _Stream, report: Report, started: float) -> None:
        """Merge a report slice by slice, yielding the loop in between (the caller holds the
        merge lock), and account the loop thread's CPU since `started` to the governor."""
        now = time.monotonic()
        spent = 0.0
        steps = self.store.ingest_steps(
            stream.reporter, report, now, self.slice_stats, clusters=stream.clusters
        )
        for _ in steps:
            spent += time.thread_time() - started
            await asyncio.sleep(0)
            started = time.thread_time()
        spent += time.thread_time() - started
        done = time.monotonic()
        self.governor.record(spent, done)
        self._pace(done)

    def _pace(self, now: float) -> None:
        """Apply the governor's verdict: a new interval goes to every open stream."""
        interval = self.governor.review(now)
        if interval is None:
            return
        log.info(
            "LRS interval now %.1f s (ingest used %.2f cores of a %.2f budget)",
            interval,
            self.governor.usage(now),
            self.governor.budget,
        )
        self.store.set_window(max(self._base_window, self._base_window * interval / self.interval))
        for stream in self._streams.values():
            if stream.clusters:
                self._ask(stream)

    def stream_ids(self) -> list[int]:
        """The open streams, for a host that ends them (a replica shutting down)."""
        return list(self._streams)

    def end_stream(self, stream_id: int, message: str) -> None:
        """Close a stream with UNAVAILABLE: Envoy reconnects (to another replica)."""
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.failure:
            stream.failure, stream.failure_code = message, grpc.StatusCode.UNAVAILABLE
            stream.outbox.put_nowait(None)

    def _ask(self, stream: _Stream) -> None:
        """Send the stream its clusters and interval. A stream asked for no cluster (spread
        reporting has enough reporters of its pools) reports at the longest interval: its
        reports are empty, but each still carries the ~61 KB node through gRPC (about a
        quarter of a millisecond of CPU, bench/lrs_ingest.py's raw server)."""
        seconds = self.reporting_interval if stream.clusters else self.governor.max_interval
        stream.asked_at = time.monotonic()
        stream.pace.asked(seconds)
        stream.outbox.put_nowait(self._response(stream.clusters, seconds))

    def _early(self, stream: _Stream, now: float) -> bool:
        """Whether a report comes sooner than the asked interval allows (dropped unparsed);
        after MAX_EARLY in a row the stream is closed."""
        if stream.pace.take(now):
            return False
        self.reports_early += 1
        if stream.pace.early >= MAX_EARLY:
            self._refuse(
                stream,
                "report_rate",
                f"{MAX_EARLY} reports in a row came sooner than the asked interval of "
                f"{stream.pace.intervals[1]:g} s; honour load_reporting_interval",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            stream.outbox.put_nowait(None)
        return True

    def _refuse(self, stream: _Stream, reason: str, message: str, code: grpc.StatusCode) -> None:
        """Mark the stream failed (the writer ends it with `code`), count and log why."""
        stream.failure, stream.failure_code = message, code
        self.refused[reason] = self.refused.get(reason, 0) + 1
        who = (
            f"{stream.peer} (identities {list(stream.identities)})"
            if stream.identities
            else stream.peer
        )
        log.warning("LRS stream %d from %s refused (%s): %s", stream.id, who, reason, message)

    def _ask_again_if_ignored(self, stream: _Stream, report: Report, now: float) -> None:
        """Envoy reports only the asked-for clusters that existed when it got the request:
        one asked for while still warming (a new Envoy, a new pool) is never reported.
        Asking again, at most every few intervals, picks it up once it exists."""
        if now - stream.asked_at < max(REASK_AFTER, 4 * self.reporting_interval):
            return
        reported = {stats.cluster_name for stats in report.cluster_stats}
        if any(name not in reported for name in stream.clusters):
            self.clusters_reasked += 1
            self._ask(stream)
