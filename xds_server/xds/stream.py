"""What SotW and Delta streams share: identifying the node, waking up, the serve loop.

A stream is a small state machine fed by two things: requests from its client
and wake-ups from the cache. Both only mark it dirty; one writer loop then asks
the protocol logic what to send. So however many changes pile up while a write
is in flight, they leave at most one response per type behind it (coalesced).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Generic, Protocol, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2

from xds_server.tls import identity_allowed
from xds_server.xds import typeurls
from xds_server.xds.cache import (
    EMPTY_GROUP,
    GroupResources,
    ResourceCache,
    Subscriber,
    TypeResources,
)
from xds_server.xds.clients import Client, ClientRegistry

__all__ = [
    "CONTROL_PLANE",
    "Context",
    "ProtocolError",
    "Request",
    "State",
    "Stream",
    "TypeState",
    "next_nonce",
    "serve",
]

log = logging.getLogger(__name__)

#: Names this server in every response (Envoy shows it in its config dump).
CONTROL_PLANE = base_pb2.ControlPlane(identifier="xds-server")
_nonces = itertools.count(1)


def next_nonce() -> str:
    """Nonces are unique per process, so a reply to an old response is always told apart."""
    return str(next(_nonces))


class TypeState(Protocol):
    """What the shared serve loop reads of a protocol's per-type state."""

    requested: bool  # the client has asked for this type on this stream
    dirty: bool  # something besides the cache changed since the last look

    @property
    def in_flight(self) -> object | None: ...


State = TypeVar("State", bound=TypeState)
Request = TypeVar("Request")


class ProtocolError(Exception):
    """The client broke the protocol or a limit; the stream ends with `code`."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "protocol"

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if reason:
            self.reason = reason


class Stream(Subscriber, Generic[State, Request]):
    """State of one xDS stream, independent of the wire; typed by the protocol's per-type
    state and request message (SotW and Delta)."""

    protocol = ""

    def __init__(
        self,
        cache: ResourceCache,
        registry: ClientRegistry,
        service: str,
        fixed_type: str | None = None,
        peer: str = "",
        identities: tuple[str, ...] | None = None,
    ) -> None:
        self.cache = cache
        self.fixed_type = fixed_type
        self.client: Client = registry.open(self.protocol, service, peer, identities)
        self.wakeup = asyncio.Event()
        self.ending = ""  # set by end(): the serve loop closes the stream with it
        self.states: dict[str, State] = {}  # type URL -> the protocol's per-type state
        self._registry = registry
        self._warned_types: set[str] = set()

    def notify(self) -> None:
        self.wakeup.set()

    def end(self, message: str) -> None:
        """Close the stream with UNAVAILABLE (the client reconnects, to another replica)."""
        self.ending = message
        self.wakeup.set()

    def refuse(self, error: ProtocolError) -> None:
        """Log and record why the stream is being ended."""
        log.warning(
            "stream %s of node %r (peer %s, identities %s): %s",
            self.client.stream_id,
            self.client.node_id,
            self.client.peer,
            self.client.identities,
            error,
        )
        self._registry.refuse(self.client, error.reason, str(error))

    def close(self) -> None:
        self._registry.close(self.client)

    @property
    def group(self) -> GroupResources | None:
        """The node's group as of now: a reload may move a node.cluster to another group."""
        if not self.client.node_id:
            return None
        group = self.cache.group_for(self.client.node_cluster)
        if group is EMPTY_GROUP:
            return None
        identities = self.client.identities
        if identities is not None and not identity_allowed(group.identities, identities):
            raise ProtocolError(
                f"node.cluster {self.client.node_cluster!r} selects node group {group.name!r}, "
                f"which certificate identities {list(identities)} may not claim",
                grpc.StatusCode.PERMISSION_DENIED,
                "identity",
            )
        self.client.group = group.name
        return group

    def types_in_order(self) -> Sequence[str]:
        return (self.fixed_type,) if self.fixed_type else typeurls.ORDER

    def identify(self, node: base_pb2.Node, has_node: bool) -> None:
        if has_node and not self.client.node_id:
            if not node.id:
                raise ProtocolError("node.id is empty: set node.id in the client's bootstrap")
            self.client.node_id = node.id
            self.client.node_cluster = node.cluster
            self.client.user_agent = f"{node.user_agent_name} {node.user_agent_version}".strip()
        elif not self.client.node_id:
            raise ProtocolError("the first request on a stream must carry the node")

    def type_of(self, requested: str) -> str | None:
        """The request's type URL, or None for a type this server does not serve."""
        type_url = requested or (self.fixed_type or "")
        if self.fixed_type and type_url != self.fixed_type:
            raise ProtocolError(f"type_url {type_url!r} on a {self.fixed_type} stream")
        if type_url not in typeurls.ORDER:
            if type_url not in self._warned_types:
                self._warned_types.add(type_url)
                log.info("node %s asked for unserved type %r", self.client.node_id, type_url)
            return None
        return type_url

    def on_request(self, request: Request) -> bool:  # pragma: no cover - interface
        """Take in one request; True when the writer must look at what to send."""
        raise NotImplementedError

    def still_due(self, state: State, type_url: str) -> bool:
        """After an ACK, whether the type needs a look: a plain ACK at the cache's current
        version leaves nothing to send, and waking the writer to find that out was a second
        pass per stream for every response of a fan-out. Something marked dirty while the
        response was in flight (a resend), or a cache change made meanwhile (that wake-up
        skipped the busy type), still wakes it."""
        if state.dirty:
            return True
        served = self.cache.group_for(self.client.node_cluster).of_type(type_url)
        return self.client.status(type_url).synced_version != served.version

    def respond(self, state: State, served: TypeResources) -> bytes | None:  # pragma: no cover
        """The next response for one type, or None when this client needs nothing now."""
        raise NotImplementedError

    def responses(self) -> list[bytes]:
        """What to write now, in ADS order.

        A type with a response in flight waits for its ACK or NACK (one at a time). A type
        found with nothing to send is synced at the cache's version; until a request or a
        resend marks it dirty again, a wake-up at that same version skips it without
        looking at its resources (the common case when a change touches one type of many
        streams).
        """
        group = self.group
        if group is None:
            return []
        out = []
        for type_url in self.types_in_order():
            state = self.states.get(type_url)
            if state is None or not state.requested or state.in_flight is not None:
                continue  # in flight: its ACK or NACK wakes it, `dirty` kept for then
            served = group.of_type(type_url)
            status = self.client.status(type_url)
            if not state.dirty and status.synced_version == served.version:
                continue
            state.dirty = False
            payload = self.respond(state, served)
            if payload is not None:
                out.append(payload)
            else:
                status.synced_version = served.version
        return out


class Context(Protocol):
    async def write(self, message: bytes) -> None: ...
    async def abort(self, code: grpc.StatusCode, details: str) -> None: ...


async def serve(
    stream: Stream[State, Request], requests: AsyncIterator[Request], context: Context
) -> None:
    """Run one stream until the client goes away; never raises for client behaviour."""
    failure: list[ProtocolError] = []

    async def read() -> None:
        try:
            async for request in requests:
                if stream.on_request(request):
                    stream.notify()
        except ProtocolError as err:
            failure.append(err)
        except grpc.RpcError as err:
            log.debug("stream %s: read ended: %s", stream.client.stream_id, err)
        finally:
            stream.notify()

    stream.cache.subscribe(stream)
    reader = asyncio.create_task(read())
    try:
        while True:
            await stream.wakeup.wait()
            stream.wakeup.clear()
            if not failure:
                try:
                    pending = stream.responses()
                except ProtocolError as err:
                    failure.append(err)
            if failure:
                stream.refuse(failure[0])
                await context.abort(failure[0].code, str(failure[0]))
                return
            if stream.ending:
                await context.abort(grpc.StatusCode.UNAVAILABLE, stream.ending)
                return
            while pending:  # hold no reference to written bytes while idle (memory per stream)
                await context.write(pending.pop(0))
            if reader.done():
                return
    finally:
        reader.cancel()
        stream.cache.unsubscribe(stream)
        stream.close()
