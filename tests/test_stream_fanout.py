"""Per-stream work of a fan-out, cut without changing what is sent.

When a stream's writer is woken: a plain ACK (same nonce answered, same subscription, at
the cache's current version) leaves nothing to send and wakes nobody; a changed
subscription, a new version, or a change made while a response was in flight still
gets its response. Real server, real gRPC; the writer's looks are counted on the live
stream object. And a selection shared by streams joins its resources' chunks once.
"""

from __future__ import annotations

from collections.abc import Callable

from envoy.service.discovery.v3 import discovery_pb2

from tests.protocol_fixtures import cluster, group, set_groups
from tests.xds_client import DeltaClient, SotwClient, names_of, node
from xds_server.xds.cache import ResourceCache, join_chunks
from xds_server.xds.stream import Stream
from xds_server.xds.subscriptions import subscription
from xds_server.xds.typeurls import CLUSTER, ENDPOINT


def count_looks(cache: ResourceCache) -> list[int]:
    """Count the writer's looks at what to send on the only open stream."""
    (stream,) = cache.subscribers
    assert isinstance(stream, Stream)
    looks = [0]
    original: Callable[[], list[bytes]] = stream.responses

    def counting() -> list[bytes]:
        looks[0] += 1
        return original()

    stream.responses = counting  # type: ignore[method-assign]
    return looks


def acked(xds, type_url: str) -> str:
    (client,) = xds.registry
    return client.types[type_url].acked_version


async def test_sotw_plain_ack_wakes_nothing_but_changes_are_sent(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(ENDPOINT, ["a"])
        first = await c.recv()
        looks = count_looks(xds.cache)
        c.ack(first, ["a"])
        await c.expect_silence()
        assert acked(xds, ENDPOINT) == first.version_info  # the ACK was taken in
        assert looks[0] == 0
        set_groups(xds.cache, {"default": group({"a": (5,), "b": (2,)})})
        second = await c.recv()  # a new version
        assert names_of(second) == ["a"] and second.version_info != first.version_info
        c.ack(second, ["a", "b"])  # an ACK that also subscribes to more
        third = await c.recv()
        assert names_of(third) == ["b"]
        before = looks[0]
        c.ack(third, ["a", "b"])
        await c.expect_silence()
        assert acked(xds, ENDPOINT) == third.version_info and looks[0] == before


async def test_delta_plain_ack_wakes_nothing_but_changes_are_sent(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(ENDPOINT, subscribe=["a"])
        first = await c.recv()
        looks = count_looks(xds.cache)
        c.ack(first)
        await c.expect_silence()
        assert acked(xds, ENDPOINT) == first.system_version_info
        assert looks[0] == 0
        set_groups(xds.cache, {"default": group({"a": (5,), "b": (2,)})})
        second = await c.recv()
        assert names_of(second) == ["a"]
        c.ack(second)
        await c.expect_silence()
        before = looks[0]
        c.request(ENDPOINT, subscribe=["b"])  # a changed subscription
        third = await c.recv()
        assert names_of(third) == ["b"] and looks[0] > before


async def test_sotw_change_while_in_flight_is_sent_on_the_ack(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        first = await c.recv()
        set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
        await c.expect_silence()  # one response in flight at a time
        c.ack(first)  # a plain ACK, but of a version the cache has moved on from
        latest = await c.recv()
        assert names_of(latest) == ["a", "b"]


async def test_delta_change_while_in_flight_is_sent_on_the_ack(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(ENDPOINT, subscribe=["a", "b"])
        first = await c.recv()
        set_groups(xds.cache, {"default": group({"a": (1,), "b": (3,)})})
        await c.expect_silence()
        c.ack(first)
        latest = await c.recv()
        assert names_of(latest) == ["b"]


async def test_sotw_endpoints_resend_marked_in_flight_is_sent_on_their_ack(xds):
    """A CDS update while EDS is in flight marks the endpoints for a resend; the EDS ACK,
    plain as it is, must still wake the writer to send them."""
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        clusters = await c.recv()
        c.ack(clusters)
        c.request(ENDPOINT, ["a"])
        endpoints = await c.recv()
        # The cluster changes (a new version), its endpoints do not: EDS is still in flight.
        changed = group({"a": (1,)})
        changed[CLUSTER]["a"] = cluster("a", timeout_s=5)
        set_groups(xds.cache, {"default": changed})
        updated = await c.recv()
        assert updated.type_url == CLUSTER
        c.ack(updated)
        await c.expect_silence()
        c.ack(endpoints, ["a"])
        resent = await c.recv()
        assert resent.type_url == ENDPOINT and names_of(resent) == ["a"]


def test_selection_joins_chunks_once_it_is_shared():
    cache = ResourceCache()
    set_groups(cache, {"default": group({"a": (1,), "b": (2,), "c": (3,)})})
    served = cache.group_for("any").of_type(ENDPOINT)
    selection = subscription(["c", "a"]).select(served)
    resources = selection.resources.values()
    sotw = b"".join(r.sotw_chunk for r in resources)
    first = selection.chunks(delta=False)
    second = selection.chunks(delta=False)  # a second stream: now kept for the rest
    assert first == second == sotw and second is not first  # the first join was not kept
    assert selection.chunks(delta=False) is second
    delta = selection.chunks(delta=True)  # shared already: kept from the first join
    assert delta == b"".join(r.delta_chunk for r in resources)
    assert selection.chunks(delta=True) is delta
    header = discovery_pb2.DiscoveryResponse(version_info=served.version, nonce="1")
    response = discovery_pb2.DiscoveryResponse.FromString(
        join_chunks((selection.chunks(False),), header)
    )
    assert names_of(response) == ["a", "c"] and response.nonce == "1"
