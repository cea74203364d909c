"""The admin surface hardened: TLS with rotation, a read token, token length, allowed Hosts.

Real servers on ephemeral ports (the admin rig), real certificates (xds_lab.certs), real
HTTP and TLS clients; the CLI runs as a subprocess where its exit code is the contract.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.admin_rig import (
    TOKEN,
    Admin,
    plane_settings,
    running,
    scrape,
    snapshot_doc,
    value,
    write_doc,
)
from xds_lab.certs import Authority, Issued
from xds_server.admin import AdminApi
from xds_server.admin.auth import MIN_TOKEN_LENGTH, PROBE_PATHS, TokenError
from xds_server.admin.hosts import allowed_hosts, host_name
from xds_server.admin.tls import TlsError
from xds_server.app import ControlPlane

READ_TOKEN = "read-token-0123456789-abcdefghijklmnopqrstuvwxyz"
A = "127.0.0.1:9001"
DRAIN = f"/api/v1/pools/llama/endpoints/{A}/drain"
CLI = [sys.executable, "-m", "xds_server.cli"]


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "snapshot.yaml"
    write_doc(path, snapshot_doc([9001, 9002, 9003]))
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "read-token").write_text(READ_TOKEN + "\n")
    return {
        "admin_token_file": tmp_path / "token",
        "admin_read_token_file": tmp_path / "read-token",
    }


@pytest.fixture(autouse=True)
def no_tokens_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDS_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("XDS_ADMIN_READ_TOKEN", raising=False)


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    """`xds-server serve` on ephemeral ports; these runs are all expected to exit at start."""
    ports = ("--xds-port", "0", "--admin-port", "0", "--router-port", "0")
    return subprocess.run(
        [*CLI, "serve", *ports, *args], capture_output=True, text=True, timeout=60
    )


async def read_routes(plane: ControlPlane) -> list[str]:
    """Every GET route of the admin app with its parameters filled in: future routes too."""
    app = await AdminApi(plane.cache, plane.registry, plane.fleet, plane.metrics).app()
    return sorted(
        route.resource.canonical.replace("{pool}", "llama")
        for route in app.router.routes()
        if route.method == "GET" and route.resource is not None
    )


async def status_and_body(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, Any, Any]:
    async with session.get(url, headers=headers) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.read()
        return resp.status, body, resp.headers


# --- TLS ---------------------------------------------------------------------------------


def client_context(authority: Authority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(authority.cert))


async def served_certificate(port: int, trust: ssl.SSLContext) -> bytes:
    """DER of the certificate a new TLS connection to the admin port gets (verified)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=trust)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert der is not None
        return der
    finally:
        writer.close()
        await writer.wait_closed()


def der_of(issued: Issued) -> bytes:
    return ssl.PEM_cert_to_DER_cert(issued.cert.read_text())


async def test_the_admin_api_over_https(snapshot: Path, tmp_path: Path, tokens: dict[str, Path]):
    authority = Authority(tmp_path / "pki")
    server = authority.server()
    trust = client_context(authority)
    async with running(
        snapshot,
        client_tls=trust,
        admin_tls_cert=server.cert,
        admin_tls_key=server.key,
        admin_token_file=tokens["admin_token_file"],
    ) as (plane, admin):
        assert await served_certificate(plane.admin_port, trust) == der_of(server)
        assert (await admin.get("/healthz"))["status"] == "ok"
        assert (await admin.call("POST", DRAIN))[0] == 200  # changes work over TLS too
        # Plain HTTP on the TLS port gets no answer; a client trusting another CA is refused.
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(f"http://127.0.0.1:{plane.admin_port}/healthz") as resp:
                    await resp.read()
        with pytest.raises(ssl.SSLCertVerificationError):
            await served_certificate(plane.admin_port, client_context(Authority(tmp_path / "x")))


async def test_a_rotated_certificate_reaches_new_connections_without_a_restart(
    snapshot: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    authority = Authority(tmp_path / "pki")
    first = authority.server("admin")
    trust = client_context(authority)
    async with running(
        snapshot, client_tls=trust, admin_tls_cert=first.cert, admin_tls_key=first.key
    ) as (plane, admin):
        port, original = plane.admin_port, der_of(first)
        assert await served_certificate(port, trust) == original

        # As rotation tools do: new files renamed over the old ones, one at a time. Between
        # the two renames the certificate does not match the key: the old pair keeps serving.
        second = authority.issue(
            "admin-next", dns=("localhost",), ips=("127.0.0.1", "::1"), server=True
        )
        expected = der_of(second)
        os.replace(second.cert, first.cert)
        with caplog.at_level(logging.WARNING, logger="xds_server.admin.tls"):
            assert await served_certificate(port, trust) == original != expected
        assert "keeping the certificate loaded before" in caplog.text
        assert str(first.key) in caplog.text
        os.replace(second.key, first.key)

        assert await served_certificate(port, trust) == expected
        assert await served_certificate(port, trust) == expected
        assert plane.admin_port == port  # the same server, never restarted
        assert (await admin.get("/api/v1/pools"))["pools"][0]["name"] == "llama"


async def test_tls_files_are_checked_at_start(snapshot: Path, tmp_path: Path):
    authority = Authority(tmp_path / "pki")
    server, other = authority.server(), authority.server("other")
    cases = [
        ({"admin_tls_cert": server.cert}, "go together"),
        ({"admin_tls_key": server.key}, "go together"),
        ({"admin_tls_cert": tmp_path / "nope.pem", "admin_tls_key": server.key}, "nope.pem"),
        ({"admin_tls_cert": server.cert, "admin_tls_key": other.key}, "cannot use certificate"),
        ({"admin_tls_cert": server.key, "admin_tls_key": server.key}, "cannot use certificate"),
    ]
    for overrides, hint in cases:
        plane = ControlPlane(plane_settings(snapshot, **overrides))
        with pytest.raises(TlsError, match=hint):
            await plane.start()
        await plane.stop(0)


def test_serve_exits_2_on_half_a_tls_pair_or_a_mismatched_key(tmp_path: Path):
    authority = Authority(tmp_path / "pki")
    server, other = authority.server(), authority.server("other")
    result = serve("--admin-tls-cert", str(server.cert))
    assert result.returncode == 2
    assert "--admin-tls-cert and --admin-tls-key go together" in result.stderr
    result = serve("--admin-tls-cert", str(server.cert), "--admin-tls-key", str(other.key))
    assert result.returncode == 2 and str(other.key) in result.stderr


# --- the read token ---------------------------------------------------------------------


async def test_with_a_read_token_every_read_but_the_probes_needs_a_token(
    snapshot: Path, tokens: dict[str, Path]
):
    async with running(snapshot, **tokens) as (plane, admin):
        routes = await read_routes(plane)
        assert {"/", "/status.js", "/metrics", "/openapi.json", "/api/v1/pools"} <= set(routes)
        session = admin.session
        for path in [*routes, "/no/such/route"]:
            if path in PROBE_PATHS:
                continue
            url = admin.base + path
            for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": READ_TOKEN}):
                status, body, headers = await status_and_body(session, url, header)
                assert status == 401 and "token" in body["error"], (path, header, body)
                assert headers["WWW-Authenticate"].startswith("Bearer")
            for token in (READ_TOKEN, TOKEN):  # the admin token reads too
                auth = {"Authorization": f"Bearer {token}"}
                status, _, _ = await status_and_body(session, url, auth)
                assert status == (404 if path == "/no/such/route" else 200), (path, token)
        # Probes stay open: load balancers and kubelets hold no secrets.
        status, body, _ = await status_and_body(session, admin.base + "/healthz", {})
        assert status == 200 and body["status"] == "ok"
        status, body, _ = await status_and_body(session, admin.base + "/readyz", {})
        assert status == 200 and body == {"ready": True}


async def test_the_read_token_cannot_change_state(snapshot: Path, tokens: dict[str, Path]):
    async with running(snapshot, **tokens) as (plane, admin):
        before = plane.cache.generation, plane.overlay.overlay
        status, body = await admin.call("POST", DRAIN, token=READ_TOKEN)
        assert status == 403 and "read token cannot change state" in body["error"]
        assert (await admin.call("POST", DRAIN, token=None))[0] == 401
        assert (plane.cache.generation, plane.overlay.overlay) == before
        assert (await admin.call("POST", DRAIN))[0] == 200


async def test_a_read_token_without_an_admin_token_leaves_changes_disabled(
    snapshot: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("XDS_ADMIN_READ_TOKEN", READ_TOKEN)
    async with running(snapshot) as (_, admin):
        admin.token = READ_TOKEN
        assert (await admin.get("/api/v1/pools"))["pools"][0]["name"] == "llama"
        assert (await admin.call("GET", "/api/v1/pools", token=None))[0] == 401
        status, body = await admin.call("POST", DRAIN)
        assert status == 401 and "no admin token is configured" in body["error"]


async def test_without_a_read_token_reads_stay_open(snapshot: Path, tokens: dict[str, Path]):
    async with running(snapshot, admin_token_file=tokens["admin_token_file"]) as (plane, admin):
        for path in await read_routes(plane):
            status, _, _ = await status_and_body(admin.session, admin.base + path, {})
            assert status == 200, path
        assert (await admin.call("POST", DRAIN, token=None))[0] == 401


async def test_openapi_declares_the_read_token_when_there_is_one(
    snapshot: Path, tokens: dict[str, Path]
):
    async with running(snapshot, **tokens) as (plane, admin):
        document = await admin.get("/openapi.json")
        app = await AdminApi(
            plane.cache, plane.registry, plane.fleet, plane.metrics, read_token=READ_TOKEN
        ).app()
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None
    }
    assert routed == {(p, m) for p, ops in document["paths"].items() for m in ops}
    schemes = document["components"]["securitySchemes"]
    assert schemes["read"] == {**schemes["bearer"], "description": schemes["read"]["description"]}
    assert document["security"] == [{"read": []}, {"bearer": []}]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path in PROBE_PATHS:
                assert operation["security"] == [], "probes are open"
            elif method == "get":
                assert "security" not in operation and "401" in operation["responses"], path
            else:
                assert operation["security"] == [{"bearer": []}], (path, method)
                assert "403" in operation["responses"], (path, method)


# --- token length ------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["admin_token_file", "admin_read_token_file"])
async def test_a_short_token_file_is_refused_at_start(snapshot: Path, tmp_path: Path, setting: str):
    path = tmp_path / "short"
    path.write_text("x" * (MIN_TOKEN_LENGTH - 1) + "\n")
    plane = ControlPlane(plane_settings(snapshot, **{setting: path}))
    with pytest.raises(TokenError, match=f"{path} holds a token of 31 characters") as err:
        await plane.start()
    await plane.stop(0)
    assert "at least 32" in str(err.value) and f"openssl rand -hex 32 > {path}" in str(err.value)
    path.write_text("x" * MIN_TOKEN_LENGTH)
    async with running(snapshot, **{setting: path}) as (_, admin):
        admin.token = "x" * MIN_TOKEN_LENGTH
        assert (await admin.get("/api/v1/pools"))["pools"]


def test_serve_exits_2_on_a_short_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    short = tmp_path / "token"
    short.write_text("changeme\n")
    result = serve("--admin-token-file", str(short))
    assert result.returncode == 2
    assert f"admin token file {short} holds a token of 8 characters" in result.stderr
    assert "openssl rand -hex 32" in result.stderr
    result = serve("--admin-read-token-file", str(short))
    assert result.returncode == 2 and f"admin read token file {short}" in result.stderr
    monkeypatch.setenv("XDS_ADMIN_TOKEN", "changeme")
    result = serve()
    assert result.returncode == 2 and "$XDS_ADMIN_TOKEN holds a token of 8" in result.stderr


# --- allowed Host headers ----------------------------------------------------------------


async def get_with_host(admin: Admin, host: str, path: str = "/api/v1/pools") -> tuple[int, Any]:
    async with admin.session.get(admin.base + path, headers={"Host": host}) as resp:
        return resp.status, await resp.json()


async def raw_status(port: int, request: bytes) -> bytes:
    """The status line of the answer to a hand-written HTTP request (no Host header etc.)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


ACCEPTED_ON_LOOPBACK = [
    "localhost",
    "localhost:8080",
    "LocalHost:1",
    "127.0.0.1",
    "127.0.0.1:18080",
    "[::1]",
    "[::1]:8080",
]
REFUSED_ON_LOOPBACK = [
    "evil.example",
    "evil.example:8080",
    "localhost.evil.example",
    "127.0.0.1.nip.io",
    "localhost.",
    "[::2]:8080",
    "localhost:http",
    "[::1",
]


async def test_a_loopback_admin_answers_only_loopback_names(
    snapshot: Path, tokens: dict[str, Path]
):
    async with running(snapshot, admin_token_file=tokens["admin_token_file"]) as (plane, admin):
        for host in ACCEPTED_ON_LOOPBACK:
            status, _ = await get_with_host(admin, host)
            assert status == 200, host
        for host in REFUSED_ON_LOOPBACK:
            for path in ("/api/v1/pools", "/healthz", "/metrics"):
                status, body = await get_with_host(admin, host, path)
                assert status == 421, (host, path)
                assert repr(host) in body["error"] and "--admin-allowed-host" in body["error"]
                assert body["host"] == host
        # A change through a rebinding name is refused before the token is even looked at.
        async with admin.session.post(
            admin.base + DRAIN, headers={"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status == 421
        assert plane.overlay.overlay.pools == {}
        status = await raw_status(plane.admin_port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert status.startswith(b"HTTP/1.0 421"), status


async def test_allowed_hosts_replace_the_defaults(snapshot: Path):
    hosts = ("xds-admin.example.com", "[fd00::1]")
    async with running(snapshot, admin_allowed_hosts=hosts) as (_, admin):
        for host in ("xds-admin.example.com", "XDS-admin.example.com:443", "[fd00::1]:8080"):
            assert (await get_with_host(admin, host))[0] == 200, host
        status, body = await get_with_host(admin, "localhost:8080")
        assert status == 421 and "[fd00::1], xds-admin.example.com" in body["error"]
        # The IP literal the connection reached is always fine: probes and curl use it.
        assert (await get_with_host(admin, "127.0.0.1:8080"))[0] == 200


async def test_any_host_when_asked_or_when_bound_beyond_loopback(
    snapshot: Path, caplog: pytest.LogCaptureFixture
):
    async with running(snapshot, admin_allowed_hosts=("*",)) as (_, admin):
        assert (await get_with_host(admin, "anything.example"))[0] == 200
    assert "DNS rebinding" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="xds_server.admin.hosts"):
        async with running(snapshot, admin_host="0.0.0.0") as (_, admin):
            assert (await get_with_host(admin, "lb.example:443"))[0] == 200
    assert "accepts requests for any Host name" in caplog.text
    assert "--admin-allowed-host" in caplog.text


def test_host_names_and_defaults():
    assert host_name("Example.COM:8080") == "example.com"
    assert host_name("[::1]:80") == host_name("[0:0::1]") == "::1"
    assert host_name("a:b") is None and host_name("[::1]x") is None and host_name("") is None
    loopback = frozenset({"localhost", "127.0.0.1", "::1"})
    for bind in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert allowed_hosts(bind) == loopback, bind
    assert allowed_hosts("127.0.0.1", ["[::1]", "A.example"]) == {"::1", "a.example"}
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    for bad in ("http://a.example", "a.example:80", "a/b", ""):
        with pytest.raises(ValueError):
            allowed_hosts("127.0.0.1", [bad])


def test_serve_refuses_a_malformed_allowed_host():
    result = serve("--admin-allowed-host", "https://xds.example.com")
    assert result.returncode == 2 and "--admin-allowed-host" in result.stderr


# --- refusals are counted ----------------------------------------------------------------


async def test_refusals_are_counted_by_reason(snapshot: Path, tokens: dict[str, Path]):
    async with running(snapshot, **tokens) as (_, admin):
        samples = await scrape(admin)
        refused = "xds_admin_refused_total"
        assert value(samples, refused, reason="token") == 0
        assert ("xds_admin_refused_total", frozenset({("reason", "host")})) in samples
        assert (await admin.call("GET", "/api/v1/pools", token=None))[0] == 401
        assert (await admin.call("GET", "/api/v1/pools", token="wrong"))[0] == 401
        assert (await admin.call("POST", DRAIN, token=READ_TOKEN))[0] == 403
        assert (await get_with_host(admin, "evil.example"))[0] == 421
        assert (await admin.call("GET", "/healthz", token=None))[0] == 200
        samples = await scrape(admin)
        assert value(samples, refused, reason="token") == 3
        assert value(samples, refused, reason="host") == 1
        route = "/api/v1/pools"
        assert (
            value(samples, "xds_admin_requests_total", route=route, method="GET", code="421") == 1
        )
