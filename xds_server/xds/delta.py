"""Incremental (Delta) xDS: per-resource versions, subscribe/unsubscribe, removals.

The server tracks, per client and type, which version of each resource the
client holds; a response carries exactly the resources whose version differs
and the names the client holds that no longer exist. On reconnect the client's
``initial_resource_versions`` seed that record, so nothing it already has is
sent again (versions are content hashes, stable across server restarts).

A subscribed name that does not exist is answered in ``removed_resources`` (the
protocol's "does not exist"), so the client need not wait for its initial fetch
timeout (Envoy warms an EDS cluster for 15 s otherwise); if it appears later it
is sent like any update.

Subscription changes in a request always apply, even when its nonce is stale:
unlike SotW, a delta request that is dropped is lost for good. A NACKed
resource version is not re-sent until it changes; after a CDS response that
updates clusters their endpoints are re-sent, because Envoy does not ask again.
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

__all__ = ["DeltaStream", "DeltaTypeState"]


@dataclass(slots=True)
class _InFlight:
    nonce: str
    version: str
    previous: dict[str, str | None]  # what the client held before, to undo on NACK
    sent: Mapping[str, str]  # may be shared (a selection's versions): never changed


@dataclass(slots=True)
class DeltaTypeState:
    """One client's subscription and holdings for one type."""

    type_url: str
    #: The names subscribed to (sorted), shared with other streams: replaced, never changed.
    subscription: Subscription = field(default_factory=lambda: subscription(()))
    wildcard: bool = False
    requested: bool = False
    dirty: bool = True  # something besides the cache changed since the last look
    held: dict[str, str] = field(default_factory=dict)  # name -> version the client has
    in_flight: _InFlight | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    resend: set[str] = field(default_factory=set)
    unanswered: set[str] = field(default_factory=set)  # subscribed, not yet looked up
    first_due: bool = False  # the first request is answered even when there is nothing

    def apply(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        if not self.requested:
            self.requested = True
            self.held.update(request.initial_resource_versions)
            # An empty wildcard type (a group without listeners) still gets an answer, or
            # Envoy waits for its initial fetch timeout; a reconnect that holds the current
            # versions (initial_resource_versions) needs none.
            self.first_due = not request.initial_resource_versions
            if self.type_url in typeurls.FULL_STATE and not request.resource_names_subscribe:
                self.wildcard = True  # legacy wildcard: first request subscribes to nothing
        if request.resource_names_subscribe or request.resource_names_unsubscribe:
            self._change_subscription(request)

    def _change_subscription(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        names = set(self.subscription.names)
        for name in request.resource_names_subscribe:
            if name == "*":
                self.wildcard = True
            else:
                names.add(name)
                self.unanswered.add(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                self.wildcard = False
            else:
                names.discard(name)
                self.unanswered.discard(name)
                self.held.pop(name, None)
        if names != self.subscription.names:
            self.subscription = subscription(sorted(names))

    def selection(self, served: TypeResources) -> Selection | None:
        """What the subscribed names select, shared with every stream subscribed to the same;
        None for a wildcard (the whole set)."""
        return None if self.wildcard else self.subscription.select(served)

    def to_send(self, served: TypeResources) -> tuple[Mapping[str, Resource], list[str]] | None:
        """(updated resources, removed names) for the next response, or None. When the
        client lacks all it has chosen, the updated resources are that shared mapping."""
        if not self.requested or self.in_flight is not None:
            return None
        selection = self.selection(served)
        if selection is None:
            chosen, versions = served.resources, served.versions
        else:
            chosen, versions = selection.resources, selection.versions
        # What the client lacks (a version it does not hold) or must be sent again, less
        # what it rejected at that same version.
        held = self.held.get
        lacking = {n for n, v in versions.items() if held(n) != v}
        if self.resend:
            lacking.update(self.resend.intersection(chosen))
        if self.rejected:
            lacking = {n for n in lacking if self.rejected.get(n) != versions[n]}
        updated: Mapping[str, Resource]
        if len(lacking) == len(chosen):
            updated = chosen  # all of it (a first response, every pool edited): shared
        elif len(lacking) < 2:
            updated = {n: chosen[n] for n in lacking}  # one (a weight change): no order to keep
        else:
            updated = {n: r for n, r in chosen.items() if n in lacking}
        gone = self.held.keys() - chosen.keys()
        # Newly subscribed names that do not exist: say so. (Names that do exist are in
        # `updated` unless the client already holds that version.)
        gone.update(n for n in self.unanswered if n not in served.resources)
        self.unanswered.clear()
        removed = sorted(gone)
        first_due, self.first_due = self.first_due, False
        if not updated and not removed and not first_due:
            return None
        return updated, removed


class DeltaStream(Stream[DeltaTypeState, discovery_pb2.DeltaDiscoveryRequest]):
    """A Delta stream (ADS or one type)."""

    protocol = "delta"

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> bool:
        self.identify(request.node, request.HasField("node"))
        type_url = self.type_of(request.type_url)
        if type_url is None:
            return True
        state = self.states.get(type_url) or self.states.setdefault(
            type_url, DeltaTypeState(type_url)
        )
        changes_subscription = bool(
            not state.requested
            or request.resource_names_subscribe
            or request.resource_names_unsubscribe
        )
        state.apply(request)
        if changes_subscription:
            status = self.client.status(type_url)
            status.subscribed = None if state.wildcard else state.subscription.ordered
        acked = False
        if state.in_flight is not None and request.response_nonce == state.in_flight.nonce:
            acked = self._settle(state, request)
        if changes_subscription or not acked:
            state.dirty = True
            return True
        return self.still_due(state, type_url)  # a plain ACK

    def _settle(self, state: DeltaTypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> bool:
        """Record the ACK or NACK of the response in flight; True for an ACK."""
        in_flight, state.in_flight = state.in_flight, None
        assert in_flight is not None
        status = self.client.status(state.type_url)
        if request.HasField("error_detail"):
            for name, version in in_flight.previous.items():
                if version is None:
                    state.held.pop(name, None)
                else:
                    state.held[name] = version
            state.rejected.update(in_flight.sent)
            status.last_nack = Nack(
                in_flight.version, in_flight.nonce, request.error_detail.message, time.time()
            )
            return False
        status.acked_version, status.acked_at = in_flight.version, time.time()
        status.synced_version = in_flight.version  # it held all the client lacked then
        return True

    def respond(self, state: DeltaTypeState, served: TypeResources) -> bytes | None:
        change = state.to_send(served)
        if change is None:
            return None
        updated, removed = change
        if state.type_url == typeurls.CLUSTER:
            self._resend_endpoints_of_updated(state, updated)
        return self._response(state, served, updated, removed)

    def _response(
        self,
        state: DeltaTypeState,
        served: TypeResources,
        updated: Mapping[str, Resource],
        removed: list[str],
    ) -> bytes:
        nonce = next_nonce()
        version = served.version
        previous = {n: state.held.get(n) for n in (*updated, *removed)}
        selection = state.selection(served)
        whole = served if selection is None else selection
        sent: Mapping[str, str]
        if updated is whole.resources:  # all of it: its versions and joined chunks, shared
            sent = whole.versions
        else:
            sent = {n: r.version for n, r in updated.items()}
        state.in_flight = _InFlight(nonce, version, previous, sent)
        state.held.update(sent)
        for name in removed:
            state.held.pop(name, None)
        state.resend.difference_update(updated)
        status = self.client.status(state.type_url)
        status.sent_version, status.sent_at = version, time.time()
        status.responses += 1
        header = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=state.type_url,
            nonce=nonce,
            removed_resources=removed,
            control_plane=CONTROL_PLANE,
        )
        if selection is not None and updated is selection.resources:
            return join_chunks((selection.chunks(delta=True),), header)
        return join_chunks((r.delta_chunk for r in updated.values()), header)

    def _resend_endpoints_of_updated(
        self, clusters: DeltaTypeState, updated: Mapping[str, Resource]
    ) -> None:
        """Envoy re-creates an updated EDS cluster and, in Delta, never asks for its endpoints."""
        endpoints = self.states.get(typeurls.ENDPOINT)
        known = [n for n in updated if clusters.held.get(n) is not None]
        if endpoints is not None and known:
            endpoints.resend.update(known)
            endpoints.dirty = True
