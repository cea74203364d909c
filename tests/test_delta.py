"""Delta protocol semantics, driven by a scriptable client over real gRPC."""

from __future__ import annotations

from tests.protocol_fixtures import group, set_groups
from tests.xds_client import DeltaClient, names_of, node
from xds_server.xds.typeurls import CLUSTER, ENDPOINT, LISTENER


async def test_legacy_wildcard_then_ack_then_silence(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(CLUSTER)
        resp = await c.recv()
        assert names_of(resp) == ["a", "b"] and all(r.version for r in resp.resources)
        c.ack(resp)
        await c.expect_silence()


async def test_subscribe_unsubscribe_and_only_changes(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(ENDPOINT, subscribe=["a"])
        first = await c.recv()
        assert names_of(first) == ["a"]
        c.ack(first)
        c.request(ENDPOINT, subscribe=["b"])
        second = await c.recv()
        assert names_of(second) == ["b"]
        c.ack(second)
        c.request(ENDPOINT, unsubscribe=["a"])
        await c.expect_silence()
        set_groups(xds.cache, {"default": group({"a": (7,), "b": (2,)})})
        await c.expect_silence()  # a is no longer subscribed, b did not change
        set_groups(xds.cache, {"default": group({"a": (7,), "b": (8,)})})
        third = await c.recv()
        assert names_of(third) == ["b"]


async def test_removal_is_signalled(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(CLUSTER)
        c.ack(await c.recv())
        set_groups(xds.cache, {"default": group({"a": (1,)})})
        resp = await c.recv()
        assert list(resp.removed_resources) == ["b"] and not resp.resources


async def test_reconnect_with_initial_versions_sends_only_the_difference(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(CLUSTER)
        first = await c.recv()
        c.ack(first)
    held = {r.name: r.version for r in first.resources}
    async with DeltaClient(xds.target, node()) as c:
        c.request(CLUSTER, initial=held)
        await c.expect_silence()
    set_groups(xds.cache, {"default": group({"b": (2,), "c": (3,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(CLUSTER, initial=held)
        resp = await c.recv()
        assert names_of(resp) == ["c"] and list(resp.removed_resources) == ["a"]


async def test_nacked_resource_is_not_resent_until_it_changes(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(CLUSTER)
        c.ack(await c.recv())
        bad = group({"a": (1,)})
        bad[CLUSTER]["a"].connect_timeout.seconds = 99
        set_groups(xds.cache, {"default": bad})
        resp = await c.recv()
        c.nack(resp, "rejected by envoy")
        await c.expect_silence(0.5)
        status = next(iter(xds.registry)).types[CLUSTER]
        assert status.last_nack.message == "rejected by envoy"
        set_groups(xds.cache, {"default": group({"a": (1,)})})
        await c.expect_silence()  # back to what the client still holds: nothing to send
        fixed = group({"a": (1,)})
        fixed[CLUSTER]["a"].connect_timeout.seconds = 3
        set_groups(xds.cache, {"default": fixed})
        assert names_of(await c.recv()) == ["a"]


async def test_cluster_update_resends_endpoints_without_a_request(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(CLUSTER)
        cds = await c.recv()
        c.request(ENDPOINT, subscribe=["a"])
        eds = await c.recv()
        c.ack(cds)
        c.ack(eds)
        await c.expect_silence()
        changed = group({"a": (1,)})
        changed[CLUSTER]["a"].connect_timeout.seconds = 5
        set_groups(xds.cache, {"default": changed})
        cds2 = await c.recv()
        eds2 = await c.recv()
        assert (cds2.type_url, eds2.type_url) == (CLUSTER, ENDPOINT)
        assert names_of(eds2) == ["a"]


async def test_stale_nonce_still_applies_subscription(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(ENDPOINT, subscribe=["a"])
        first = await c.recv()
        c.ack(first)
        c.request(ENDPOINT, subscribe=["b"], nonce="does-not-exist")
        resp = await c.recv()
        assert names_of(resp) == ["b"]


async def test_subscribing_to_a_name_that_does_not_exist_is_answered_removed(xds):
    """Issue 12: the protocol's "does not exist" for Delta is the name in removed_resources;
    without it Envoy waits for its initial fetch timeout (15 s) before warming on."""
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(ENDPOINT, subscribe=["a", "ghost"])
        first = await c.recv()
        assert names_of(first) == ["a"] and list(first.removed_resources) == ["ghost"]
        c.ack(first)
        await c.expect_silence()  # said once, not on every wake-up
        c.request(ENDPOINT, subscribe=["phantom"])
        second = await c.recv()
        assert not second.resources and list(second.removed_resources) == ["phantom"]
        c.ack(second)
        await c.expect_silence()
        set_groups(xds.cache, {"default": group({"a": (1,), "ghost": (2,)})})
        appeared = await c.recv()  # still subscribed: it is sent once it exists
        assert names_of(appeared) == ["ghost"] and not appeared.removed_resources
        c.ack(appeared)
        await c.expect_silence()


async def test_absent_name_in_the_first_request_and_with_a_wildcard(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(CLUSTER, subscribe=["*", "missing"])
        response = await c.recv()
        assert names_of(response) == ["a"] and list(response.removed_resources) == ["missing"]
        c.ack(response)
        await c.expect_silence()
        c.request(CLUSTER, unsubscribe=["missing"])
        await c.expect_silence()  # an unsubscription alone needs no answer


async def test_first_wildcard_request_for_an_empty_type_is_answered(xds):
    """A group without listeners: Envoy's first LDS request needs an answer, even an empty
    one, or Envoy waits for its initial fetch timeout (15 s) before it is ready."""
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with DeltaClient(xds.target, node()) as c:
        c.request(LISTENER)
        response = await c.recv()
        assert response.type_url == LISTENER and response.nonce
        assert not response.resources and not response.removed_resources
        c.ack(response)
        await c.expect_silence()
