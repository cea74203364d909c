"""Shared pieces of the Kubernetes tests: a kubeconfig for the fake API server, waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import yaml

from xds_lab.kube_api import FakeKubernetes
from xds_server.kubernetes.source import KubernetesOptions
from xds_server.kubernetes.watch import WatchTiming

TOKEN = "test-token-0123456789"
NS = "serving"
#: Short enough that a test sees every path (server timeouts, back-off) within a second.
FAST = WatchTiming(timeout=(5.0, 5.0), read_slack=2.0, backoff=(0.05, 0.3))


def write_kubeconfig(folder: Path, server: FakeKubernetes, token: str = TOKEN) -> Path:
    """A kubeconfig pointing at the fake API server with a bearer token, as kubectl has."""
    path = folder / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
                "users": [{"name": "tester", "user": {"token": token}}],
                "contexts": [
                    {"name": "test", "context": {"cluster": "fake", "user": "tester"}},
                ],
                "current-context": "test",
            }
        )
    )
    return path


def options(kubeconfig: Path, **overrides: object) -> KubernetesOptions:
    base: dict[str, object] = {"kubeconfig": kubeconfig, "timing": FAST, "sync_timeout": 5.0}
    return KubernetesOptions(**{**base, **overrides})  # type: ignore[arg-type]


async def until(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)
