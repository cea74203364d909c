"""TLS and mTLS on the gRPC port, node identity from certificates, and rotation.

Real certificates (made here with `cryptography`), a real Envoy 1.40 bootstrapped over
mTLS with file-based SDS, and scripted gRPC clients for what Envoy cannot be made to do
(claim another group, present no certificate).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from cryptography import x509
from envoy.service.load_stats.v3 import lrs_pb2

from lrs.contract import raw_bytes
from tests.xds_client import SotwClient, node
from xds_lab.certs import Authority, Issued
from xds_lab.envoy_process import EnvoyProcess
from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings
from xds_lab.upstream import Upstream
from xds_server.app import ControlPlane
from xds_server.bootstrap import ClientTls, envoy_bootstrap, sds_files
from xds_server.tls import TlsFiles
from xds_server.xds import typeurls

EDGE_ID = "spiffe://example.org/ns/edge/sa/envoy"
INTERNAL_ID = "spiffe://example.org/ns/internal/sa/envoy"


class Pki:
    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder / "ca")
        self.server = self.ca.server()
        self.edge = self.ca.issue("edge", uris=(EDGE_ID,))
        self.internal = self.ca.issue("internal", uris=(INTERNAL_ID,))
        self.expired = self.ca.issue("expired", uris=(EDGE_ID,), expired=True)
        self.stranger = Authority(folder / "other-ca", "other-ca").issue(
            "stranger", uris=(EDGE_ID,)
        )

    def files(self) -> TlsFiles:
        return TlsFiles(self.server.cert, self.server.key, self.ca.cert)

    def client_tls(self, issued: Issued, folder: Path) -> ClientTls:
        tls = ClientTls(self.ca.cert, issued.cert, issued.key, folder)
        folder.mkdir(parents=True, exist_ok=True)
        for path, text in sds_files(tls).items():
            path.write_text(text)
        return tls

    def credentials(self, issued: Issued | None) -> grpc.ChannelCredentials:
        if issued is None:
            return grpc.ssl_channel_credentials(self.ca.cert.read_bytes())
        cert, key = issued.pem()
        return grpc.ssl_channel_credentials(self.ca.cert.read_bytes(), key, cert)


def snapshot(path: Path, upstream_port: int, listener_port: int) -> Path:
    document = {
        "listeners": [
            {
                "name": "inference",
                "address": "127.0.0.1",
                "port": listener_port,
                "routes": [{"prefix": "/", "pool": "llama"}],
            }
        ],
        "pools": [
            {
                "name": "llama",
                "weighting": "orca",
                "endpoints": [{"address": "127.0.0.1", "port": upstream_port}],
            }
        ],
        "node_groups": [
            {
                "name": "edge",
                "node_clusters": ["edge"],
                "identities": ["spiffe://example.org/ns/edge/*"],
                "listeners": ["inference"],
            },
            {
                "name": "internal",
                "node_clusters": ["internal"],
                "identities": ["spiffe://example.org/ns/internal/*"],
                "pools": ["llama"],
            },
        ],
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream("u1") as server:
        yield server


@pytest.fixture
async def plane(tmp_path: Path, pki: Pki, upstream: Upstream) -> AsyncIterator[ControlPlane]:
    path = snapshot(tmp_path / "s.yaml", upstream.port, free_port())
    plane = ControlPlane(local_settings(path, tls=pki.files()))
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop(0)


async def _refused_envoy(plane: ControlPlane, tmp_path: Path, tls: ClientTls, cluster: str) -> Any:
    """Start an Envoy with `tls` claiming `cluster`; return its dynamic listeners after a
    while (none expected) and stop it."""
    bootstrap = envoy_bootstrap(
        node_id=f"envoy-{cluster}-{tls.cert.stem}",
        node_cluster=cluster,
        xds_port=plane.xds_port,
        envoy_admin_port=free_port(),
        tls=tls,
    )
    async with EnvoyProcess(bootstrap, tmp_path / f"envoy-{tls.cert.stem}") as envoy:
        await asyncio.sleep(1.5)  # it never becomes ready: its initial fetch finds nothing
        dump = await envoy.config_dump("dynamic_listeners")
    return dump.get("configs", [])


@pytest.mark.envoy
async def test_config_flows_over_mtls_and_traffic_passes(tmp_path: Path, pki: Pki, upstream):
    listener_port = free_port()
    path = snapshot(tmp_path / "s.yaml", upstream.port, listener_port)
    tls = pki.client_tls(pki.edge, tmp_path / "sds")
    rig = PlaneWithEnvoy(
        local_settings(path, tls=pki.files()), tmp_path, "envoy-edge", node_cluster="edge", tls=tls
    )
    async with rig:
        [client, *_] = rig.plane.registry.by_node("envoy-edge")
        assert client.identities == (EDGE_ID,) and client.group == "edge"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{listener_port}/v1/models") as response:
                assert response.status == 200
        # LRS runs over the same mTLS connection: its reporter is the identity + node.id.
        deadline = time.monotonic() + 10
        while rig.plane.lrs.connected_reporters < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


@pytest.mark.envoy
@pytest.mark.parametrize("which", ["stranger", "expired"])
async def test_envoy_with_a_bad_certificate_is_refused(
    tmp_path: Path, pki: Pki, plane: ControlPlane, which: str
):
    tls = pki.client_tls(getattr(pki, which), tmp_path / f"sds-{which}")
    assert await _refused_envoy(plane, tmp_path, tls, "edge") == []
    assert len(plane.registry) == 0  # the handshake failed: no stream was ever opened


@pytest.mark.envoy
async def test_envoy_claiming_another_group_gets_permission_denied(
    tmp_path: Path, pki: Pki, plane: ControlPlane
):
    tls = pki.client_tls(pki.edge, tmp_path / "sds")
    assert await _refused_envoy(plane, tmp_path, tls, "internal") == []
    assert plane.registry.refused["identity"] >= 1
    [refusal, *_] = plane.registry.recent_refusals
    assert refusal["identities"] == [EDGE_ID] and refusal["node_cluster"] == "internal"
    assert plane.lrs.refused.get("identity", 0) >= 1  # its LRS stream too


async def test_a_client_without_a_certificate_or_plaintext_is_refused(
    pki: Pki, plane: ControlPlane
):
    target = f"127.0.0.1:{plane.xds_port}"
    for credentials in (pki.credentials(None), None):
        async with SotwClient(target, node("n", "edge"), credentials=credentials) as client:
            client.request(typeurls.CLUSTER)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.recv()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(plane.registry) == 0


async def test_a_certificate_claiming_another_group_gets_no_resource(pki: Pki, plane: ControlPlane):
    target = f"127.0.0.1:{plane.xds_port}"
    creds = pki.credentials(pki.edge)
    async with SotwClient(target, node("sneaky", "internal"), credentials=creds) as client:
        client.request(typeurls.CLUSTER)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.recv()
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert EDGE_ID in (raised.value.details() or "")
    # Operators see it: the admin API names the node, its claim and its identity; metrics count.
    async with aiohttp.ClientSession() as session:
        admin = f"http://127.0.0.1:{plane.admin_port}"
        async with session.get(f"{admin}/api/v1/nodes") as response:
            [refusal] = (await response.json())["refused"]
        async with session.get(f"{admin}/metrics") as response:
            metrics = await response.text()
    assert refusal["node_id"] == "sneaky" and refusal["identities"] == [EDGE_ID]
    assert refusal["reason"] == "identity" and refusal["node_cluster"] == "internal"
    assert 'xds_client_refused_total{reason="identity",service="xds"} 1.0' in metrics
    # The same certificate for its own group is served.
    async with SotwClient(target, node("fine", "edge"), credentials=creds) as client:
        client.request(typeurls.CLUSTER)
        response = await client.recv()
        assert response.resources
    # And an identity the internal group names may claim it.
    internal = pki.credentials(pki.internal)
    async with SotwClient(target, node("in", "internal"), credentials=internal) as client:
        client.request(typeurls.CLUSTER)
        assert (await client.recv()).resources


async def test_lrs_refuses_a_node_claiming_another_group(pki: Pki, plane: ControlPlane):
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{plane.xds_port}", pki.credentials(pki.edge)
    ) as channel:
        call = channel.stream_stream(
            "/envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats",
            request_serializer=raw_bytes,
            response_deserializer=lrs_pb2.LoadStatsResponse.FromString,
        )()
        request = lrs_pb2.LoadStatsRequest()
        request.node.id, request.node.cluster = "sneaky", "internal"
        await call.write(request.SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(call.read(), 5)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert plane.lrs.refused == {"identity": 1}
    assert plane.lrs.connected_reporters == 0


def _served_serial(port: int, pki: Pki) -> int:
    """The serial number of the certificate a new TLS connection to the port is shown."""
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.load_cert_chain(str(pki.edge.cert), str(pki.edge.key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _replace(target: Path, source: Path) -> None:
    """Rotate the way cert-manager and SPIRE do: write beside, rename over."""
    staged = target.with_suffix(".new")
    staged.write_bytes(source.read_bytes())
    staged.replace(target)


async def test_rotated_server_certificate_is_used_by_new_connections(
    tmp_path: Path, pki: Pki, plane: ControlPlane
):
    port = plane.xds_port
    before = await asyncio.to_thread(_served_serial, port, pki)
    target = f"127.0.0.1:{port}"
    creds = pki.credentials(pki.edge)
    async with SotwClient(target, node("steady", "edge"), credentials=creds) as steady:
        steady.request(typeurls.CLUSTER)
        first = await steady.recv()
        fresh = pki.ca.server("xds-server-2")
        _replace(pki.server.key, fresh.key)
        _replace(pki.server.cert, fresh.cert)
        after = await asyncio.to_thread(_served_serial, port, pki)
        assert after != before
        assert after == x509.load_pem_x509_certificate(fresh.cert.read_bytes()).serial_number
        assert plane.tls is not None and plane.tls.reloads == 1
        # The connection opened before the rotation keeps being served.
        steady.ack(first)
        await steady.expect_silence(0.2)
        assert len(plane.registry.by_node("steady")) == 1
    # New clients connect with the new certificate.
    async with SotwClient(target, node("new", "edge"), credentials=creds) as client:
        client.request(typeurls.CLUSTER)
        assert (await client.recv()).resources


async def test_half_written_certificate_keeps_the_last_good_one(pki: Pki, plane: ControlPlane):
    port = plane.xds_port
    before = await asyncio.to_thread(_served_serial, port, pki)
    pki.server.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")  # an editor mid-write
    assert await asyncio.to_thread(_served_serial, port, pki) == before
    assert plane.tls is not None and plane.tls.reload_failures == 1


@pytest.mark.envoy
async def test_body_routing_reaches_the_in_process_router_over_mtls(
    tmp_path: Path, pki: Pki, upstream
):
    """With TLS on, the router's port speaks mTLS too; Envoy reaches it with the client
    certificate of its bootstrap (body_router.tls_sds_dir names that SDS folder)."""
    listener_port = free_port()
    sds = tmp_path / "sds"
    tls = pki.client_tls(pki.edge, sds)
    path = snapshot(tmp_path / "s.yaml", upstream.port, listener_port)
    document = yaml.safe_load(path.read_text())
    document["listeners"][0]["routes"] = [{"model": "llama-3-8b", "pool": "llama"}]
    document["body_router"] = {"tls_sds_dir": str(sds)}
    path.write_text(yaml.safe_dump(document))
    rig = PlaneWithEnvoy(
        local_settings(path, tls=pki.files()), tmp_path, "envoy-edge", node_cluster="edge", tls=tls
    )
    async with rig, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{listener_port}/v1/completions"
        async with session.post(url, json={"model": "llama-3-8b", "prompt": "hi"}) as response:
            assert response.status == 200, await response.text()
        async with session.post(url, json={"model": "unknown", "prompt": "hi"}) as response:
            assert response.status == 404  # the router answered: it was reached
        # Plaintext to the router's port is refused.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rig.plane.router_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary("/x.Y/Z")(b"", timeout=2)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
