"""The admin API against a real control plane: every route, auth, bad input, the config dump."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.admin_rig import TOKEN, Admin, running, served_endpoints, snapshot_doc, write_doc
from tests.loop_watch import cpu_seconds_of, watch_loop
from xds_server.admin import AdminApi
from xds_server.app import ControlPlane

PORTS = [9001, 9002, 9003]
A, B, C = (f"127.0.0.1:{p}" for p in PORTS)
NEW = {"address": "127.0.0.1", "port": 9010, "zone": "zone-9", "weight": 4}
ENV_TOKEN = "from-env-0123456789abcdefghijklmnopqrstuvwxyz"
MUTATIONS = [
    ("POST", "/api/v1/pools/llama/endpoints", NEW),
    ("DELETE", f"/api/v1/pools/llama/endpoints/{A}", None),
    ("POST", f"/api/v1/pools/llama/endpoints/{A}/drain", None),
    ("POST", f"/api/v1/pools/llama/endpoints/{A}/undrain", None),
]


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "snapshot.yaml"
    write_doc(path, snapshot_doc(PORTS))
    return path


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
async def api(snapshot: Path, token_file: Path) -> AsyncIterator[tuple[ControlPlane, Admin]]:
    async with running(snapshot, admin_token_file=token_file) as pair:
        yield pair


def state_of(plane: ControlPlane) -> tuple[int, Any]:
    """What a rejected request must leave alone: the cache and the overlay."""
    return plane.cache.generation, plane.overlay.overlay


async def test_read_routes(api: tuple[ControlPlane, Admin]):
    _, admin = api
    health = await admin.get("/healthz")
    assert health["status"] == "ok" and health["mutations"] == "token"
    dump = await admin.get("/api/v1/snapshot")
    assert served_endpoints(dump) == {A: "", B: "", C: ""}
    assert dump["overlay"] == {"format": 1, "pools": {}}
    assert (await admin.get("/api/v1/nodes")) == {"nodes": [], "refused": []}
    [pool] = (await admin.get("/api/v1/pools"))["pools"]
    assert pool == {
        "name": "llama",
        "lb_policy": "round_robin",
        "weighting": "static",
        "node_groups": ["default"],
        "endpoints": 3,
        "active": 3,
        "draining": 0,
        "load_data": True,
        "shedding": False,
        "drop_fraction": 0.0,
    }
    endpoints = await admin.endpoints()
    assert endpoints[A] == {
        "key": A,
        "address": "127.0.0.1",
        "port": 9001,
        "zone": "zone-0",
        "origin": "file",
        "state": "active",
        "static_weight": 1,
        "effective_weight": 1,
        "saturated": False,
        "load": None,
        "explain": None,
    }
    overlay = await admin.get("/api/v1/overlay")
    assert overlay == {"state_file": None, "overlay": {"format": 1, "pools": {}}, "inert": []}
    assert (await admin.get("/openapi.json"))["openapi"].startswith("3.")
    async with admin.session.get(admin.base + "/") as resp:
        assert resp.status == 200 and "<title>xds-server status</title>" in await resp.text()
    async with admin.session.get(admin.base + "/status.js") as resp:
        assert resp.status == 200 and "api/v1/pools" in await resp.text()
    async with admin.session.get(admin.base + "/metrics") as resp:
        assert resp.status == 200 and "xds_connected_clients" in await resp.text()


async def test_drain_and_undrain_go_through_the_snapshot(api: tuple[ControlPlane, Admin]):
    plane, admin = api
    before = (await admin.get("/api/v1/snapshot"))["groups"]["default"]["endpoints"]["version"]
    status, body = await admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/drain")
    assert status == 200 and body["state"] == "draining"
    dump = await admin.get("/api/v1/snapshot")  # the answer came after the publish
    assert served_endpoints(dump) == {A: "", B: "DRAINING", C: ""}
    assert dump["overlay"]["pools"]["llama"]["drained"] == [B]
    assert (await admin.endpoints())[B]["state"] == "draining"
    assert (await admin.get("/api/v1/pools"))["pools"][0]["draining"] == 1
    # Draining again changes nothing and is fine (scripts retry).
    generation = plane.cache.generation
    assert (await admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/drain"))[0] == 200
    assert plane.cache.generation == generation
    status, body = await admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/undrain")
    assert status == 200 and body["state"] == "active"
    dump = await admin.get("/api/v1/snapshot")
    assert served_endpoints(dump) == {A: "", B: "", C: ""}
    assert dump["groups"]["default"]["endpoints"]["version"] == before  # content-hashed


async def test_add_and_remove_endpoints(api: tuple[ControlPlane, Admin]):
    _, admin = api
    status, body = await admin.call("POST", "/api/v1/pools/llama/endpoints", NEW)
    assert status == 201
    assert (body["key"], body["origin"], body["zone"], body["static_weight"]) == (
        "127.0.0.1:9010",
        "api",
        "zone-9",
        4,
    )
    assert "127.0.0.1:9010" in served_endpoints(await admin.get("/api/v1/snapshot"))
    status, body = await admin.call("DELETE", "/api/v1/pools/llama/endpoints/127.0.0.1:9010")
    assert (status, body["state"]) == (200, "removed")
    # A file endpoint is hidden by the overlay, listed as removed, and comes back on POST.
    assert (await admin.call("DELETE", f"/api/v1/pools/llama/endpoints/{C}"))[0] == 200
    assert served_endpoints(await admin.get("/api/v1/snapshot")) == {A: "", B: ""}
    assert (await admin.get("/api/v1/pools/llama/endpoints"))["removed"] == [C]
    status, body = await admin.call(
        "POST", "/api/v1/pools/llama/endpoints", {"address": "127.0.0.1", "port": 9003}
    )
    assert (status, body["origin"], body["zone"]) == (201, "file", "zone-0")
    assert (await admin.get("/api/v1/overlay"))["overlay"]["pools"] == {}


async def test_mutations_without_the_right_token_are_401_and_change_nothing(
    api: tuple[ControlPlane, Admin],
):
    plane, admin = api
    before = state_of(plane)
    for method, path, body in MUTATIONS:
        for token in (None, "wrong-token", TOKEN + "x", ""):
            status, answer = await admin.call(method, path, body, token=token)
            assert status == 401 and "error" in answer, (method, path, token, answer)
        async with admin.session.request(
            method, admin.base + path, json=body, headers={"Authorization": f"Basic {TOKEN}"}
        ) as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert state_of(plane) == before


async def test_without_a_configured_token_changes_are_refused(
    snapshot: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("XDS_ADMIN_TOKEN", raising=False)
    async with running(snapshot) as (plane, admin):
        assert (await admin.get("/healthz"))["mutations"] == "disabled"
        status, body = await admin.call("POST", f"/api/v1/pools/llama/endpoints/{A}/drain")
        assert status == 401 and "no admin token is configured" in body["error"]
        assert plane.overlay.overlay.pools == {}


async def test_token_from_the_environment(snapshot: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDS_ADMIN_TOKEN", ENV_TOKEN)
    async with running(snapshot) as (_, admin):
        assert (await admin.call("POST", f"/api/v1/pools/llama/endpoints/{A}/drain"))[0] == 401
        admin.token = ENV_TOKEN
        assert (await admin.call("POST", f"/api/v1/pools/llama/endpoints/{A}/drain"))[0] == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "hint"),
    [
        ("POST", "/api/v1/pools/nope/endpoints", NEW, 404, "no pool 'nope'"),
        ("GET", "/api/v1/pools/nope/endpoints", None, 404, "pools: llama"),
        ("POST", "/api/v1/pools/llama/endpoints/127.0.0.1:9999/drain", None, 404, "not served"),
        ("POST", "/api/v1/pools/llama/endpoints/127.0.0.1:9999/undrain", None, 404, "not served"),
        ("DELETE", "/api/v1/pools/llama/endpoints/127.0.0.1:9999", None, 404, "neither"),
        ("POST", "/api/v1/pools/llama/endpoints/localhost:9001/drain", None, 400, "IPv4"),
        ("POST", "/api/v1/pools/llama/endpoints/127.0.0.1/drain", None, 400, "ADDRESS:PORT"),
        ("POST", "/api/v1/pools/llama/endpoints", {**NEW, "port": 9001}, 409, "already"),
        ("POST", "/api/v1/pools/llama/endpoints", {"port": 1}, 400, "address"),
        ("POST", "/api/v1/pools/llama/endpoints", {**NEW, "weight": 0}, 400, "weight"),
        ("POST", "/api/v1/pools/llama/endpoints", [], 400, "mapping"),
        ("POST", "/api/v1/pools/llama/endpoints", {**NEW, "x": 1}, 400, "unknown key"),
        ("GET", "/api/v1/nope", None, 404, "Not Found"),
        ("PUT", "/api/v1/pools", None, 405, "Method Not Allowed"),
    ],
)
async def test_refused_requests_answer_json_and_change_nothing(
    api: tuple[ControlPlane, Admin], method: str, path: str, body: Any, status: int, hint: str
):
    plane, admin = api
    before = state_of(plane)
    got, answer = await admin.call(method, path, body)
    assert got == status and hint in answer["error"], answer
    assert state_of(plane) == before


async def test_bodies_that_are_not_json_or_too_large(api: tuple[ControlPlane, Admin]):
    plane, admin = api
    before = state_of(plane)
    url = admin.base + "/api/v1/pools/llama/endpoints"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for data, status in ((b"{not json", 400), (b"\xff\xfe", 400), (b"x" * 70_000, 413)):
        async with admin.session.post(url, data=data, headers=headers) as resp:
            assert resp.status == status and "error" in await resp.json()
    assert state_of(plane) == before


async def test_the_last_active_endpoint_cannot_be_drained(api: tuple[ControlPlane, Admin]):
    """With every host DRAINING, Envoy 1.40 balances over all of them: the drain would lie."""
    plane, admin = api
    for key in (A, B):
        assert (await admin.call("POST", f"/api/v1/pools/llama/endpoints/{key}/drain"))[0] == 200
    before = state_of(plane)
    status, body = await admin.call("POST", f"/api/v1/pools/llama/endpoints/{C}/drain")
    assert status == 409 and "last active endpoint" in body["error"]
    assert state_of(plane) == before


async def test_a_burst_of_changes_is_published_once(snapshot: Path, token_file: Path):
    async with running(snapshot, admin_token_file=token_file, admin_debounce=0.3) as pair:
        plane, admin = pair
        before = plane.cache.generation
        results = await asyncio.gather(
            admin.call("POST", f"/api/v1/pools/llama/endpoints/{A}/drain"),
            admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/drain"),
            admin.call("POST", "/api/v1/pools/llama/endpoints", NEW),
        )
        assert [status for status, _ in results] == [200, 200, 201]
        assert plane.cache.generation == before + 1
        dump = await admin.get("/api/v1/snapshot")
        assert served_endpoints(dump) == {A: "DRAINING", B: "DRAINING", C: "", NEW_KEY: ""}


NEW_KEY = "127.0.0.1:9010"

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_endpoint_like = st.fixed_dictionaries(
    {},
    optional={
        "address": st.sampled_from(["127.0.0.1", "::1", "10.0.0.300", "", "host"]) | st.text(),
        "port": st.integers(-5, 70_000) | _json_values,
        "zone": st.text(max_size=6) | _json_values,
        "weight": st.integers(-2, 2_000_000) | _json_values,
        "extra": _json_values,
    },
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_endpoint_like | _json_values)
@example(body={"address": "::1", "port": 4009})  # an IPv6 key is bracketed: [::1]:4009
async def test_any_body_is_added_whole_or_refused_with_nothing_changed(
    api: tuple[ControlPlane, Admin], body: Any
):
    plane, admin = api
    before = state_of(plane)
    status, answer = await admin.call("POST", "/api/v1/pools/llama/endpoints", body)
    if status == 201:
        assert answer["key"] in served_endpoints(await admin.get("/api/v1/snapshot"))
        delete = f"/api/v1/pools/llama/endpoints/{answer['key']}"
        assert (await admin.call("DELETE", delete))[0] == 200
        assert plane.overlay.overlay == before[1]
    else:
        assert status in (400, 409) and isinstance(answer["error"], str), answer
        assert state_of(plane) == before


async def test_openapi_documents_exactly_the_routes(api: tuple[ControlPlane, Admin]):
    plane, admin = api
    app = await AdminApi(plane.cache, plane.registry, plane.fleet, plane.metrics).app()
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None
    }
    document = await admin.get("/openapi.json")
    documented = {
        (path, method) for path, operations in document["paths"].items() for method in operations
    }
    assert routed == documented
    for path, operations in document["paths"].items():
        in_path = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        for method, operation in operations.items():
            params = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert params == in_path, (path, method)
            assert ("security" in operation) == (method != "get"), (path, method)
    json.dumps(document)  # plain JSON, no Python-only values


async def test_an_addition_that_would_overflow_envoys_weight_sum_is_refused(
    tmp_path: Path, token_file: Path
):
    """4,294 endpoints at the top weight fit in uint32; one more would not (Envoy NACKs it)."""
    doc = snapshot_doc([])
    doc["pools"][0]["endpoints"] = [
        {"address": f"10.{i // 250}.{i % 250}.1", "port": 8000, "weight": 1_000_000}
        for i in range(4294)
    ]
    write_doc(tmp_path / "big.yaml", doc)
    async with running(tmp_path / "big.yaml", admin_token_file=token_file) as (plane, admin):
        before = state_of(plane)
        status, body = await admin.call(
            "POST", "/api/v1/pools/llama/endpoints", {**NEW, "weight": 1_000_000}
        )
        assert status == 409 and "over Envoy's 4294967295" in body["error"]
        assert state_of(plane) == before
        assert (await admin.call("POST", "/api/v1/pools/llama/endpoints", NEW))[0] == 201


async def test_a_big_config_dump_is_built_off_the_event_loop(tmp_path: Path):
    """Issue 12: the loop serving the admin API serves xDS and LRS too. The dump of 2,000
    endpoints took 80-120 ms to build, all of it a stall of that loop; built in a thread,
    the loop's longest stall is a small part of the request's time."""
    path = tmp_path / "snapshot.yaml"
    write_doc(path, snapshot_doc([20_000 + i for i in range(2_000)]))
    async with running(path) as (_, admin):
        await admin.get("/api/v1/snapshot")  # warm up (first-use imports and caches)
        async with watch_loop() as loop, admin.session.get(admin.base + "/api/v1/snapshot") as r:
            text = await r.text()  # parsed after: the client shares the loop
    dump = json.loads(text)
    assert len(served_endpoints(dump)) == 2_000
    # Writing the JSON alone is about half of building the dump.
    writing = cpu_seconds_of(lambda: json.dumps(dump, indent=2))
    assert loop.longest_busy < writing / 2, (loop.longest_busy, loop.longest, writing)
