"""Delta protocol semantics, driven by a scriptable client over real gRPC."""

from __future__ import annotations

from tests.protocol_fixtures import group, set_groups
from tests.xds_client import DeltaClient, names_of, node
from xds_server.xds.typeurls import CLUSTER, ENDPOINT


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
