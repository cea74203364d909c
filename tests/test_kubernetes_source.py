"""Endpoints from Kubernetes, against a local API server speaking the real list/watch protocol.

xds_lab.kube_api serves EndpointSlices, Pods and InferencePools as the API server does
(lists with a resourceVersion, newline-delimited watch events, bookmarks, 410 Gone as an
ERROR event or an HTTP status, a merge-patched /status); these tests drive it: events,
a bookmark, a 410 with a deletion in the gap, a dropped connection, a slow answer, the
API server going away and coming back. Then the whole control plane: the snapshot
file's Kubernetes pools filled in, the overlay's drains over them, /healthz, /metrics,
the InferencePool status written once, and HTTP/2 for an h2c InferencePool.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.admin_rig import TOKEN as ADMIN_TOKEN
from tests.admin_rig import Admin, scrape, value
from tests.kube_rig import FAST, NS, TOKEN, options, until, write_kubeconfig
from xds_lab.certs import Authority
from xds_lab.envoy_rig import local_settings
from xds_lab.kube_api import FakeKubernetes, endpoint_slice, inference_pool, pod
from xds_server.app import ControlPlane
from xds_server.config.reader import parse_config
from xds_server.config.types import Endpoint, SnapshotError
from xds_server.kubernetes.client import (
    ApiClient,
    ApiError,
    KubernetesConfigError,
    discover,
    from_kubeconfig,
)
from xds_server.kubernetes.translate import (
    ENDPOINT_SLICES,
    PoolSpec,
    pod_endpoints,
    slice_endpoints,
)
from xds_server.kubernetes.watch import Collection
from xds_server.xds import typeurls

SELECTOR = "kubernetes.io/service-name=vllm"


def slice_(name: str, *endpoints: dict[str, Any], port: int = 8000) -> dict[str, Any]:
    return endpoint_slice(name, NS, "vllm", endpoints, [{"name": "http", "port": port}])


# --------------------------------------------------------------------------- the file


def problems(pool: dict[str, Any]) -> list[str]:
    doc = {"listeners": [], "pools": [{"name": "p", **pool}]}
    try:
        parse_config(yaml.safe_dump(doc), "f.yaml")
    except SnapshotError as err:
        return [f"{p.path}: {p.message}" for p in err.problems]
    return []


def test_the_file_checks_the_shape_of_kubernetes_pools():
    assert (
        problems({"kubernetes": {"service": "vllm", "namespace": "serving", "port": "http"}}) == []
    )
    assert problems({"kubernetes": {"service": "vllm", "namespace": "serving", "port": 8000}}) == []
    assert problems({"kubernetes": {"inferencePool": "llama.v1", "namespace": "serving"}}) == []
    both = problems({"kubernetes": {"service": "a", "namespace": "n", "port": 1}, "endpoints": []})
    assert both == [
        "pools[0].endpoints: a pool takes its endpoints from 'kubernetes' or from "
        "'endpoints', not both"
    ]
    assert (
        "exactly one of 'service'"
        in problems({"kubernetes": {"service": "a", "inferencePool": "b", "namespace": "n"}})[0]
    )
    assert "exactly one" in problems({"kubernetes": {"namespace": "n"}})[0]
    assert problems({"kubernetes": {"service": "Vllm", "namespace": "n", "port": 1}}) == [
        "pools[0].kubernetes.service: invalid Service name (a DNS-1035 label) 'Vllm'"
    ]
    assert (
        "namespace" in problems({"kubernetes": {"service": "a", "namespace": "N_s", "port": 1}})[0]
    )
    assert "port" in problems({"kubernetes": {"service": "a", "namespace": "n", "port": 0}})[0]
    assert "required" in problems({"kubernetes": {"service": "a", "namespace": "n"}})[0]
    assert (
        "targetPorts"
        in problems({"kubernetes": {"inferencePool": "a", "namespace": "n", "port": 80}})[0]
    )
    assert (
        "unknown key 'labels'"
        in problems({"kubernetes": {"inferencePool": "a", "namespace": "n", "labels": {}}})[0]
    )


# --------------------------------------------------------------------------- finding the cluster


def test_in_cluster_first_then_kubeconfig_as_kubectl(tmp_path: Path):
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text("tok\n")
    (account / "ca.crt").write_text("pem")
    (account / "namespace").write_text("serving\n")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    access = discover(environ=env, service_account=account, home=tmp_path)
    assert access.server == "https://[fd00::1]:443"
    assert access.token_file == account / "token" and access.ca_file == account / "ca.crt"
    assert access.namespace == "serving"

    # Outside a pod: $KUBECONFIG (a list, merged: the first file to name a thing wins) ...
    first, second = tmp_path / "a", tmp_path / "b"
    (tmp_path / "certs").mkdir()
    first.write_text(yaml.safe_dump({"current-context": "one", "contexts": []}))
    second.write_text(
        yaml.safe_dump(
            {
                "current-context": "two",
                "contexts": [{"name": "one", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://k:6443/",
                            "certificate-authority": "certs/ca.pem",
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"tokenFile": "certs/token"}}],
            }
        )
    )
    env = {"KUBECONFIG": f"{first}:{tmp_path / 'missing'}:{second}"}
    access = discover(environ=env, service_account=tmp_path / "none", home=tmp_path)
    assert access.server == "https://k:6443"
    assert access.ca_file == tmp_path / "certs" / "ca.pem"  # relative to its kubeconfig
    assert access.token_file == tmp_path / "certs" / "token"

    # ... then ~/.kube/config; and nothing at all is an error naming both.
    with pytest.raises(KubernetesConfigError, match="no cluster found"):
        discover(environ={}, service_account=tmp_path / "none", home=tmp_path)
    (tmp_path / ".kube").mkdir()
    alone = yaml.safe_load(second.read_text()) | {"current-context": "one"}
    (tmp_path / ".kube" / "config").write_text(yaml.safe_dump(alone))
    assert discover(environ={}, service_account=tmp_path / "none", home=tmp_path).server


async def test_in_cluster_over_https_with_the_service_accounts_token_and_ca(tmp_path: Path):
    """The pod's view: HTTPS to KUBERNETES_SERVICE_HOST:PORT, the CA and the token from the
    service account's folder; a token the kubelet rotated is read again after a 401."""
    authority = Authority(tmp_path / "pki")
    issued = authority.server("kube-apiserver")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)
    server = FakeKubernetes(token="first-token", ssl=context)
    await server.start()
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text("first-token\n")
    (account / "ca.crt").write_bytes(authority.cert.read_bytes())
    (account / "namespace").write_text(NS)
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}
    client = ApiClient(discover(environ=env, service_account=account))
    await client.start()
    try:
        server.put(slice_("vllm-1", {"ip": "10.0.0.1"}))
        body = await client.get(ENDPOINT_SLICES.path(NS), {"labelSelector": SELECTOR})
        assert [item["metadata"]["name"] for item in body["items"]] == ["vllm-1"]
        server.token = "second-token"  # rotated
        (account / "token").write_text("second-token\n")
        with pytest.raises(ApiError) as refused:
            await client.get(ENDPOINT_SLICES.path(NS), {})
        assert refused.value.code == 401
        assert (await client.get(ENDPOINT_SLICES.path(NS), {}))["items"]  # read again
    finally:
        await client.close()
        await server.stop()


# --------------------------------------------------------------------------- translation


def test_slice_conditions_zones_and_ports():
    slices = [
        slice_(
            "vllm-a",
            {"ip": "10.0.0.1", "zone": "zone-a"},  # ready
            {"ip": "10.0.0.2", "ready": False, "serving": True, "terminating": True},
            {"ip": "10.0.0.3", "ready": False, "serving": False, "terminating": True},
            {"ip": "10.0.0.4", "ready": False},  # not ready yet
        ),
        slice_("vllm-b", {"ip": "10.0.0.1", "zone": "zone-a"}, {"ip": "fd00::5"}, port=9000),
        endpoint_slice("vllm-fqdn", NS, "vllm", [{"ip": "10.0.0.9"}], address_type="FQDN"),
    ]
    slices[0]["endpoints"].append({"addresses": ["10.0.0.6"], "conditions": {}})  # unset: ready
    endpoints, notes = slice_endpoints(slices, "http")
    assert endpoints == (
        Endpoint("10.0.0.1", 8000),
        Endpoint("10.0.0.2", 8000, draining=True),
        Endpoint("10.0.0.6", 8000),
        Endpoint("10.0.0.1", 9000),
        Endpoint("fd00::5", 9000),
    ) or sorted(endpoints, key=lambda e: e.key) == sorted(
        [
            Endpoint("10.0.0.1", 8000, "zone-a"),
            Endpoint("10.0.0.2", 8000, draining=True),
            Endpoint("10.0.0.6", 8000),
            Endpoint("10.0.0.1", 9000, "zone-a"),
            Endpoint("fd00::5", 9000),
        ],
        key=lambda e: e.key,
    )
    assert notes == ["EndpointSlice vllm-fqdn: addressType FQDN skipped"]
    by_number, notes = slice_endpoints(slices, 9000)
    assert {e.key for e in by_number} == {"10.0.0.1:9000", "[fd00::5]:9000"}
    assert "EndpointSlice vllm-a has no port 9000" in notes


def test_inference_pool_pods_every_ready_ip_on_every_target_port():
    spec = PoolSpec("app=vllm", (8000, 8001), "http", None)
    pods = [
        pod("p1", NS, {"app": "vllm"}, "10.1.0.1"),
        pod("p2", NS, {"app": "vllm"}, "10.1.0.2", ready=False),
        pod("p3", NS, {"app": "vllm"}, "10.1.0.3", terminating=True),
        pod("p4", NS, {"app": "vllm"}, None, ready=False),  # pending: no IP yet
        pod("p5", NS, {"app": "other"}, "10.1.0.5"),
    ]
    endpoints, counts = pod_endpoints(pods, spec)
    assert [(e.key, e.draining) for e in endpoints] == [
        ("10.1.0.1:8000", False),
        ("10.1.0.1:8001", False),
        ("10.1.0.3:8000", True),
        ("10.1.0.3:8001", True),
    ]
    assert counts == {"pods": 4, "ready": 1, "draining": 1}


# --------------------------------------------------------------------------- the watch


@pytest.fixture
async def api() -> AsyncIterator[FakeKubernetes]:
    server = FakeKubernetes(token=TOKEN)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(api: FakeKubernetes, tmp_path: Path) -> AsyncIterator[ApiClient]:
    client = ApiClient(from_kubeconfig([write_kubeconfig(tmp_path, api)]))
    await client.start()
    try:
        yield client
    finally:
        await client.close()


class Watched:
    """A Collection of the vllm Service's slices, and every state it published."""

    def __init__(self, client: ApiClient) -> None:
        self.seen: list[set[str]] = []
        self.collection = Collection(client, ENDPOINT_SLICES, NS, SELECTOR, self._changed, FAST)
        self.task = asyncio.create_task(self.collection.run())

    def _changed(self, collection: Collection) -> None:
        self.seen.append(set(collection.objects))

    @property
    def names(self) -> set[str]:
        return set(self.collection.objects)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def watch_requests(api: FakeKubernetes) -> list[dict[str, str]]:
    return [q for _, path, q in api.requests if q.get("watch") == "true"]


def lists(api: FakeKubernetes) -> int:
    return sum(1 for _, path, q in api.requests if "watch" not in q)


async def test_list_then_watch_events_bookmarks_and_a_dropped_connection(
    api: FakeKubernetes, client: ApiClient
):
    api.put(slice_("vllm-1", {"ip": "10.0.0.1"}))
    api.put(endpoint_slice("other-1", NS, "other", [{"ip": "10.9.0.1"}]))
    w = Watched(client)
    try:
        await until(lambda: api.watches() == 1, what="the watch")
        first = watch_requests(api)[0]
        assert first["resourceVersion"] == str(api.revision)  # from the list's version
        assert first["allowWatchBookmarks"] == "true"
        assert first["labelSelector"] == SELECTOR
        assert w.names == {"vllm-1"}

        api.put(slice_("vllm-2", {"ip": "10.0.0.2"}))
        api.put(slice_("vllm-1", {"ip": "10.0.0.11"}))
        api.delete("endpointslices", NS, "vllm-2")
        await until(lambda: w.collection.events["DELETED"] == 1)
        obj = w.collection.objects["vllm-1"]
        assert obj["endpoints"][0]["addresses"] == ["10.0.0.11"]

        # A bookmark advances the resourceVersion (here past an event the selector hides).
        api.put(endpoint_slice("other-1", NS, "other", [{"ip": "10.9.0.2"}]))
        api.bookmark()
        await until(lambda: w.collection.resource_version == str(api.revision), what="bookmark")

        # A dropped connection resumes from that version, without a list.
        listed = lists(api)
        api.drop_watches()
        api.put(slice_("vllm-3", {"ip": "10.0.0.3"}))
        await until(lambda: w.names == {"vllm-1", "vllm-3"}, what="resumed watch")
        assert watch_requests(api)[-1]["resourceVersion"] == str(api.revision - 1)
        assert lists(api) == listed and w.collection.relists == 0
        assert w.collection.errors == 1 and w.collection.connected
    finally:
        await w.stop()


@pytest.mark.parametrize("gone_as", ["event", "status"])
async def test_410_gone_relists_and_replaces_the_state_in_one_step(
    api: FakeKubernetes, client: ApiClient, gone_as: str
):
    for i in (1, 2, 3):
        api.put(slice_(f"vllm-{i}", {"ip": f"10.0.0.{i}"}))
    w = Watched(client)
    try:
        await until(lambda: api.watches() == 1)
        api.gone_as = gone_as
        api.delay = 0.3  # the watch comes back slowly: a gap in which things happen
        api.drop_watches()
        await asyncio.sleep(0.05)
        api.delete("endpointslices", NS, "vllm-3")
        api.put(slice_("vllm-4", {"ip": "10.0.0.4"}))
        api.compact()  # the version the watcher holds is now too old
        await until(lambda: w.collection.relists == 1, what="a re-list")
        api.delay = 0
        await until(lambda: w.names == {"vllm-1", "vllm-2", "vllm-4"}, what="the new state")
        # Every state the source was shown had the slices that never went away: none was
        # dropped while re-listing, and the deleted one left in the same step the new came.
        assert all({"vllm-1", "vllm-2"} <= seen for seen in w.seen), w.seen
        assert w.seen[-1] == {"vllm-1", "vllm-2", "vllm-4"}
        assert {"vllm-3", "vllm-4"} not in [seen & {"vllm-3", "vllm-4"} for seen in w.seen]
        assert lists(api) == 2

        # An ERROR 410 on an open watch (the server's window moved on) re-lists too.
        await until(lambda: api.watches() == 1)
        api.compact()
        api.expire_watches()
        await until(lambda: w.collection.relists == 2, what="a second re-list")
    finally:
        await w.stop()


async def test_slow_answers_failures_and_an_api_server_that_goes_away(
    api: FakeKubernetes, client: ApiClient
):
    api.put(slice_("vllm-1", {"ip": "10.0.0.1"}))
    api.delay = 0.5  # a slow list: waited for
    api.fail_next(503)  # and a failing one first: retried after a back-off
    w = Watched(client)
    try:
        await until(lambda: w.collection.synced, what="the slow list")
        assert w.collection.errors == 1 and w.names == {"vllm-1"}
        api.delay = 0
        await until(lambda: api.watches() == 1)

        await api.stop()  # gone: connections cut, new ones refused
        await until(lambda: w.collection.errors >= 3, what="failed retries")
        assert not w.collection.connected
        assert w.names == {"vllm-1"}  # the last known objects stay

        api.put(slice_("vllm-2", {"ip": "10.0.0.2"}))
        await api.start()  # back on the same port
        await until(lambda: w.names == {"vllm-1", "vllm-2"}, what="catching up")
        assert w.collection.connected
    finally:
        await w.stop()


# --------------------------------------------------------------------------- the control plane


def k8s_snapshot(path: Path, pools: list[dict[str, Any]]) -> Path:
    doc = {
        "listeners": [
            {
                "name": "inference",
                "address": "127.0.0.1",
                "port": 10000,
                "routes": [{"prefix": "/", "pool": pools[0]["name"]}],
            }
        ],
        "pools": pools,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def served(plane: ControlPlane, pool: str) -> list[tuple[str, bool]]:
    config = plane.publisher.config
    assert config is not None
    return [(e.key, e.draining) for e in config.pool(pool).endpoints]


async def test_the_plane_serves_kubernetes_pools_with_the_overlay_on_top(
    api: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("XDS_ADMIN_TOKEN", ADMIN_TOKEN)
    api.put(slice_("vllm-1", {"ip": "10.0.0.1", "zone": "zone-a"}, {"ip": "10.0.0.2"}))
    api.put(inference_pool("llama", NS, {"app": "llama"}, [8000], "kubernetes.io/h2c", "epp"))
    api.put(pod("llama-0", NS, {"app": "llama"}, "10.1.0.1"))
    snapshot = k8s_snapshot(
        tmp_path / "s.yaml",
        [
            {"name": "vllm", "kubernetes": {"service": "vllm", "namespace": NS, "port": "http"}},
            {"name": "llama", "kubernetes": {"inferencePool": "llama", "namespace": NS}},
        ],
    )
    settings = local_settings(snapshot, kubernetes=options(write_kubeconfig(tmp_path, api)))
    async with ControlPlane(settings) as plane, aiohttp.ClientSession() as session:
        # The first config served already has them: start-up waits for the first lists.
        assert served(plane, "vllm") == [("10.0.0.2:8000", False), ("10.0.0.1:8000", False)]
        assert served(plane, "llama") == [("10.1.0.1:8000", False)]
        cluster = plane.cache.groups["default"].types[typeurls.CLUSTER]
        assert "HttpProtocolOptions" in str(cluster.resources["llama"])  # h2c: HTTP/2
        assert "HttpProtocolOptions" not in str(cluster.resources["vllm"])

        # A terminating endpoint drains; a new one is served after the debounce.
        before = plane.cache.generation
        api.put(
            slice_(
                "vllm-1",
                {"ip": "10.0.0.1", "zone": "zone-a"},
                {"ip": "10.0.0.2", "ready": False, "serving": True, "terminating": True},
                {"ip": "10.0.0.3"},
            )
        )
        await until(lambda: ("10.0.0.3:8000", False) in served(plane, "vllm"))
        assert ("10.0.0.2:8000", True) in served(plane, "vllm")
        assert plane.cache.generation == before + 1  # the burst made one push

        # An admin drain applies over a Kubernetes endpoint, as over a file endpoint.
        admin = Admin(session, f"http://127.0.0.1:{plane.admin_port}")
        status, _ = await admin.call("POST", "/api/v1/pools/vllm/endpoints/10.0.0.3:8000/drain")
        assert status == 200
        assert ("10.0.0.3:8000", True) in served(plane, "vllm")
        status, body = await admin.call("GET", "/api/v1/pools/vllm/endpoints")
        assert {e["origin"] for e in body["endpoints"]} == {"kubernetes"}

        status, health = await admin.call("GET", "/healthz")
        assert health["status"] == "ok" and health["kubernetes"]["connected"]
        assert health["kubernetes"]["pools"]["llama"]["note"] == "1 pods, 1 ready, 0 draining"

        # The InferencePool's status: our entry, Accepted and ResolvedRefs, written once.
        await until(lambda: len(api.patches) == 1, what="the status write")
        parents = api.get("inferencepools", NS, "llama")["status"]["parents"]
        assert len(parents) == 1
        assert parents[0]["parentRef"] == {
            "group": "xds-server",
            "kind": "ControlPlane",
            "name": "control-plane",
        }
        assert parents[0]["controllerName"] == "xds-server/control-plane"
        conditions = {c["type"]: c for c in parents[0]["conditions"]}
        assert conditions["Accepted"]["status"] == "True"
        assert conditions["Accepted"]["reason"] == "Accepted"
        assert "HTTP/2" in conditions["Accepted"]["message"]
        assert conditions["ResolvedRefs"]["status"] == "True"
        assert "endpointPickerRef epp is not called" in conditions["ResolvedRefs"]["message"]
        assert conditions["Accepted"]["observedGeneration"] == 1
        await asyncio.sleep(0.3)
        assert len(api.patches) == 1  # our own write, seen by the watch, causes none

        # The pool's last Pod goes: the status says so (one more write), the pool is empty.
        api.delete("pods", NS, "llama-0")
        await until(lambda: len(api.patches) == 2, what="the second status write")
        parents = api.get("inferencepools", NS, "llama")["status"]["parents"]
        resolved = {c["type"]: c for c in parents[0]["conditions"]}["ResolvedRefs"]
        assert resolved["status"] == "False" and resolved["reason"] == "NoReadyPods"
        assert served(plane, "llama") == []

        samples = await scrape(admin)
        assert value(samples, "xds_kubernetes_connected") == 1
        assert value(samples, "xds_kubernetes_status_writes_total", result="written") == 2

        # The API server goes away: the endpoints keep serving, /healthz and /metrics say so.
        await api.stop()
        await until(lambda: not plane.kubernetes.connected, what="disconnected")
        status, health = await admin.call("GET", "/healthz")
        assert health["status"].startswith("degraded: Kubernetes API unreachable")
        assert ("10.0.0.1:8000", False) in served(plane, "vllm")
        samples = await scrape(admin)
        assert value(samples, "xds_kubernetes_connected") == 0
        assert value(samples, "xds_kubernetes_watch_errors_total", resource="endpointslices") >= 1


async def test_a_status_conflict_is_retried_from_the_newer_object(
    api: FakeKubernetes, tmp_path: Path
):
    other = {
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
        "controllerName": "example.net/gateway",
        "conditions": [],
    }
    pool = inference_pool("llama", NS, {"app": "llama"})
    pool["status"] = {"parents": [other]}
    api.put(pool)
    api.put(pod("llama-0", NS, {"app": "llama"}, "10.1.0.1"))
    api.concurrent_writes = 1  # someone changes the pool just before our first patch
    snapshot = k8s_snapshot(
        tmp_path / "s.yaml",
        [{"name": "llama", "kubernetes": {"inferencePool": "llama", "namespace": NS}}],
    )
    settings = local_settings(snapshot, kubernetes=options(write_kubeconfig(tmp_path, api)))
    async with ControlPlane(settings) as plane:
        writer = plane.kubernetes.status if plane.kubernetes is not None else None
        assert writer is not None
        await until(lambda: writer.written == 1, what="a landed status write")
        assert writer.conflicts == 1  # refused (409), then written from the newer object
        obj = api.get("inferencepools", NS, "llama")
        assert obj["metadata"]["labels"] == {"touched": "1"}  # their change stands
        parents = obj["status"]["parents"]
        assert parents[0] == other  # another controller's entry is kept, untouched
        assert parents[1]["controllerName"] == "xds-server/control-plane"
        assert api.patches[0][1]["status"]["parents"][0] == other

        # The file stops serving the pool: our entry goes, the other controller's stays.
        k8s_snapshot(
            tmp_path / "s.yaml",
            [{"name": "static", "endpoints": [{"address": "10.2.0.1", "port": 8000}]}],
        )
        assert await plane.source.load()
        await until(lambda: writer.written == 2, what="the entry removed")
        assert api.get("inferencepools", NS, "llama")["status"]["parents"] == [other]


async def test_no_cluster_is_a_start_up_error(tmp_path: Path):
    snapshot = k8s_snapshot(
        tmp_path / "s.yaml",
        [{"name": "p", "kubernetes": {"service": "vllm", "namespace": NS, "port": 80}}],
    )
    settings = local_settings(snapshot, kubernetes=options(tmp_path / "no-such-kubeconfig"))
    with pytest.raises(KubernetesConfigError):
        async with ControlPlane(settings):
            pass
