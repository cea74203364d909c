"""A scriptable xDS client for protocol tests: every request is explicit.

Unlike Envoy it never acts on its own, so a test decides exactly when to ACK,
NACK, subscribe or reply with a stale nonce, and asserts on each response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


def node(node_id: str = "test-node", cluster: str = "test-cluster") -> base_pb2.Node:
    return base_pb2.Node(id=node_id, cluster=cluster)


def names_of(
    response: discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse,
) -> list[str]:
    """Resource names in a response (SotW resources are unpacked for their name field)."""
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return sorted(r.name for r in response.resources)
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    from xds_server.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE

    kinds = {
        CLUSTER: (cluster_pb2.Cluster, "name"),
        ENDPOINT: (endpoint_pb2.ClusterLoadAssignment, "cluster_name"),
        LISTENER: (listener_pb2.Listener, "name"),
        ROUTE: (route_pb2.RouteConfiguration, "name"),
    }
    out = []
    for any_msg in response.resources:
        kind, field = kinds[any_msg.type_url]
        out.append(getattr(kind.FromString(any_msg.value), field))
    return sorted(out)


class _Client:
    method = ""
    request_type: type = discovery_pb2.DiscoveryRequest
    response_type: type = discovery_pb2.DiscoveryResponse

    def __init__(
        self,
        target: str,
        node: base_pb2.Node,
        method: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`node` goes on the first request; `credentials`: TLS to the server (None: plaintext)."""
        self.node = node
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._call = self.channel.stream_stream(
            method or self.method,
            request_serializer=self.request_type.SerializeToString,
            response_deserializer=self.response_type.FromString,
        )(self._requests())
        self._first = True
        self._responses: asyncio.Queue = asyncio.Queue()
        self._pump = asyncio.create_task(self._read_all())

    async def _read_all(self) -> None:
        """Read in the background: cancelling a pending grpc.aio read would cancel the call."""
        try:
            async for response in self._call:
                self._responses.put_nowait(response)
        except grpc.aio.AioRpcError as err:
            self._responses.put_nowait(err)

    async def _requests(self):
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    def send(self, request) -> None:
        self._queue.put_nowait(request)

    async def recv(self, timeout: float = 5.0):
        got = await asyncio.wait_for(self._responses.get(), timeout)
        if isinstance(got, Exception):
            raise got
        return got

    async def expect_silence(self, seconds: float = 0.3) -> None:
        """Assert that the server sends nothing for a while."""
        try:
            got = await asyncio.wait_for(self._responses.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no response, got {got}")

    async def close(self) -> None:
        self._queue.put_nowait(None)
        self._call.cancel()
        self._pump.cancel()
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class SotwClient(_Client):
    method = ADS + "StreamAggregatedResources"

    def request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
        )
        if self._first:
            req.node.CopyFrom(self.node)
            self._first = False
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        self.send(req)

    def ack(self, response, names: Iterable[str] = ()) -> None:
        self.request(response.type_url, names, response.version_info, response.nonce)

    def nack(self, response, error: str, version: str = "", names: Iterable[str] = ()) -> None:
        self.request(response.type_url, names, version, response.nonce, error)


class DeltaClient(_Client):
    method = ADS + "DeltaAggregatedResources"
    request_type = discovery_pb2.DeltaDiscoveryRequest
    response_type = discovery_pb2.DeltaDiscoveryResponse

    def request(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        nonce: str = "",
        initial: dict[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce,
            initial_resource_versions=initial or {},
        )
        if self._first:
            req.node.CopyFrom(self.node)
            self._first = False
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        self.send(req)

    def ack(self, response) -> None:
        self.request(response.type_url, nonce=response.nonce)

    def nack(self, response, error: str) -> None:
        self.request(response.type_url, nonce=response.nonce, error=error)
