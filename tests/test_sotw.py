"""SotW protocol semantics, driven by a scriptable client over real gRPC."""

from __future__ import annotations

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from tests.protocol_fixtures import group, set_groups
from tests.xds_client import SotwClient, names_of, node
from xds_server.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE


async def test_wildcard_cds_ack_then_silence(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        resp = await c.recv()
        assert resp.type_url == CLUSTER and names_of(resp) == ["a", "b"]
        assert resp.nonce and resp.version_info
        c.ack(resp)
        await c.expect_silence()
        client = next(iter(xds.registry))
        status = client.types[CLUSTER]
        assert status.acked_version == resp.version_info and client.node_id == "test-node"


async def test_eds_by_name_sends_only_changed(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,), "c": (3,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(ENDPOINT, ["a", "b"])
        first = await c.recv()
        assert names_of(first) == ["a", "b"]
        c.ack(first, ["a", "b"])
        await c.expect_silence()
        set_groups(xds.cache, {"default": group({"a": (1,), "b": (9,), "c": (8,)})})
        second = await c.recv()
        assert names_of(second) == ["b"]  # c is not subscribed, a did not change
        assert second.version_info != first.version_info
        c.ack(second, ["a", "b"])
        await c.expect_silence()


async def test_subscribing_to_more_names_sends_just_those(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(ENDPOINT, ["a"])
        first = await c.recv()
        c.ack(first, ["a", "b"])
        second = await c.recv()
        assert names_of(second) == ["b"]


async def test_nacked_version_is_not_resent_until_config_changes(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        good = await c.recv()
        c.ack(good)
        set_groups(xds.cache, {"default": group({"a": (1,), "bad": (2,)})})
        bad = await c.recv()
        c.nack(bad, "cluster bad: invalid thing", version=good.version_info)
        await c.expect_silence(0.5)
        status = next(iter(xds.registry)).types[CLUSTER]
        assert status.last_nack.message == "cluster bad: invalid thing"
        assert status.last_nack.version == bad.version_info
        assert status.acked_version == good.version_info
        # Unrelated wake-ups (another group changing) do not re-send the rejected set.
        set_groups(xds.cache, {"default": group({"a": (1,), "bad": (2,)}), "other": group()})
        await c.expect_silence(0.5)
        set_groups(xds.cache, {"default": group({"a": (1,), "fixed": (2,)})})
        fixed = await c.recv()
        assert names_of(fixed) == ["a", "fixed"]


async def test_stale_nonce_is_ignored(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(ENDPOINT, ["a"])
        first = await c.recv()
        c.ack(first, ["a"])
        set_groups(xds.cache, {"default": group({"a": (5,), "b": (2,)})})
        second = await c.recv()
        # A request that answers the first (superseded) response must change nothing.
        c.request(ENDPOINT, ["a", "b"], first.version_info, first.nonce)
        await c.expect_silence()
        c.ack(second, ["a"])
        await c.expect_silence()


async def test_removed_cluster_disappears_from_full_state(xds):
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        first = await c.recv()
        c.ack(first)
        set_groups(xds.cache, {"default": group({"a": (1,)})})
        second = await c.recv()
        assert names_of(second) == ["a"]


async def test_changes_while_awaiting_ack_are_coalesced(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        first = await c.recv()
        for extra in range(5):
            set_groups(xds.cache, {"default": group({"a": (1,), f"x{extra}": (2,)})})
        await c.expect_silence()  # the first response is not ACKed yet
        c.ack(first)
        latest = await c.recv()
        assert names_of(latest) == ["a", "x4"]
        c.ack(latest)
        await c.expect_silence()


async def test_reconnect_with_current_version_gets_no_cds_but_gets_eds(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        cds = await c.recv()
        c.ack(cds)
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER, version=cds.version_info)
        await c.expect_silence()
        c.request(ENDPOINT, ["a"], version="whatever")
        eds = await c.recv()
        assert names_of(eds) == ["a"]


async def test_request_identical_to_last_ack_is_answered(xds):
    """Envoy's re-request for an EDS cluster re-created by CDS must not stall."""
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(ENDPOINT, ["a"])
        eds = await c.recv()
        c.ack(eds, ["a"])
        await c.expect_silence()
        c.ack(eds, ["a"])  # the very same request again
        again = await c.recv()
        assert names_of(again) == ["a"] and again.version_info == eds.version_info


async def test_cluster_update_resends_its_endpoints(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        cds = await c.recv()
        c.request(ENDPOINT, ["a"])
        eds = await c.recv()
        c.ack(cds)
        c.ack(eds, ["a"])
        await c.expect_silence()
        changed = group({"a": (1,)})
        changed[CLUSTER]["a"].connect_timeout.seconds = 7
        set_groups(xds.cache, {"default": changed})
        cds2 = await c.recv()
        eds2 = await c.recv()
        assert (cds2.type_url, eds2.type_url) == (CLUSTER, ENDPOINT)
        assert names_of(eds2) == ["a"] and eds2.version_info == eds.version_info


async def test_ads_orders_clusters_before_endpoints_and_listeners_before_routes(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)}, {"l": "a"})})
    async with SotwClient(xds.target, node()) as c:
        c.request(ROUTE, ["l"])
        c.request(ENDPOINT, ["a"])
        c.request(LISTENER)
        c.request(CLUSTER)
        got = [await c.recv() for _ in range(4)]
        for r in got:
            c.ack(r, names_of(r) if r.type_url in (ENDPOINT, ROUTE) else ())
        await c.expect_silence()
        set_groups(xds.cache, {"default": group({"a": (2,), "b": (3,)}, {"l": "b"})})
        order = [(await c.recv()).type_url for _ in range(3)]
        assert order == [CLUSTER, ENDPOINT, ROUTE] or order == [CLUSTER, ROUTE, ENDPOINT]
        assert order.index(CLUSTER) < order.index(ENDPOINT)


async def test_node_groups_get_their_own_resources(xds):
    set_groups(
        xds.cache,
        {"default": group({"prod": (1,)}), "canary": group({"canary": (2,)})},
        {"edge-canary": "canary"},
    )
    async with (
        SotwClient(xds.target, node("n1", "edge-prod")) as prod,
        SotwClient(xds.target, node("n2", "edge-canary")) as canary,
    ):
        prod.request(CLUSTER)
        canary.request(CLUSTER)
        assert names_of(await prod.recv()) == ["prod"]
        assert names_of(await canary.recv()) == ["canary"]
    assert {c.group for c in xds.registry} <= {"default", "canary"}


async def test_per_type_service_serves_one_type(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    method = "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters"
    async with SotwClient(xds.target, node(), method=method) as c:
        c.request("")  # per-type streams may leave type_url empty
        resp = await c.recv()
        assert resp.type_url == CLUSTER and names_of(resp) == ["a"]


async def test_first_request_without_node_is_rejected(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    c = SotwClient(xds.target, node())
    c._first = False  # never attach the node
    c.request(CLUSTER)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.recv()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await c.close()
    assert len(xds.registry) == 0


async def test_full_state_type_emptied_by_a_reload_is_sent_empty(xds):
    """Issue 12: the last cluster and listener removed: Envoy must get empty CDS and LDS
    responses (an empty full-state response deletes them all), or it keeps the old ones."""
    set_groups(xds.cache, {"default": group({"a": (1,)}, {"l": "a"})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        c.request(LISTENER)
        for _ in range(2):
            c.ack(await c.recv())
        await c.expect_silence()
        set_groups(xds.cache, {"default": group()})
        got = {r.type_url: r for r in [await c.recv(), await c.recv()]}
        assert set(got) == {CLUSTER, LISTENER}
        assert all(not r.resources and r.version_info and r.nonce for r in got.values())
        for response in got.values():
            c.ack(response)
        await c.expect_silence()
        set_groups(xds.cache, {"default": group({"b": (2,)})})
        assert names_of(await c.recv()) == ["b"]


async def test_first_request_for_an_empty_full_state_type_is_answered(xds):
    """A group without listeners: Envoy's wildcard LDS request still needs an (empty)
    answer, or Envoy waits for the initial fetch timeout before it starts."""
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(LISTENER)
        response = await c.recv()
        assert response.type_url == LISTENER and not response.resources
        c.ack(response)
        await c.expect_silence()


async def test_nacked_empty_set_is_not_resent(xds):
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        good = await c.recv()
        c.ack(good)
        set_groups(xds.cache, {"default": group()})
        empty = await c.recv()
        c.nack(empty, "no clusters? refused", version=good.version_info)
        await c.expect_silence()
        set_groups(xds.cache, {"default": group(), "other": group({"x": (1,)})})
        await c.expect_silence()  # an unrelated change: the rejected empty set stays out


@pytest.mark.parametrize("nonce", ["999999999", "from-another-server"])
async def test_first_request_echoing_an_unknown_nonce_is_answered(xds, nonce):
    """Issue 12: a reconnecting client may echo a nonce of the old stream; nothing was sent
    on this one yet, so it is a fresh request, not a stale reply to be dropped."""
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER, version="old-version", nonce=nonce)
        response = await c.recv()
        assert names_of(response) == ["a"]
        c.request(ENDPOINT, ["a"], version="old-version", nonce=nonce)
        assert names_of(await c.recv()) == ["a"]
        c.ack(response)
        await c.expect_silence()


async def test_reconnect_echoing_a_nonce_at_the_current_version_is_not_resent(xds):
    """The reconnect optimisation still holds: a wildcard client that already has the
    current full-state version gets nothing, whatever nonce it echoes."""
    set_groups(xds.cache, {"default": group({"a": (1,)})})
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER)
        cds = await c.recv()
        c.ack(cds)
    async with SotwClient(xds.target, node()) as c:
        c.request(CLUSTER, version=cds.version_info, nonce=cds.nonce)
        await c.expect_silence()
        set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
        assert names_of(await c.recv()) == ["a", "b"]


async def test_fetch_at_the_current_version_is_answered_ok(xds):
    """Issue 12: "not modified" (REST's 304, a completed poll) is not a failure: the unary
    Fetch answers OK with the current resources and the same version, never UNAVAILABLE
    (a retryable failure) nor an empty set (which would delete every cluster)."""
    set_groups(xds.cache, {"default": group({"a": (1,), "b": (2,)})})
    method = "/envoy.service.cluster.v3.ClusterDiscoveryService/FetchClusters"
    async with grpc.aio.insecure_channel(xds.target) as channel:
        fetch = channel.unary_unary(
            method,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        first = await fetch(discovery_pb2.DiscoveryRequest(node=node()))
        assert names_of(first) == ["a", "b"] and first.version_info
        again = await fetch(
            discovery_pb2.DiscoveryRequest(node=node(), version_info=first.version_info)
        )
        assert again.version_info == first.version_info and names_of(again) == ["a", "b"]
