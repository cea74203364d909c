"""A real control plane with its admin API on ephemeral ports, a JSON client for it, readers of
what it serves (config dump, /metrics) and LRS reports to feed it load."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from envoy.service.load_stats.v3 import lrs_pb2
from prometheus_client.parser import text_string_to_metric_families

from xds_lab.envoy_rig import local_settings, one_pool_snapshot
from xds_server.app import ControlPlane, Settings

TOKEN = "test-token-0123456789-abcdefghijklmnopqrstuvwxyz"  # over MIN_TOKEN_LENGTH
KV = "named_metrics.kv_cache_usage_perc"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def snapshot_doc(ports: list[int], listener_port: int = 10000) -> dict[str, Any]:
    """One listener routing everything to pool `llama`, endpoints on 127.0.0.1 in two zones."""
    endpoints = [
        {"address": "127.0.0.1", "port": p, "zone": f"zone-{i % 2}"} for i, p in enumerate(ports)
    ]
    return one_pool_snapshot(listener_port, {"name": "llama", "endpoints": endpoints})


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    """Replace the snapshot file in one rename, as editors do, so the watcher never reads half."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)


@dataclass
class Admin:
    """JSON calls to one admin server; `token` goes in the Authorization header if set."""

    session: aiohttp.ClientSession
    base: str
    token: str | None = TOKEN
    headers: dict[str, str] = field(default_factory=dict)

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = ..., **kwargs: Any
    ) -> tuple[int, Any]:
        """(status, parsed JSON); token=None sends no Authorization header."""
        token = self.token if token is ... else token
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if body is not None:
            kwargs["json"] = body
        async with self.session.request(
            method, self.base + path, headers=headers, **kwargs
        ) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str) -> Any:
        status, data = await self.call("GET", path)
        assert status == 200, (path, status, data)
        return data

    async def endpoints(self, pool: str = "llama") -> dict[str, dict[str, Any]]:
        data = await self.get(f"/api/v1/pools/{pool}/endpoints")
        return {e["key"]: e for e in data["endpoints"]}


def plane_settings(path: Path, **overrides: Any) -> Settings:
    """Ephemeral ports everywhere and a fast watcher."""
    return local_settings(path, **{"watch_interval": 0.05, **overrides})


@contextlib.asynccontextmanager
async def running(
    path: Path, client_tls: ssl.SSLContext | None = None, **overrides: Any
) -> AsyncIterator[tuple[ControlPlane, Admin]]:
    """A started control plane on the snapshot at path, and an admin client for it (over
    HTTPS trusting `client_tls` when given: the plane needs admin_tls_cert/key then)."""
    plane = ControlPlane(plane_settings(path, **overrides))
    await plane.start()
    scheme = "https" if client_tls is not None else "http"
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_tls if client_tls is not None else True)
        ) as session:
            yield plane, Admin(session, f"{scheme}://127.0.0.1:{plane.admin_port}")
    finally:
        await plane.stop(0)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def served_endpoints(dump: dict[str, Any], pool: str = "llama") -> dict[str, str]:
    """key -> health_status as the config dump's ClusterLoadAssignment has it."""
    assignment = dump["groups"]["default"]["endpoints"]["resources"][pool]["resource"]
    out = {}
    for locality in assignment.get("endpoints", []):
        for lb in locality["lb_endpoints"]:
            address = lb["endpoint"]["address"]["socket_address"]
            host = address["address"]
            host = f"[{host}]" if ":" in host else host  # IPv6: the admin API's key form
            out[f"{host}:{address['port_value']}"] = lb.get("health_status", "")
    return out


async def scrape(admin: Admin) -> Samples:
    """Every sample of /metrics: (name, labels) -> value (asked with the client's token, which
    reads too when the server wants a token for reads)."""
    headers = {"Authorization": f"Bearer {admin.token}"} if admin.token else {}
    async with admin.session.get(admin.base + "/metrics", headers=headers) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when absent (a counter or gauge never touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def lrs_report(means: dict[int, dict[str, float]], requests: int = 10) -> lrs_pb2.LoadStatsRequest:
    """One Envoy's report of pool llama: per port, `requests` finished, each with these means."""
    request = lrs_pb2.LoadStatsRequest()
    stats = request.cluster_stats.add(cluster_name="llama")
    stats.load_report_interval.FromSeconds(1)
    locality = stats.upstream_locality_stats.add()
    for port, metrics in means.items():
        endpoint = locality.upstream_endpoint_stats.add(
            total_successful_requests=requests, total_issued_requests=requests
        )
        endpoint.address.socket_address.address = "127.0.0.1"
        endpoint.address.socket_address.port_value = port
        for name, mean in metrics.items():
            endpoint.load_metric_stats.add(
                metric_name=name,
                num_requests_finished_with_metric=requests,
                total_metric_value=mean * requests,
            )
    return request
