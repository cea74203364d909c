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
from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from xds_server.xds import typeurls
from xds_server.xds.cache import Resource, TypeResources, join_chunks
from xds_server.xds.clients import Nack
from xds_server.xds.stream import CONTROL_PLANE, Stream, next_nonce
from xds_server.xds.subscriptions import Selection, Subscription, subscription

__all__ = ["SotwStream", "SotwTypeState"]

_WILDCARD = frozenset(("*",))


@dataclass(slots=True)
class _InFlight:
    nonce: str
    version: str
    sent: Mapping[str, str]  # may be shared (TypeResources.versions): never changed


@dataclass(slots=True)
class SotwTypeState:
    """One client's subscription and knowledge for one type."""

    type_url: str
    names: frozenset[str] = frozenset()  # shared with other streams: replaced, never changed
    wildcard: bool = False
    requested: bool = False
    dirty: bool = True  # something besides the cache changed since the last look
    answered: bool = False  # a response (or a matching version) has settled the first request
    client_version: str = ""  # version_info of the client's first request (reconnect)
    #: ACKed name -> version. Full state: may be shared (TypeResources.versions), so it is
    #: replaced, never changed; by name: this stream's own, updated in place.
    known: Mapping[str, str] = field(default_factory=dict)
    in_flight: _InFlight | None = None
    last_nonce: str = ""
    resend: set[str] = field(default_factory=set)
    resend_all: bool = False
    rejected: dict[str, str] = field(default_factory=dict)  # last NACKed name -> version
    rejected_set: dict[str, str] | None = None  # full state: the set last NACKed, if any
    #: resource_names of the last request, as sent (shared with other streams)
    subscription: Subscription | None = None

    @property
    def full_state(self) -> bool:
        return self.type_url in typeurls.FULL_STATE

    def subscribe(self, names: Subscription) -> None:
        self.subscription = names
        if self.full_state and (not names.listed or "*" in names.names):
            self.wildcard = True
            self.names = names.names - _WILDCARD if "*" in names.names else names.names
            return
        self.wildcard = False
        self.names = names.names
        if any(n not in self.names for n in self.known):
            self.known = {n: v for n, v in self.known.items() if n in self.names}

    def selection(self, served: TypeResources) -> Selection | None:
        """What a by-name subscription selects, shared with every stream that names the same;
        None for the whole set (wildcard) or before any request."""
        if self.wildcard or self.subscription is None:
            return None
        return self.subscription.select(served)

    def select(self, served: TypeResources) -> tuple[Mapping[str, Resource], Mapping[str, str]]:
        """The resources this client wants and their versions, shared with every stream that
        wants the same (never change them)."""
        if self.wildcard:
            return served.resources, served.versions
        selection = self.selection(served)
        if selection is None:
            return {}, {}
        return selection.resources, selection.versions

    def wanted(self, served: TypeResources) -> Mapping[str, Resource]:
        return self.select(served)[0]

    def versions_of(
        self, served: TypeResources, resources: Mapping[str, Resource]
    ) -> Mapping[str, str]:
        wanted, versions = self.select(served)
        return versions if resources is wanted else {n: r.version for n, r in resources.items()}

    def to_send(self, served: TypeResources) -> Mapping[str, Resource] | None:
        """The resources of the next response, or None when the client needs none."""
        if not self.requested or self.in_flight is not None:
            return None
        wanted, versions = self.select(served)
        if self.full_state:
            if not self.answered and self.client_version == served.version:
                self.known, self.answered = versions, True  # a reconnect: it has all of it
                return None
            same = versions is self.known or versions == self.known
            if self.answered and same and not self.resend_all:
                return None
            return None if versions == self.rejected_set else wanted  # even when empty
        if self.answered and not self.resend_all:
            # What the client lacks (a version it does not hold) or must be sent again.
            held = self.known.get
            lacking = {n for n, v in versions.items() if held(n) != v}
            if self.resend:
                lacking.update(self.resend.intersection(versions))
            if len(lacking) < len(wanted):  # else all of it: the shared selection
                wanted = (
                    {n: wanted[n] for n in lacking}  # one (a weight change): no order to keep
                    if len(lacking) < 2
                    else {n: r for n, r in wanted.items() if n in lacking}
                )
        if self.rejected:  # a rejected resource stays out until it changes; the rest flow
            wanted = {n: r for n, r in wanted.items() if self.rejected.get(n) != r.version}
        return wanted or None


class SotwStream(Stream[SotwTypeState, discovery_pb2.DiscoveryRequest]):
    """A State-of-the-World stream (ADS or one type)."""

    protocol = "sotw"

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> bool:
        self.identify(request.node, request.HasField("node"))
        type_url = self.type_of(request.type_url)
        if type_url is None:
            return True
        state = self.states.get(type_url) or self.states.setdefault(
            type_url, SotwTypeState(type_url)
        )
        names = tuple(request.resource_names)
        last = state.subscription  # Envoy repeats the same list on every ACK
        same_names = last is not None and names == last.listed
        nonce = request.response_nonce
        if nonce and state.last_nonce:  # before a response, a nonce cannot be one of ours
            if nonce != state.last_nonce:
                return True  # stale: a reply to a response that has since been superseded
            if state.in_flight is not None:
                acked = self._settle(state, request)
                if acked and same_names:
                    # A plain ACK: the client has all it needs as of that version.
                    return self.still_due(state, type_url)
            elif request.HasField("error_detail"):
                return True  # a repeated NACK: do not answer it with the same config
            else:
                state.resend_all = True  # a repeated request: the client needs it again
        elif not state.requested:
            state.client_version = request.version_info
        state.requested = state.dirty = True
        if not same_names:
            shared = subscription(names)
            state.subscribe(shared)
            status = self.client.status(type_url)
            status.subscribed = None if state.wildcard else shared.ordered
        return True

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
            state.known = in_flight.sent
        else:
            assert isinstance(state.known, dict)  # by name, it is this stream's own
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
        payload = self._response(state, served, resources)
        if state.type_url == typeurls.CLUSTER:
            self._resend_endpoints_of_updated(state, resources)
        return payload

    def _response(
        self, state: SotwTypeState, served: TypeResources, resources: Mapping[str, Resource]
    ) -> bytes:
        nonce = next_nonce()
        version = served.version
        state.in_flight = _InFlight(nonce, version, state.versions_of(served, resources))
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
        selection = state.selection(served)
        if selection is not None and resources is selection.resources:
            return join_chunks((selection.chunks(delta=False),), header)
        return join_chunks((r.sotw_chunk for r in resources.values()), header)

    def _resend_endpoints_of_updated(
        self, clusters: SotwTypeState, sent: Mapping[str, Resource]
    ) -> None:
        """Envoy re-creates an updated EDS cluster and waits for its endpoints again."""
        endpoints = self.states.get(typeurls.ENDPOINT)
        if endpoints is None:
            return
        updated = [n for n, r in sent.items() if clusters.known.get(n, r.version) != r.version]
        if updated:
            endpoints.resend.update(updated)
            endpoints.dirty = True
