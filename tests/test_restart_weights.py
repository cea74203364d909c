"""A restarted control plane (`--state FILE`) serves the weights it had, not static ones.

Real ControlPlanes; load goes into the real store as LRS reports would bring it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.weights_rig import A, B, llama_snapshot, report_load, served
from xds_lab.envoy_rig import local_settings
from xds_server.app import ControlPlane


async def test_a_restart_with_a_state_file_keeps_the_weights(tmp_path: Path):
    snapshot, state = llama_snapshot(tmp_path / "s.yaml"), tmp_path / "state.json"
    settings = local_settings(snapshot, state=state, weights_save_interval=0.1)
    plane = ControlPlane(settings)
    await plane.start()
    try:
        first = weights_of(plane)
        assert first[A] == first[B]  # static (or the policy's neutral answer): no load yet
        deadline = time.monotonic() + 10
        while True:
            report_load(plane, "envoy-1", 0.1, 0.9)
            weights = weights_of(plane)
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
        assert weights_of(again) == weights
        await asyncio.sleep(1.0)  # engine ticks with no load: the restored weights stand
        assert weights_of(again) == weights
    finally:
        await again.stop(0)


async def test_expired_weights_in_the_state_file_are_not_served(tmp_path: Path):
    snapshot, state = llama_snapshot(tmp_path / "s.yaml"), tmp_path / "state.json"
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
        served = weights_of(plane)
        assert served[A] == served[B]  # from the start: not the stale 900 / 100
    finally:
        await plane.stop(0)


def weights_of(plane: ControlPlane) -> dict[str, int]:
    return {key: weight for key, (weight, _health) in served(plane)[1].items()}
