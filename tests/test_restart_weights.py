"""A restarted control plane (`--state FILE`) serves the weights it had, not static ones.

Real ControlPlanes; load goes into the real store as LRS reports would bring it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import yaml
from envoy.config.endpoint.v3 import endpoint_pb2

from tests.test_lrs_store import KV, endpoint, report
from xds_lab.envoy_rig import local_settings
from xds_server.app import ControlPlane
from xds_server.xds import typeurls

A, B = "127.0.0.1:9001", "127.0.0.1:9002"


def _snapshot(path: Path) -> Path:
    pool = {
        "name": "llama",
        "weighting": "orca",
        "orca": {"blackout": 0, "push_interval": 0.1, "ewma_alpha": 1.0, "expiry": 30},
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


def _served_weights(plane: ControlPlane) -> dict[str, int]:
    """The endpoint weights in the ClusterLoadAssignment the cache serves."""
    resource = plane.cache.groups["default"].of_type(typeurls.ENDPOINT).resources["llama"]
    assignment = endpoint_pb2.ClusterLoadAssignment.FromString(resource.body)
    weights = {}
    for locality in assignment.endpoints:
        for lb in locality.lb_endpoints:
            address = lb.endpoint.address.socket_address
            weights[f"{address.address}:{address.port_value}"] = lb.load_balancing_weight.value
    return weights


async def test_a_restart_with_a_state_file_keeps_the_weights(tmp_path: Path):
    snapshot, state = _snapshot(tmp_path / "s.yaml"), tmp_path / "state.json"
    settings = local_settings(snapshot, state=state, weights_save_interval=0.1)
    plane = ControlPlane(settings)
    await plane.start()
    try:
        first = _served_weights(plane)
        assert first[A] == first[B]  # static (or the policy's neutral answer): no load yet
        deadline = time.monotonic() + 10
        while True:
            load = report(
                "llama",
                endpoint(A, ok=20, metrics={KV: (20, 0.1 * 20)}),
                endpoint(B, ok=20, metrics={KV: (20, 0.9 * 20)}),
            )
            plane.store.ingest("envoy-1", load, time.monotonic())
            weights = _served_weights(plane)
            if weights[A] > 2 * weights[B]:
                break
            assert time.monotonic() < deadline, weights
            await asyncio.sleep(0.3)
    finally:
        await plane.stop(0)
    assert state.exists()
    again = ControlPlane(local_settings(snapshot, state=state))
    await again.start()
    try:
        # Served from the first config on, with no load reported to this process yet.
        assert _served_weights(again) == weights
        await asyncio.sleep(1.0)  # engine ticks with no load: the restored weights stand
        assert _served_weights(again) == weights
    finally:
        await again.stop(0)


async def test_expired_weights_in_the_state_file_are_not_served(tmp_path: Path):
    snapshot, state = _snapshot(tmp_path / "s.yaml"), tmp_path / "state.json"
    stale = {
        "format": 1,
        "pools": {},
        "weights": {
            "llama": {
                "published_at": time.time() - 600,  # ten minutes ago; expiry is 30 s
                "weights": {"endpoints": {A: 900, B: 100}, "localities": {"": 1}},
            }
        },
    }
    state.write_text(json.dumps(stale))
    plane = ControlPlane(local_settings(snapshot, state=state))
    await plane.start()
    try:
        served = _served_weights(plane)
        assert served[A] == served[B]  # from the start: not the stale 900 / 100
    finally:
        await plane.stop(0)
