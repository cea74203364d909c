"""gRPC wiring: the ADS and per-type discovery services, all on one snapshot cache.

Handlers are registered generically with an identity response serializer: the
protocol code hands over finished bytes built from pre-encoded chunks, so no
response is re-encoded per stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from xds_server import typeurls
from xds_server.cache import SnapshotCache, join_chunks
from xds_server.clients import ClientRegistry
from xds_server.delta import DeltaStream
from xds_server.sotw import CONTROL_PLANE, SotwStream, SotwTypeState
from xds_server.stream import Stream, serve

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

#: gRPC service name, method stem (Stream{stem} / Delta{stem} / Fetch{stem}) and type served.
PER_TYPE_SERVICES = (
    ("envoy.service.cluster.v3.ClusterDiscoveryService", "Clusters", typeurls.CLUSTER),
    ("envoy.service.endpoint.v3.EndpointDiscoveryService", "Endpoints", typeurls.ENDPOINT),
    ("envoy.service.listener.v3.ListenerDiscoveryService", "Listeners", typeurls.LISTENER),
    ("envoy.service.route.v3.RouteDiscoveryService", "Routes", typeurls.ROUTE),
)

#: Options for every gRPC server of ours: large LRS reports (a node is ~61 KB),
#: and keepalive so a vanished client's stream is noticed and freed.
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_concurrent_streams", 0x7FFFFFFF),
    # grpc turns SO_REUSEPORT on by default: a second server on a busy port would bind
    # silently and share its clients. A port in use must be an error instead.
    ("grpc.so_reuseport", 0),
)


def _identity(payload: bytes) -> bytes:
    return payload


class DiscoveryServices:
    """Builds the gRPC handlers for every discovery service over one cache."""

    def __init__(self, cache: SnapshotCache, registry: ClientRegistry) -> None:
        self.cache = cache
        self.registry = registry

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        ads = {
            "StreamAggregatedResources": self._stream_handler(SotwStream, "ads", None),
            "DeltaAggregatedResources": self._stream_handler(DeltaStream, "ads", None),
        }
        handlers = [grpc.method_handlers_generic_handler(ADS_SERVICE, ads)]
        for service, stem, type_url in PER_TYPE_SERVICES:
            short = typeurls.SHORT_NAMES[type_url]
            methods = {
                f"Stream{stem}": self._stream_handler(SotwStream, short, type_url),
                f"Delta{stem}": self._stream_handler(DeltaStream, short, type_url),
                f"Fetch{stem}": grpc.unary_unary_rpc_method_handler(
                    self._fetcher(type_url),
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
            }
            handlers.append(grpc.method_handlers_generic_handler(service, methods))
        return handlers

    def _stream_handler(
        self, kind: type[Stream], service: str, type_url: str | None
    ) -> grpc.RpcMethodHandler:
        request_type = (
            discovery_pb2.DeltaDiscoveryRequest
            if kind is DeltaStream
            else discovery_pb2.DiscoveryRequest
        )

        async def handle(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
            stream = kind(self.cache, self.registry, service, type_url, context.peer())
            await serve(stream, requests, context)

        return grpc.stream_stream_rpc_method_handler(
            handle, request_deserializer=request_type.FromString, response_serializer=_identity
        )

    def _fetcher(self, type_url: str) -> Callable:
        """REST-style one-shot fetch: the current resources, no state kept."""

        async def fetch(
            request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext
        ) -> bytes:
            group = self.cache.group_for(request.node.cluster)
            snapshot = group.of_type(type_url)
            state = SotwTypeState(type_url)
            state.subscribe(list(request.resource_names))
            wanted = state.wanted(snapshot)
            if request.version_info == snapshot.version:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "not modified")  # no change
            header = discovery_pb2.DiscoveryResponse(
                version_info=snapshot.version, type_url=type_url, control_plane=CONTROL_PLANE
            )
            return join_chunks((r.sotw_chunk for r in wanted.values()), header)

        return fetch


async def start_grpc_server(
    handlers: list[grpc.GenericRpcHandler], host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server on host:port; returns it and the bound port (0 picks one)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers(handlers)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}: is the port in use?")
    await server.start()
    return server, bound
