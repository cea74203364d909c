"""Bootstraps over mTLS: Envoy's file-based SDS, `xds-server bootstrap --tls-*`, rotation of
Envoy's own client certificate, and a proxyless gRPC client with gRFC A65 `tls` credentials.

Real certificates (xds_lab.certs), the real Envoy 1.40 and the real grpcio xDS client.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509

from xds_lab.certs import Authority, Issued
from xds_lab.envoy_process import find_envoy
from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings, node_in_sync
from xds_server import admission
from xds_server.admission import ClientLimits
from xds_server.app import ControlPlane
from xds_server.bootstrap import (
    CLIENT_CERTIFICATE_SECRET,
    SERVER_CA_SECRET,
    ClientTls,
    envoy_bootstrap,
    grpc_bootstrap,
    render_yaml,
    sds_files,
)
from xds_server.tls import TlsFiles, peer_identities

CLI = [sys.executable, "-m", "xds_server.cli"]
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
EDGE_ID = "spiffe://example.org/ns/edge/sa/envoy"
GRPC_ID = "spiffe://example.org/ns/edge/sa/grpc-client"


# --- helpers -------------------------------------------------------------------------------


def client_tls(root: Path) -> ClientTls:
    """Paths only (no files): certificates in root/certs, SDS files in root/sds."""
    certs = root / "certs"
    return ClientTls(certs / "ca.pem", certs / "tls.crt", certs / "tls.key", root / "sds")


def tls_socket(bootstrap: dict[str, Any]) -> dict[str, Any]:
    [cluster] = bootstrap["static_resources"]["clusters"]
    socket: dict[str, Any] = cluster["transport_socket"]
    return socket


def sds_config(path: Path, watched: Path) -> dict[str, Any]:
    return {
        "path_config_source": {"path": str(path), "watched_directory": {"path": str(watched)}},
        "resource_api_version": "V3",
    }


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def validate(bootstrap_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(bootstrap_path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30, cwd=cwd)


class Pki:
    """A CA and the control plane's certificate; tests issue their client certificates."""

    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder / "ca")
        self.server = self.ca.server()

    def server_files(self) -> TlsFiles:
        return TlsFiles(self.server.cert, self.server.key, self.ca.cert)


def install(issued: Issued, cert: Path, key: Path) -> None:
    """Put a certificate and key in place atomically file by file: each written beside its
    target in the same directory, then renamed over it (the key first)."""
    cert.parent.mkdir(parents=True, exist_ok=True)
    for target, source in ((key, issued.key), (cert, issued.cert)):
        staged = target.with_name(f".{target.name}.tmp")
        staged.write_bytes(source.read_bytes())
        staged.replace(target)


def snapshot(path: Path) -> Path:
    """One listener and pool, served to node group `edge` (node.cluster edge, identities of
    spiffe://example.org/ns/edge/*)."""
    document = {
        "listeners": [
            {
                "name": "inference",
                "address": "127.0.0.1",
                "port": free_port(),
                "routes": [{"prefix": "/", "pool": "llama"}],
            }
        ],
        "pools": [{"name": "llama", "endpoints": [{"address": "127.0.0.1", "port": free_port()}]}],
        "node_groups": [
            {
                "name": "edge",
                "node_clusters": ["edge"],
                "identities": ["spiffe://example.org/ns/edge/*"],
                "listeners": ["inference"],
            }
        ],
    }
    path.write_text(yaml.safe_dump(document))
    return path


async def until(check: Any, timeout: float, what: str) -> Any:
    """Poll check() (sync or async) until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.05)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def seen_serials(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[str, ...] | None]]:
    """(serial, identities) of the client certificate of every stream the server admits.

    The product keeps a client's identities (its SANs), not its certificate, so this
    wraps the one place that reads the auth context (admission's `peer_identities`) and
    parses `x509_pem_cert` there."""
    seen: list[tuple[int, tuple[str, ...] | None]] = []

    def spy(context: Any) -> tuple[str, ...] | None:
        identities = peer_identities(context)
        pem = context.auth_context().get("x509_pem_cert")
        if pem:
            seen.append((serial(pem[0]), identities))
        return identities

    monkeypatch.setattr(admission, "peer_identities", spy)
    return seen


# --- 1. the bootstrap's shape, and Envoy accepts it ------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "xds-server.gateway.svc.cluster.local"])
def test_tls_transport_socket_reads_both_secrets_through_file_sds(tmp_path: Path, host: str):
    tls = client_tls(tmp_path)
    socket = tls_socket(envoy_bootstrap("e1", xds_host=host, tls=tls))
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typed_config"]
    assert context["@type"] == UPSTREAM_TLS
    common = context["common_tls_context"]
    certs_dir = tls.cert.parent
    assert common["tls_certificate_sds_secret_configs"] == [
        {
            "name": "xds_client_certificate",
            "sds_config": sds_config(tmp_path / "sds/xds_client_certificate.sds.json", certs_dir),
        }
    ]
    assert common["validation_context_sds_secret_config"] == {
        "name": "xds_server_ca",
        "sds_config": sds_config(tmp_path / "sds/xds_server_ca.sds.json", certs_dir),
    }
    assert common["alpn_protocols"] == ["h2"]
    # SNI names the server only when it is reached by name: an IP is no SNI host name.
    if host.startswith("xds-server"):
        assert context["sni"] == host
    else:
        assert "sni" not in context
    assert set(common) == {
        "tls_certificate_sds_secret_configs",
        "validation_context_sds_secret_config",
        "alpn_protocols",
    }  # nothing inline: the certificate and CA come from the files only


@pytest.mark.parametrize("name", ["n", "N", "y", "Y"])
def test_yaml_names_envoy_would_read_as_booleans_are_quoted(name: str):
    text = render_yaml(envoy_bootstrap(node_id=name, node_cluster=name))
    assert f"id: '{name}'" in text and f"cluster: '{name}'" in text
    assert yaml.safe_load(text)["node"] == {"id": name, "cluster": name}


def test_without_tls_there_is_no_transport_socket():
    [cluster] = envoy_bootstrap("e1")["static_resources"]["clusters"]
    assert "transport_socket" not in cluster


def test_sds_files_hold_one_secret_each_naming_the_pem_files(tmp_path: Path):
    tls = client_tls(tmp_path)
    files = sds_files(tls)
    certificate = tmp_path / "sds/xds_client_certificate.sds.json"
    ca = tmp_path / "sds/xds_server_ca.sds.json"
    assert set(files) == {certificate, ca}
    assert json.loads(files[certificate]) == {
        "resources": [
            {
                "@type": SECRET,
                "name": CLIENT_CERTIFICATE_SECRET,
                "tls_certificate": {
                    "certificate_chain": {"filename": str(tls.cert)},
                    "private_key": {"filename": str(tls.key)},
                },
            }
        ]
    }
    assert json.loads(files[ca]) == {
        "resources": [
            {
                "@type": SECRET,
                "name": SERVER_CA_SECRET,
                "validation_context": {"trusted_ca": {"filename": str(tls.ca)}},
            }
        ]
    }
    # Each secret config in the bootstrap points at the file that holds the secret it names.
    common = tls_socket(envoy_bootstrap("e1", tls=tls))["typed_config"]["common_tls_context"]
    for config in (
        *common["tls_certificate_sds_secret_configs"],
        common["validation_context_sds_secret_config"],
    ):
        path = Path(config["sds_config"]["path_config_source"]["path"])
        [resource] = json.loads(files[path])["resources"]
        assert resource["name"] == config["name"]


def write_client_files(pki: Pki, root: Path) -> ClientTls:
    """A client certificate installed in root/certs and its SDS files in root/sds."""
    tls = ClientTls(pki.ca.cert, root / "certs/tls.crt", root / "certs/tls.key", root / "sds")
    install(pki.ca.issue("client", uris=(EDGE_ID,)), tls.cert, tls.key)
    tls.sds_dir.mkdir(parents=True, exist_ok=True)
    for path, text in sds_files(tls).items():
        path.write_text(text)
    return tls


@pytest.mark.envoy
@pytest.mark.parametrize(
    "options",
    [{"delta": False}, {"delta": True, "xds_host": "xds-server.example.internal"}],
    ids=["sotw-ip", "delta-hostname"],
)
def test_real_envoy_accepts_the_tls_bootstrap(tmp_path: Path, pki: Pki, options: dict[str, Any]):
    tls = write_client_files(pki, tmp_path)
    path = tmp_path / "bootstrap.yaml"
    path.write_text(render_yaml(envoy_bootstrap("envoy-1", tls=tls, **options)))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    # Validation does look at the SDS files: without them the same bootstrap is refused.
    for sds in sds_files(tls):
        sds.unlink()
    result = validate(path)
    assert result.returncode != 0
    assert "xds_client_certificate.sds.json' does not exist" in result.stdout + result.stderr


def test_grpc_bootstrap_has_the_a65_shape(tmp_path: Path):
    tls = client_tls(tmp_path)
    boot = grpc_bootstrap("g1", "edge", [("127.0.0.1", 18000), ("::1", 18001)], tls)
    files = {
        "ca_certificate_file": str(tls.ca),
        "certificate_file": str(tls.cert),
        "private_key_file": str(tls.key),
        "refresh_interval": "60s",
    }
    assert boot == {
        "xds_servers": [
            {
                "server_uri": uri,
                "channel_creds": [{"type": "tls", "config": files}],
                "server_features": ["xds_v3"],
            }
            for uri in ("127.0.0.1:18000", "[::1]:18001")
        ],
        "node": {"id": "g1", "cluster": "edge"},
        "certificate_providers": {"default": {"plugin_name": "file_watcher", "config": files}},
    }
    plain = grpc_bootstrap("g1", "edge", [("127.0.0.1", 18000)])
    assert plain["xds_servers"][0]["channel_creds"] == [{"type": "insecure"}]
    assert "certificate_providers" not in plain


# --- 2. xds-server bootstrap --tls-* -----------------------------------------------------------


@pytest.fixture
def client_pem(pki: Pki) -> Issued:
    return pki.ca.issue("cli-client", uris=(EDGE_ID,))


def tls_flags(pki: Pki, issued: Issued) -> list[str]:
    return [
        "--tls-ca",
        str(pki.ca.cert),
        "--tls-cert",
        str(issued.cert),
        "--tls-key",
        str(issued.key),
    ]


def test_cli_writes_the_sds_files_and_prints_a_bootstrap_that_reads_them(
    tmp_path: Path, pki: Pki, client_pem: Issued
):
    sds_dir = tmp_path / "sds"  # does not exist yet: the CLI makes it
    result = run_cli(
        "bootstrap", "--node-id", "n", *tls_flags(pki, client_pem), "--sds-dir", str(sds_dir)
    )
    assert result.returncode == 0, result.stderr
    written = {sds_dir / "xds_client_certificate.sds.json", sds_dir / "xds_server_ca.sds.json"}
    assert set(sds_dir.iterdir()) == written
    for path in written:
        assert f"wrote {path}" in result.stderr
    tls = ClientTls(pki.ca.cert, client_pem.cert, client_pem.key, sds_dir)
    assert {p: p.read_text() for p in written} == sds_files(tls)
    boot = yaml.safe_load(result.stdout)
    assert boot == envoy_bootstrap("n", tls=tls)
    assert result.stdout.startswith("# Envoy bootstrap for xds-server")


@pytest.mark.envoy
@pytest.mark.parametrize("name", ["n", "Y"])
def test_cli_bootstrap_for_a_yaml_boolean_name_is_accepted_by_envoy(
    tmp_path: Path, pki: Pki, client_pem: Issued, name: str
):
    """Envoy reads YAML with yaml-cpp, for which y/n in any case are booleans: `id: n`
    would be `node.id: false` and refused, so the CLI must quote such names."""
    sds_dir = tmp_path / "sds"
    result = run_cli(
        "bootstrap", "--node-id", name, "--cluster", name, *tls_flags(pki, client_pem),
        "--sds-dir", str(sds_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["node"] == {"id": name, "cluster": name}
    path = tmp_path / "bootstrap.yaml"
    path.write_text(result.stdout)
    check = validate(path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_cli_makes_relative_paths_absolute_and_defaults_sds_dir_to_the_cert_dir(
    tmp_path: Path, pki: Pki
):
    (tmp_path / "certs").mkdir()
    install(pki.ca.issue("rel", uris=(EDGE_ID,)), tmp_path / "certs/tls.crt", tmp_path / "certs/k")
    (tmp_path / "certs/ca.pem").write_bytes(pki.ca.cert.read_bytes())
    flags = ["--tls-ca", "certs/ca.pem", "--tls-cert", "certs/tls.crt", "--tls-key", "certs/k"]
    result = run_cli("bootstrap", "--node-id", "n", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    certs = tmp_path.resolve() / "certs"
    tls = ClientTls(certs / "ca.pem", certs / "tls.crt", certs / "k", certs)
    assert yaml.safe_load(result.stdout) == envoy_bootstrap("n", tls=tls)
    assert json.loads((certs / "xds_client_certificate.sds.json").read_text()) == json.loads(
        sds_files(tls)[tls.sds_path(CLIENT_CERTIFICATE_SECRET)]
    )


@pytest.mark.parametrize("left_out", ["--tls-ca", "--tls-cert", "--tls-key"])
def test_cli_wants_all_three_tls_flags(tmp_path: Path, pki: Pki, client_pem: Issued, left_out: str):
    flags = tls_flags(pki, client_pem)
    at = flags.index(left_out)
    del flags[at : at + 2]
    result = run_cli("bootstrap", "--node-id", "n", *flags, "--sds-dir", str(tmp_path / "sds"))
    assert result.returncode == 2
    assert "give all of --tls-ca, --tls-cert and --tls-key" in result.stderr
    assert result.stdout == "" and not (tmp_path / "sds").exists()


@pytest.mark.parametrize("which", ["--tls-ca", "--tls-cert", "--tls-key"])
def test_cli_names_a_missing_file(tmp_path: Path, pki: Pki, client_pem: Issued, which: str):
    flags = tls_flags(pki, client_pem)
    missing = tmp_path / "nowhere" / "gone.pem"
    flags[flags.index(which) + 1] = str(missing)
    result = run_cli("bootstrap", "--node-id", "n", *flags, "--sds-dir", str(tmp_path / "sds"))
    assert result.returncode == 2
    assert f"no such file: {missing}" in result.stderr
    assert result.stdout == "" and not (tmp_path / "sds").exists()


def test_cli_grpc_prints_an_a65_bootstrap_and_writes_no_sds_file(
    tmp_path: Path, pki: Pki, client_pem: Issued
):
    sds_dir = tmp_path / "sds"
    result = run_cli(
        "bootstrap",
        "--node-id",
        "g1",
        "--cluster",
        "edge",
        "--xds-address",
        "xds.example:443",
        "--grpc",
        *tls_flags(pki, client_pem),
        "--sds-dir",
        str(sds_dir),
    )
    assert result.returncode == 0, result.stderr
    boot = json.loads(result.stdout)
    [server] = boot["xds_servers"]
    assert server["server_uri"] == "xds.example:443"
    assert server["server_features"] == ["xds_v3"]
    [creds] = server["channel_creds"]
    files = {
        "ca_certificate_file": str(pki.ca.cert.resolve()),
        "certificate_file": str(client_pem.cert.resolve()),
        "private_key_file": str(client_pem.key.resolve()),
        "refresh_interval": "60s",
    }
    assert creds == {"type": "tls", "config": files}
    assert boot["certificate_providers"]["default"] == {
        "plugin_name": "file_watcher",
        "config": files,
    }
    assert boot["node"] == {"id": "g1", "cluster": "edge"}
    assert not sds_dir.exists()


# --- 3. Envoy follows a rotation of its own client certificate --------------------------------


async def envoy_cert_serials(admin_url: str) -> set[int]:
    """Serial numbers of the client certificates Envoy's admin /certs lists as loaded."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{admin_url}/certs") as response:
            certs = await response.json()
    return {
        int(chain["serial_number"], 16)
        for entry in certs.get("certificates", [])
        for chain in entry.get("cert_chain", [])
    }


async def envoy_logging(admin_url: str, **levels: str) -> None:
    paths = ",".join(f"{name}:{level}" for name, level in levels.items())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{admin_url}/logging", params={"paths": paths}) as response:
            assert response.status == 200


def rename_each_file(issued: Issued, tls: ClientTls, generation: str) -> None:
    """Rotate file by file: the new key, then the new certificate, each renamed over."""
    install(issued, tls.cert, tls.key)


def swap_secret_volume(issued: Issued, tls: ClientTls, generation: str) -> None:
    """Rotate as the kubelet updates a mounted Secret: tls.crt and tls.key are symlinks
    through `..data` to a timestamped directory, and one rename swaps `..data`."""
    folder = tls.cert.parent
    data = folder / f"..{generation}"
    data.mkdir(parents=True)
    (data / tls.cert.name).write_bytes(issued.cert.read_bytes())
    (data / tls.key.name).write_bytes(issued.key.read_bytes())
    staged = folder / "..data_tmp"
    staged.symlink_to(data.name)
    staged.replace(folder / "..data")
    for path in (tls.cert, tls.key):
        if not path.is_symlink():
            path.symlink_to(f"..data/{path.name}")


@pytest.mark.envoy
@pytest.mark.parametrize("rotate", [rename_each_file, swap_secret_volume])
async def test_envoy_presents_its_rotated_client_certificate_on_its_next_connection(
    tmp_path: Path,
    pki: Pki,
    seen_serials: list[tuple[int, tuple[str, ...] | None]],
    rotate: Any,
):
    certs = tmp_path / "certs"
    tls = ClientTls(pki.ca.cert, certs / "tls.crt", certs / "tls.key", tmp_path / "sds")
    first = pki.ca.issue("envoy-1", uris=(EDGE_ID,))
    rotate(first, tls, "1")
    tls.sds_dir.mkdir()
    for path, text in sds_files(tls).items():
        path.write_text(text)
    # Connections are recycled every ~2 s, so Envoy reconnects soon after the rotation.
    limits = ClientLimits(max_connection_age=2, max_connection_age_grace=1)
    settings = local_settings(snapshot(tmp_path / "s.yaml"), tls=pki.server_files(), limits=limits)
    rig = PlaneWithEnvoy(settings, tmp_path / "envoy", "envoy-edge", node_cluster="edge", tls=tls)
    async with rig:
        assert rig.envoy is not None
        admin = rig.envoy.admin_url
        await envoy_logging(admin, secret="debug", config="debug")
        old = serial(first.cert.read_bytes())
        assert await envoy_cert_serials(admin) == {old}
        assert {s for s, _ in seen_serials} == {old}
        [client, *_] = rig.plane.registry.by_node("envoy-edge")
        assert client.identities == (EDGE_ID,)

        second = pki.ca.issue("envoy-2", uris=(EDGE_ID,), dns=("rotated.edge.example",))
        new = serial(second.cert.read_bytes())
        assert new != old
        rotate(second, tls, "2")
        try:
            # Envoy took the new files (its admin lists the new serial) ...
            await until(lambda: _has(admin, new), 5, "Envoy lists the new certificate")
            # ... and the server sees them on Envoy's next connection: the serial, and the
            # DNS SAN the new certificate adds to the identities the registry keeps.
            await until(lambda: new in {s for s, _ in seen_serials}, 8, "server saw new serial")
            await until(
                lambda: any(
                    c.identities == (EDGE_ID, "rotated.edge.example")
                    for c in rig.plane.registry.by_node("envoy-edge")
                ),
                5,
                "registry shows the new certificate's identities",
            )
        except AssertionError as err:
            raise AssertionError(f"{err}; Envoy log:\n{_tail(rig.envoy.log_path)}") from err
        # Still served: the rotated certificate is one the CA signed for the same group.
        await until(lambda: node_in_sync(rig.plane, "envoy-edge"), 5, "Envoy in sync")
        stats = await rig.envoy.stats(filter=r"^sds\.xds_client_certificate\.")
    assert stats["sds.xds_client_certificate.update_success"] >= 2, stats
    assert stats["sds.xds_client_certificate.update_rejected"] == 0, stats
    if rotate is swap_secret_volume:
        # One rename swaps both files: Envoy never reads a new key beside the old
        # certificate. (Renaming the files one by one may: key_rotation_failed counts the
        # mismatched pair Envoy refused, keeping the old one until the second rename.)
        assert stats["sds.xds_client_certificate.key_rotation_failed"] == 0, stats


async def _has(admin_url: str, serial_number: int) -> bool:
    return serial_number in await envoy_cert_serials(admin_url)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --- 4. a proxyless gRPC client over mTLS -------------------------------------------------------

# Run in a child: GRPC_XDS_BOOTSTRAP is read once, when grpc's xDS client is first created.
# It prints how its one call ended, then keeps the channel (and its ADS stream) open until
# its stdin closes, so the test looks at the server's side however slowly the child starts.
GRPC_CHILD = """
import sys, grpc
channel = grpc.insecure_channel("xds:///some-listener")
try:
    channel.unary_unary("/example.Echo/Echo")(b"", timeout=float(sys.argv[1]))
    print("OK", flush=True)
except grpc.RpcError as err:
    print(err.code().name, err.details(), flush=True)
sys.stdin.read()
channel.close()
"""
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


@pytest.fixture
async def plane(tmp_path: Path, pki: Pki) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(local_settings(snapshot(tmp_path / "s.yaml"), tls=pki.server_files()))
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop(0)


async def test_proxyless_grpc_client_connects_over_mtls_with_a65_credentials(
    tmp_path: Path, pki: Pki, plane: ControlPlane
):
    issued = pki.ca.issue("grpc-client", uris=(GRPC_ID,))
    tls = ClientTls(pki.ca.cert, issued.cert, issued.key, tmp_path / "unused")
    path = tmp_path / "grpc-bootstrap.json"
    boot = grpc_bootstrap("grpc-1", "edge", [("127.0.0.1", plane.xds_port)], tls)
    path.write_text(json.dumps(boot))
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(path), "GRPC_VERBOSITY": "error"}
    child = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", GRPC_CHILD, "2"),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        clients = await until(
            lambda: plane.registry.by_node("grpc-1"), 10, "gRPC client in the registry"
        )
        assert len(clients) == 1, [c.to_json(plane.cache.group_for("edge")) for c in clients]
        [client] = clients
        # Its client certificate was verified: the registry holds its SPIFFE ID.
        assert client.identities == (GRPC_ID,)
        assert client.protocol == "sotw" and client.user_agent.startswith("gRPC")
        # It asked for the listener by name and ACKed the answer, which holds nothing: the
        # server builds no api_listener resources, so proxyless clients get no routes.
        status = await until(lambda: client.types.get(LISTENER), 5, "listener subscription")
        await until(lambda: status.acked_version, 5, "gRPC client ACKs the listener response")
        assert status.subscribed == ["some-listener"] and status.last_nack is None
        # Its group is resolved when it is first answered (the registry lists a stream as
        # soon as its node is known, a moment before that).
        assert (client.node_cluster, client.group, client.service) == ("edge", "edge", "ads")
        # So its call waits for a configuration that never comes, until its deadline.
        line = (await asyncio.wait_for(child.stdout.readline(), 10)).decode()
        assert line.startswith("DEADLINE_EXCEEDED"), line
    except Exception as failure:
        if child.returncode is None:
            child.kill()
        _, err = await child.communicate()
        failure.add_note(f"gRPC client's stderr:\n{err.decode(errors='replace')}")
        raise
    finally:
        if child.returncode is None:
            child.stdin.close()
            try:
                await asyncio.wait_for(child.communicate(), 10)
            finally:
                if child.returncode is None:
                    child.kill()
    assert plane.registry.refused == {}
