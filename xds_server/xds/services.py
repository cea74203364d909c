"""gRPC wiring: the ADS and per-type discovery services, all on one resource cache.

Handlers are registered generically with an identity response serializer: the
protocol code hands over finished bytes built from pre-encoded chunks, so no
response is re-encoded per stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from lrs.contract import raw_bytes
from xds_server.admission import Admission, ClientLimits, Peer
from xds_server.xds import typeurls
from xds_server.xds.cache import ResourceCache, join_chunks
from xds_server.xds.clients import ClientRegistry
from xds_server.xds.delta import DeltaStream
from xds_server.xds.sotw import SotwStream, SotwTypeState
from xds_server.xds.stream import CONTROL_PLANE, ProtocolError, Request, State, Stream, serve
from xds_server.xds.subscriptions import subscription

__all__ = ["ADS_SERVICE", "PER_TYPE_SERVICES", "DiscoveryServices"]

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_MAX_REQUEST_BYTES = ClientLimits().max_xds_request_bytes
_MAX_NAMES = ClientLimits().max_names_per_subscription
#: (service, call) -> the call's admission (see xds_server.admission.Admission.gate).
Gate = Callable[[str, grpc.aio.ServicerContext], AbstractAsyncContextManager[Peer]]
_SOTW: Callable[[bytes], discovery_pb2.DiscoveryRequest] = discovery_pb2.DiscoveryRequest.FromString
_DELTA: Callable[[bytes], discovery_pb2.DeltaDiscoveryRequest] = (
    discovery_pb2.DeltaDiscoveryRequest.FromString
)

#: gRPC service name, method stem (Stream{stem} / Delta{stem} / Fetch{stem}) and type served.
PER_TYPE_SERVICES = (
    ("envoy.service.cluster.v3.ClusterDiscoveryService", "Clusters", typeurls.CLUSTER),
    ("envoy.service.endpoint.v3.EndpointDiscoveryService", "Endpoints", typeurls.ENDPOINT),
    ("envoy.service.listener.v3.ListenerDiscoveryService", "Listeners", typeurls.LISTENER),
    ("envoy.service.route.v3.RouteDiscoveryService", "Routes", typeurls.ROUTE),
)


class DiscoveryServices:
    """Builds the gRPC handlers for every discovery service over one cache."""

    def __init__(
        self,
        cache: ResourceCache,
        registry: ClientRegistry,
        gate: Gate | None = None,
        max_request_bytes: int = _MAX_REQUEST_BYTES,
        max_names: int = _MAX_NAMES,
    ) -> None:
        """`gate` admits each stream (limits, certificate identities; default: the default
        limits); requests over `max_request_bytes` end their stream."""
        self.cache = cache
        self.registry = registry
        self.gate = gate or Admission().gate
        self.max_request_bytes = max_request_bytes
        self.max_names = max_names

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        ads = {
            "StreamAggregatedResources": self._stream_handler(SotwStream, _SOTW, "ads", None),
            "DeltaAggregatedResources": self._stream_handler(DeltaStream, _DELTA, "ads", None),
        }
        handlers = [grpc.method_handlers_generic_handler(ADS_SERVICE, ads)]
        for service, stem, type_url in PER_TYPE_SERVICES:
            short = typeurls.SHORT_NAMES[type_url]
            methods = {
                f"Stream{stem}": self._stream_handler(SotwStream, _SOTW, short, type_url),
                f"Delta{stem}": self._stream_handler(DeltaStream, _DELTA, short, type_url),
                f"Fetch{stem}": grpc.unary_unary_rpc_method_handler(
                    self._fetcher(type_url),
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=raw_bytes,
                ),
            }
            handlers.append(grpc.method_handlers_generic_handler(service, methods))
        return handlers

    def _stream_handler(
        self,
        kind: type[Stream[State, Request]],
        parse: Callable[[bytes], Request],
        service: str,
        type_url: str | None,
    ) -> grpc.RpcMethodHandler:
        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            async with self.gate("xds", context) as peer:
                stream = kind(
                    self.cache, self.registry, service, type_url, context.peer(), peer.identities
                )
                await serve(stream, self._parsed(requests, parse), context)

        return grpc.stream_stream_rpc_method_handler(
            handle, request_deserializer=raw_bytes, response_serializer=raw_bytes
        )

    async def _parsed(
        self, requests: AsyncIterator[bytes], parse: Callable[[bytes], Request]
    ) -> AsyncIterator[Request]:
        """Requests parsed, each checked against the size limit first."""
        async for payload in requests:
            if len(payload) > self.max_request_bytes:
                raise ProtocolError(
                    f"an xDS request of {len(payload)} bytes is over the limit of "
                    f"{self.max_request_bytes}",
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "message_size",
                )
            try:
                request = parse(payload)
            except DecodeError as err:
                raise ProtocolError(f"not a valid xDS request: {err}") from None
            names = _names_in(request)
            if names > self.max_names:
                raise ProtocolError(
                    f"a subscription naming {names} resources is over the limit of "
                    f"{self.max_names}",
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "subscription_names",
                )
            yield request

    def _fetcher(
        self, type_url: str
    ) -> Callable[[discovery_pb2.DiscoveryRequest, grpc.aio.ServicerContext], Awaitable[bytes]]:
        """REST-style one-shot fetch: the current resources, no state kept.

        A client already at the current version gets them all the same, with OK. The REST
        transport answers it HTTP 304, which Envoy's fetcher counts as a completed poll, not
        a failure; gRPC has no such status (UNAVAILABLE maps to 503: a retryable failure),
        and an empty response would tell a client to delete every listener or cluster. The
        unchanged version_info tells a client that compares it that nothing changed.
        """

        async def fetch(
            request: discovery_pb2.DiscoveryRequest, _context: grpc.aio.ServicerContext
        ) -> bytes:
            group = self.cache.group_for(request.node.cluster)
            served = group.of_type(type_url)
            state = SotwTypeState(type_url)
            state.subscribe(subscription(request.resource_names))
            wanted = state.wanted(served)
            header = discovery_pb2.DiscoveryResponse(
                version_info=served.version, type_url=type_url, control_plane=CONTROL_PLANE
            )
            return join_chunks((r.sotw_chunk for r in wanted.values()), header)

        return fetch


def _names_in(request: object) -> int:
    """Resource names a request subscribes to: the whole list (SotW), or those added (Delta)."""
    if isinstance(request, discovery_pb2.DeltaDiscoveryRequest):
        return len(request.resource_names_subscribe)
    if isinstance(request, discovery_pb2.DiscoveryRequest):
        return len(request.resource_names)
    return 0
