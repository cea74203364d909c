"""The LoadReportingService: Envoys stream load reports in, the store merges them.

Protocol (envoy.service.load_stats.v3, as Envoy 1.40 speaks it): a stream's first
LoadStatsRequest carries the node; we answer with the clusters of the node's group, the
reporting interval and endpoint granularity, and from then on Envoy sends a report every
interval. A config reload that changes a group's clusters re-sends the LoadStatsResponse
on that group's open streams, which Envoy applies mid-stream.

Every report repeats the node (~61 KB, ~500 extensions), so only a stream's first message
is parsed as a full LoadStatsRequest; later ones are parsed with a message class that
declares `cluster_stats` alone, leaving the node as unparsed bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

import grpc
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import DecodeError, Message

from lrs.store import LoadStore, Report

log = logging.getLogger(__name__)

SERVICE: Final = "envoy.service.load_stats.v3.LoadReportingService"
METHOD: Final = "StreamLoadStats"
#: Longest node id kept in a reporter's identity; the rest of a huge id is noise.
MAX_NODE_ID: Final = 256
#: Seconds (at least; 4 intervals if longer) before re-asking a reporter for clusters it ignores.
REASK_AFTER: Final = 2.0

_streams = itertools.count(1)


def _report_class() -> type[Message]:
    """A LoadStatsRequest without its node field: field 1 stays unparsed bytes.

    Built from a one-message descriptor in the default pool, where ClusterStats lives,
    so `cluster_stats` holds the real envoy.config.endpoint.v3.ClusterStats messages.
    """
    name = "xds_server_lrs_report.proto"
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(
            name=name,
            package="xds_server.lrs",
            syntax="proto3",
            dependency=[load_report_pb2.DESCRIPTOR.name],
        )
        message = proto.message_type.add(name="ClusterStatsOnly")
        message.field.add(
            name="cluster_stats",
            number=lrs_pb2.LoadStatsRequest.CLUSTER_STATS_FIELD_NUMBER,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
            type_name=f".{load_report_pb2.ClusterStats.DESCRIPTOR.full_name}",
        )
        pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("xds_server.lrs.ClusterStatsOnly")
    )


#: What a stream's later reports are parsed as: `cluster_stats` only, the node skipped.
ClusterStatsOnly = _report_class()


def _identity(payload: bytes) -> bytes:
    return payload


class _Stream:
    """One open LRS stream: who reports on it, the clusters it was told, what to send."""

    def __init__(self, peer: str) -> None:
        self.id = next(_streams)
        self.peer = peer
        self.reporter = ""  # set by the first message: "node.id#stream id"
        self.node_cluster = ""
        self.clusters: tuple[str, ...] = ()
        self.outbox: asyncio.Queue[lrs_pb2.LoadStatsResponse | None] = asyncio.Queue()
        self.failure = ""
        self.asked_at = 0.0  # monotonic time the clusters were last sent


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
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0")
        self.store = store
        self.clusters_for = clusters_for
        self.interval = interval
        self._streams: dict[int, _Stream] = {}
        self.reports_received = 0  # every LoadStatsRequest, the first of each stream included
        self.reports_rejected = 0  # not parseable, or a first message without node.id
        self.clusters_reasked = 0  # responses re-sent because asked-for clusters went unreported

    @property
    def connected_reporters(self) -> int:
        """Open streams whose node has identified itself."""
        return sum(1 for stream in self._streams.values() if stream.reporter)

    @property
    def endpoint_stats_ingested(self) -> int:
        return self.store.endpoint_stats

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        method = grpc.stream_stream_rpc_method_handler(
            self._serve,
            request_deserializer=_identity,  # parsed in _read: the first message differently
            response_serializer=lrs_pb2.LoadStatsResponse.SerializeToString,
        )
        return [grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})]

    def clusters_changed(self) -> None:
        """Re-send LoadStatsResponse on streams whose group's clusters changed."""
        lists: dict[str, tuple[str, ...]] = {}
        for stream in self._streams.values():
            if not stream.reporter:
                continue
            clusters = lists.get(stream.node_cluster)
            if clusters is None:
                clusters = lists[stream.node_cluster] = self._clusters(stream.node_cluster)
            if clusters != stream.clusters:
                stream.clusters = clusters
                self._ask(stream)

    def _clusters(self, node_cluster: str) -> tuple[str, ...]:
        return tuple(self.clusters_for(node_cluster))

    def _response(self, clusters: tuple[str, ...]) -> lrs_pb2.LoadStatsResponse:
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(round(self.interval * 1e9))
        return lrs_pb2.LoadStatsResponse(
            clusters=clusters, load_reporting_interval=interval, report_endpoint_granularity=True
        )

    async def _serve(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        """Read reports in a task, write responses here, until the client goes away."""
        stream = _Stream(context.peer())
        self._streams[stream.id] = stream
        reader = asyncio.create_task(self._read(stream, requests))
        try:
            while (response := await stream.outbox.get()) is not None:
                await context.write(response)
            if stream.failure:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.failure)
        finally:
            reader.cancel()
            del self._streams[stream.id]
            if stream.reporter:
                self.store.forget_reporter(stream.reporter)

    async def _read(self, stream: _Stream, requests: AsyncIterator[bytes]) -> None:
        try:
            async for payload in requests:
                self.reports_received += 1
                if stream.reporter:
                    self._report(stream, payload)
                elif not self._identify(stream, payload):
                    return
        except grpc.RpcError as err:
            log.debug("LRS stream %d: read ended: %s", stream.id, err)
        finally:
            stream.outbox.put_nowait(None)

    def _identify(self, stream: _Stream, payload: bytes) -> bool:
        """Take the node from a stream's first message and answer it; False ends the stream."""
        try:
            request = lrs_pb2.LoadStatsRequest.FromString(payload)
        except DecodeError:
            request = None
        if request is None or not request.node.id:
            self.reports_rejected += 1
            stream.failure = "the first LoadStatsRequest must carry the node, with node.id"
            log.warning("LRS stream %d from %s: %s", stream.id, stream.peer, stream.failure)
            return False
        stream.reporter = f"{request.node.id[:MAX_NODE_ID]}#{stream.id}"
        stream.node_cluster = request.node.cluster
        stream.clusters = self._clusters(stream.node_cluster)
        self._ask(stream)
        # A reconnecting Envoy's first message already carries the clusters it reported.
        if request.cluster_stats:
            self.store.ingest(stream.reporter, request, time.monotonic())
        return True

    def _report(self, stream: _Stream, payload: bytes) -> None:
        now = time.monotonic()
        try:
            report = ClusterStatsOnly.FromString(payload)
        except DecodeError:
            self.reports_rejected += 1
            log.debug("LRS stream %d: unparseable report of %d bytes", stream.id, len(payload))
            return
        self.store.ingest(stream.reporter, report, now)
        self._ask_again_if_ignored(stream, report, now)

    def _ask(self, stream: _Stream) -> None:
        stream.asked_at = time.monotonic()
        stream.outbox.put_nowait(self._response(stream.clusters))

    def _ask_again_if_ignored(self, stream: _Stream, report: Report, now: float) -> None:
        """Envoy reports only the asked-for clusters that existed when it got the request:
        one asked for while still warming (a new Envoy, a new pool) is never reported.
        Asking again, at most every few intervals, picks it up once it exists."""
        if now - stream.asked_at < max(REASK_AFTER, 4 * self.interval):
            return
        reported = {stats.cluster_name for stats in report.cluster_stats}
        if any(name not in reported for name in stream.clusters):
            self.clusters_reasked += 1
            self._ask(stream)
