"""What the weight tests share: a two-endpoint load-weighted pool, load as LRS would bring it,
the weights and health the cache serves for it, and a wait on the engine's published weights."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from envoy.config.endpoint.v3 import endpoint_pb2

from tests.test_lrs_store import KV, endpoint, report
from xds_server.app import ControlPlane
from xds_server.xds import typeurls

A, B = "127.0.0.1:9001", "127.0.0.1:9002"


def published(plane: ControlPlane, pool: str = "llama") -> dict[str, int]:
    """The weights the engine last published for the pool ({} before any)."""
    weights = plane.publisher.weights.get(pool)
    return dict(weights.endpoints) if weights else {}


def explained(plane: ControlPlane, pool: str = "llama") -> dict[str, dict[str, object]]:
    """Why each endpoint has its published weight (the policy's explanation)."""
    weights = plane.publisher.weights.get(pool)
    return {k: dict(v) for k, v in weights.explain.items()} if weights else {}


async def wait_until(
    plane: ControlPlane, predicate: Callable[[], bool], timeout: float, what: str, poll: float
) -> float:
    """Seconds until `predicate` holds; fails naming `what` with the pool's weights and why."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        await asyncio.sleep(poll)
    raise AssertionError(
        f"{what} not reached in {timeout} s; {published(plane)} {explained(plane)}"
    )


#: Weights that react at once: no blackout, no smoothing, pushes every 0.1 s.
FAST = {"blackout": 0, "push_interval": 0.1, "ewma_alpha": 1.0, "hysteresis": 0, "expiry": 30}


def llama_snapshot(path: Path) -> Path:
    """Pool `llama` (weighting orca) of A and B behind one listener."""
    pool = {
        "name": "llama",
        "weighting": "orca",
        "orca": FAST,
        "endpoints": [
            {"address": "127.0.0.1", "port": 9001},
            {"address": "127.0.0.1", "port": 9002},
        ],
    }
    document = {
        "listeners": [{"name": "l", "port": 10000, "routes": [{"prefix": "/", "pool": "llama"}]}],
        "pools": [pool],
    }
    path.write_text(yaml.safe_dump(document))
    return path


def served(plane: ControlPlane) -> tuple[str, dict[str, tuple[int, int]]]:
    """The served EDS version of `llama` and per endpoint (weight, health status)."""
    resource = plane.cache.groups["default"].of_type(typeurls.ENDPOINT).resources["llama"]
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(resource.body)
    endpoints = {}
    for locality in cla.endpoints:
        for lb in locality.lb_endpoints:
            address = lb.endpoint.address.socket_address
            key = f"{address.address}:{address.port_value}"
            endpoints[key] = (lb.load_balancing_weight.value, lb.health_status)
    return resource.version, endpoints


def report_load(plane: ControlPlane, reporter: str, kv_a: float, kv_b: float) -> None:
    """A report of 20 finished requests on each of A and B with these KV-cache fractions."""
    load = report(
        "llama",
        endpoint(A, ok=20, metrics={KV: (20, kv_a * 20)}),
        endpoint(B, ok=20, metrics={KV: (20, kv_b * 20)}),
    )
    plane.store.ingest(reporter, load, time.monotonic())
