"""State-of-the-World xDS: what to send a client, per type, and when.

Rules, each there because a real client depends on it:

* One response per type in flight: the next waits for the ACK or NACK, so
  changes made meanwhile are coalesced into one response.
* A reply carrying a nonce other than the last one sent is stale and ignored;
  but before anything was sent for a type on this stream, no nonce can be ours:
  a first request that echoes one (a reconnecting client) is a fresh request.
* A NACKed type version is not sent again to that client; the next change is.
* Listeners and clusters are full state; endpoints and routes are requested by
  name and a response carries only the ones the client lacks. A full-state set
  that becomes empty is sent empty (it tells Envoy to delete them all); a name
  that does not exist gets no answer, as SotW has no way to say so.
* Envoy re-sends a request identical to its last ACK when it needs a resource
  again (an EDS cluster re-created by a CDS update): that request is answered
  in full even though nothing changed. And after a CDS response that updates
  clusters, their endpoints are re-sent too, or Envoy leaves them warming.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from xds_server.xds import typeurls
from xds_server.xds.cache import Resource, TypeResources, join_chunks
from xds_server.xds.clients import Nack
from xds_server.xds.stream import CONTROL_PLANE, Stream, next_nonce

__all__ = ["SotwStream", "SotwTypeState"]


@dataclass(slots=True)
class _InFlight:
    nonce: str
    version: str
    sent: dict[str, str]


@dataclass(slots=True)
class SotwTypeState:
    """One client's subscription and knowledge for one type."""

    type_url: str
    names: set[str] = field(default_factory=set)
    wildcard: bool = False
    requested: bool = False
    dirty: bool = True  # something besides the cache changed since the last look
    answered: bool = False  # a response (or a matching version) has settled the first request
    client_version: str = ""  # version_info of the client's first request (reconnect)
    known: dict[str, str] = field(default_factory=dict)  # ACKed name -> version
    in_flight: _InFlight | None = None
    last_nonce: str = ""
    resend: set[str] = field(default_factory=set)
    resend_all: bool = False
    rejected: dict[str, str] = field(default_factory=dict)  # last NACKed name -> version
    rejected_set: dict[str, str] | None = None  # full state: the set last NACKed, if any
    last_names: list[str] | None = None  # resource_names of the last request, as sent

    @property
    def full_state(self) -> bool:
        return self.type_url in typeurls.FULL_STATE

    def subscribe(self, names: list[str]) -> None:
        if self.full_state and (not names or "*" in names):
            self.wildcard = True
            self.names = {n for n in names if n != "*"}
            return
        self.wildcard = False
        self.names = set(names)
        for gone in [n for n in self.known if n not in self.names]:
            del self.known[gone]

    def wanted(self, served: TypeResources) -> dict[str, Resource]:
        if self.wildcard:
            return dict(served.resources)
        return {n: r for n, r in served.resources.items() if n in self.names}

    def to_send(self, served: TypeResources) -> dict[str, Resource] | None:
        """The resources of the next response, or None when the client needs none."""
        if not self.requested or self.in_flight is not None:
            return None
        wanted = self.wanted(served)
        if self.full_state:
            versions = {n: r.version for n, r in wanted.items()}
            if not self.answered and self.client_version == served.version:
                self.known, self.answered = versions, True  # a reconnect: it has all of it
                return None
            if self.answered and versions == self.known and not self.resend_all:
                return None
            return None if versions == self.rejected_set else wanted  # even when empty
        if self.answered and not self.resend_all:
            wanted = {
                n: r
                for n, r in wanted.items()
                if self.known.get(n) != r.version or n in self.resend
            }
        # A rejected resource stays out until it changes; the rest still flow.
        return {n: r for n, r in wanted.items() if self.rejected.get(n) != r.version} or None


class SotwStream(Stream[SotwTypeState, discovery_pb2.DiscoveryRequest]):
    """A State-of-the-World stream (ADS or one type)."""

    protocol = "sotw"

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        self.identify(request.node, request.HasField("node"))
        type_url = self.type_of(request.type_url)
        if type_url is None:
            return
        state = self.states.get(type_url) or self.states.setdefault(
            type_url, SotwTypeState(type_url)
        )
        names = list(request.resource_names)
        same_names = names == state.last_names  # Envoy repeats the same list on every ACK
        nonce = request.response_nonce
        if nonce and state.last_nonce:  # before a response, a nonce cannot be one of ours
            if nonce != state.last_nonce:
                return  # stale: a reply to a response that has since been superseded
            if state.in_flight is not None:
                acked = self._settle(state, request)
                if acked and same_names:
                    return  # a plain ACK: the client has all it needs as of that version
            elif request.HasField("error_detail"):
                return  # a repeated NACK: do not answer it with the same config
            else:
                state.resend_all = True  # a repeated request: the client needs it again
        elif not state.requested:
            state.client_version = request.version_info
        state.requested = state.dirty = True
        if not same_names:
            state.last_names = names
            state.subscribe(names)
            status = self.client.status(type_url)
            status.subscribed = None if state.wildcard else sorted(state.names)

    def _settle(self, state: SotwTypeState, request: discovery_pb2.DiscoveryRequest) -> bool:
        """Record the ACK or NACK of the response in flight; True for an ACK."""
        in_flight, state.in_flight = state.in_flight, None
        assert in_flight is not None
        status = self.client.status(state.type_url)
        if request.HasField("error_detail"):
            # Full state: that exact set. By name: each resource stays out until it changes.
            if state.full_state:
                state.rejected_set = dict(in_flight.sent)
            else:
                state.rejected.update(in_flight.sent)
            status.last_nack = Nack(
                in_flight.version, in_flight.nonce, request.error_detail.message, time.time()
            )
            return False
        if state.full_state:
            state.known = dict(in_flight.sent)
        else:
            state.known.update(in_flight.sent)
        status.acked_version, status.acked_at = in_flight.version, time.time()
        # The response held everything the client lacked at that version; if the cache
        # has moved on since, the version differs and the next wake-up looks again.
        status.synced_version = in_flight.version
        return True

    def respond(self, state: SotwTypeState, served: TypeResources) -> bytes | None:
        resources = state.to_send(served)
        if resources is None:
            return None
        payload = self._response(state, served.version, resources)
        if state.type_url == typeurls.CLUSTER:
            self._resend_endpoints_of_updated(state, resources)
        return payload

    def _response(
        self, state: SotwTypeState, version: str, resources: dict[str, Resource]
    ) -> bytes:
        nonce = next_nonce()
        state.in_flight = _InFlight(nonce, version, {n: r.version for n, r in resources.items()})
        state.last_nonce = nonce
        state.answered = True
        state.resend_all = False
        state.resend.difference_update(resources)
        status = self.client.status(state.type_url)
        status.sent_version, status.sent_at = version, time.time()
        status.responses += 1
        header = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=state.type_url, nonce=nonce, control_plane=CONTROL_PLANE
        )
        return join_chunks((r.sotw_chunk for r in resources.values()), header)

    def _resend_endpoints_of_updated(
        self, clusters: SotwTypeState, sent: dict[str, Resource]
    ) -> None:
        """Envoy re-creates an updated EDS cluster and waits for its endpoints again."""
        endpoints = self.states.get(typeurls.ENDPOINT)
        if endpoints is None:
            return
        updated = [n for n, r in sent.items() if clusters.known.get(n, r.version) != r.version]
        if updated:
            endpoints.resend.update(updated)
            endpoints.dirty = True
