"""Reaching the Kubernetes API: where it is and who we are (as kubectl finds out), and HTTP.

`discover()` finds the cluster as kubectl does: inside a pod, the service account (token
and CA under /var/run/secrets/kubernetes.io/serviceaccount, the API at
KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT); else the kubeconfig files of
`$KUBECONFIG` (merged, the first to set a value wins) or `~/.kube/config`, at their current
context: server, CA (file or data), insecure-skip-tls-verify, and the user's token,
tokenFile, client certificate and key (files or data) or exec credential plugin.

`ApiClient` is the little HTTP the control plane needs, on aiohttp (already on its loop):
GET a list, stream a watch (one JSON event a line), merge-patch a status. The service
account's token is re-read from its file every minute: the kubelet rotates it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml

__all__ = [
    "SERVICE_ACCOUNT",
    "Access",
    "ApiClient",
    "ApiError",
    "KubernetesConfigError",
    "Resource",
    "discover",
    "from_kubeconfig",
    "in_cluster",
]

SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Seconds a token read from a file is used before the file is read again.
TOKEN_REREAD: Final = 60.0


class KubernetesConfigError(Exception):
    """No usable way to reach the cluster (no service account, no kubeconfig, a bad one)."""


class ApiError(Exception):
    """The API server answered with an error status (its Status object's code and reason)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Resource:
    """A namespaced API collection: `prefix` (`/api/v1`, `/apis/GROUP/VERSION`), `plural`."""

    prefix: str
    plural: str

    def path(self, namespace: str, name: str = "") -> str:
        base = f"{self.prefix}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{name}" if name else base


@dataclass(frozen=True, slots=True)
class Access:
    """How to reach one API server and authenticate to it."""

    server: str
    source: str  # where this came from, for logs and /healthz
    ca_file: Path | None = None
    ca_data: str | None = None  # PEM
    insecure: bool = False
    token: str | None = None
    token_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    exec_spec: Mapping[str, Any] | None = None
    namespace: str = "default"


def in_cluster(
    environ: Mapping[str, str] | None = None, service_account: Path = SERVICE_ACCOUNT
) -> Access:
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    token = service_account / "token"
    if not host or not port or not token.is_file():
        raise KubernetesConfigError(f"not in a pod: needs KUBERNETES_SERVICE_HOST/PORT and {token}")
    if ":" in host:
        host = f"[{host}]"
    namespace_file = service_account / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else "default"
    ca = service_account / "ca.crt"
    return Access(
        server=f"https://{host}:{port}",
        source=f"in-cluster service account {service_account}",
        ca_file=ca if ca.is_file() else None,
        token_file=token,
        namespace=namespace,
    )


def _load_kubeconfigs(paths: list[Path]) -> dict[str, Any]:
    """kubectl's merge: named entries and current-context, the first file to give one wins."""
    merged: dict[str, Any] = {"clusters": {}, "users": {}, "contexts": {}}
    for path in paths:
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise KubernetesConfigError(f"cannot read kubeconfig {path}: {err}") from err
        if not isinstance(document, dict):
            raise KubernetesConfigError(f"kubeconfig {path} is not a mapping")
        for section, inner in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for entry in document.get(section) or []:
                if isinstance(entry, dict) and "name" in entry:
                    value = dict(entry.get(inner) or {})
                    value["_dir"] = path.parent
                    merged[section].setdefault(entry["name"], value)
        merged.setdefault("current-context", document.get("current-context") or None)
        if merged["current-context"] is None:
            merged.pop("current-context")
    return merged


def _file(entry: Mapping[str, Any], key: str) -> Path | None:
    value = entry.get(key)
    if not value:
        return None
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else Path(entry["_dir"]) / path


def _data(entry: Mapping[str, Any], key: str) -> bytes | None:
    value = entry.get(key)
    return base64.b64decode(value) if value else None


def from_kubeconfig(paths: list[Path]) -> Access:
    config = _load_kubeconfigs(paths)
    where = os.pathsep.join(map(str, paths))
    name = config.get("current-context")
    context = config["contexts"].get(name) if name else None
    if context is None:
        raise KubernetesConfigError(f"kubeconfig {where}: no current-context {name!r}")
    cluster = config["clusters"].get(context.get("cluster"))
    user = config["users"].get(context.get("user"), {"_dir": "."})
    if cluster is None or not cluster.get("server"):
        raise KubernetesConfigError(f"kubeconfig {where}: context {name!r} names no server")
    ca_data = _data(cluster, "certificate-authority-data")
    token = user.get("token")
    return Access(
        server=str(cluster["server"]).rstrip("/"),
        source=f"kubeconfig {where} (context {name})",
        ca_file=_file(cluster, "certificate-authority"),
        ca_data=ca_data.decode() if ca_data else None,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=str(token) if token else None,
        token_file=_file(user, "tokenFile"),
        cert_file=_file(user, "client-certificate"),
        key_file=_file(user, "client-key"),
        cert_data=_data(user, "client-certificate-data"),
        key_data=_data(user, "client-key-data"),
        exec_spec=user.get("exec"),
        namespace=str(context.get("namespace") or "default"),
    )


def discover(
    kubeconfig: Path | None = None,
    environ: Mapping[str, str] | None = None,
    service_account: Path = SERVICE_ACCOUNT,
    home: Path | None = None,
) -> Access:
    """`kubeconfig` if given; else in-cluster, `$KUBECONFIG`, `~/.kube/config`, as kubectl."""
    env = os.environ if environ is None else environ
    if kubeconfig is not None:
        return from_kubeconfig([kubeconfig])
    if env.get("KUBERNETES_SERVICE_HOST") and (service_account / "token").is_file():
        return in_cluster(env, service_account)
    if env.get("KUBECONFIG"):
        paths = [Path(p) for p in env["KUBECONFIG"].split(os.pathsep) if p]
        existing = [p for p in paths if p.is_file()]
        if existing:
            return from_kubeconfig(existing)
    default = (home or Path.home()) / ".kube" / "config"
    if default.is_file():
        return from_kubeconfig([default])
    raise KubernetesConfigError(
        f"--kubernetes: no cluster found: not in a pod ({service_account}/token and "
        "KUBERNETES_SERVICE_HOST), and no kubeconfig ($KUBECONFIG, ~/.kube/config)"
    )


def _ssl_context(access: Access) -> ssl.SSLContext | bool:
    if not access.server.startswith("https:"):
        return False
    if access.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif access.ca_file is not None or access.ca_data is not None:
        context = ssl.create_default_context(
            cafile=str(access.ca_file) if access.ca_file else None, cadata=access.ca_data
        )
    else:
        context = ssl.create_default_context()
    if access.cert_file is not None or access.cert_data is not None:
        with tempfile.TemporaryDirectory() as folder:  # load_cert_chain reads files only
            cert, key = access.cert_file, access.key_file
            if access.cert_data is not None:
                cert = Path(folder) / "tls.crt"
                cert.write_bytes(access.cert_data)
            if access.key_data is not None:
                key = Path(folder) / "tls.key"
                key.write_bytes(access.key_data)
            context.load_cert_chain(str(cert), str(key) if key else None)
    return context


class ApiClient:
    """GET, watch and merge-patch against one API server; `start()` before use."""

    def __init__(self, access: Access) -> None:
        self.access = access
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = access.token
        self._token_until = 0.0 if access.token is None else float("inf")

    async def start(self) -> None:
        context = await asyncio.to_thread(_ssl_context, self.access)
        connector = aiohttp.TCPConnector(ssl=context, limit=0)
        self._session = aiohttp.ClientSession(
            self.access.server, connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _headers(self) -> dict[str, str]:
        if time.monotonic() >= self._token_until:
            await self._refresh_token()
        headers = {"Accept": "application/json", "User-Agent": "xds-server"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def _refresh_token(self) -> None:
        if self.access.token_file is not None:
            text = await asyncio.to_thread(self.access.token_file.read_text)
            self._token, self._token_until = text.strip(), time.monotonic() + TOKEN_REREAD
        elif self.access.exec_spec is not None:
            self._token, self._token_until = await _exec_credential(self.access.exec_spec)
        else:
            self._token_until = float("inf")

    def _require(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ApiClient.start() was not called")
        return self._session

    async def get(self, path: str, params: Mapping[str, str], timeout: float = 60.0) -> Any:
        session = self._require()
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with session.get(
            path, params=params, headers=await self._headers(), timeout=client_timeout
        ) as resp:
            return await _answer(resp, self)

    async def watch(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        """Events of a watch until the server ends it; ApiError for an error status, and
        aiohttp/Timeout errors when the connection breaks or stays silent `read_timeout`."""
        session = self._require()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout)
        async with session.get(
            path, params=params, headers=await self._headers(), timeout=timeout
        ) as resp:
            if resp.status != 200:
                await _answer(resp, self)
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> Any:
        session = self._require()
        headers = {**await self._headers(), "Content-Type": "application/merge-patch+json"}
        async with session.patch(
            path, data=json.dumps(body), headers=headers, timeout=aiohttp.ClientTimeout(total=30)
        ) as resp:
            return await _answer(resp, self)


async def _answer(resp: aiohttp.ClientResponse, client: ApiClient | None = None) -> Any:
    text = await resp.text()
    if 200 <= resp.status < 300:
        return json.loads(text)
    if resp.status == 401 and client is not None:
        client._token_until = 0.0  # a rotated token: read the file (or run exec) again
    try:
        status = json.loads(text)
    except ValueError:
        status = {}
    if not isinstance(status, dict):
        status = {}
    raise ApiError(
        resp.status, str(status.get("reason") or resp.reason), str(status.get("message") or text)
    )


async def _exec_credential(spec: Mapping[str, Any]) -> tuple[str | None, float]:
    """Run a kubeconfig `exec` plugin (client.authentication.k8s.io ExecCredential) for a
    token; used until its expirationTimestamp (or for an hour)."""
    env = dict(os.environ)
    env.update({str(e["name"]): str(e["value"]) for e in spec.get("env") or []})
    info = {"apiVersion": spec.get("apiVersion"), "kind": "ExecCredential"}
    env["KUBERNETES_EXEC_INFO"] = json.dumps({**info, "spec": {"interactive": False}})
    process = await asyncio.create_subprocess_exec(
        str(spec["command"]),
        *map(str, spec.get("args") or []),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise KubernetesConfigError(f"exec credential plugin failed: {err.decode().strip()}")
    status = json.loads(out).get("status") or {}
    until = time.monotonic() + 3600
    if status.get("expirationTimestamp"):
        expires = datetime.fromisoformat(str(status["expirationTimestamp"]).replace("Z", "+00:00"))
        until = time.monotonic() + max(expires.timestamp() - time.time() - 30, 0)
    return status.get("token"), until
