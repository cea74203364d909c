"""Nothing lost: API changes survive restarts and reloads; file conflicts end as documented."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.admin_rig import (
    TOKEN,
    plane_settings,
    running,
    served_endpoints,
    snapshot_doc,
    wait_for,
    write_doc,
)
from xds_server.admin.auth import TokenError, resolve_token
from xds_server.app import ControlPlane
from xds_server.config.state_file import StateFileError

PORTS = [9001, 9002, 9003]
A, B, C = (f"127.0.0.1:{p}" for p in PORTS)
NEW = {"address": "127.0.0.1", "port": 9010, "zone": "zone-9", "weight": 4}
CLI = [sys.executable, "-m", "xds_server.cli"]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    snapshot, token = tmp_path / "snapshot.yaml", tmp_path / "token"
    write_doc(snapshot, snapshot_doc(PORTS))
    token.write_text(TOKEN)
    return {"snapshot": snapshot, "token": token, "state": tmp_path / "state.json"}


def _running(files: dict[str, Path]):
    return running(files["snapshot"], admin_token_file=files["token"], state=files["state"])


async def test_changes_survive_a_restart(files: dict[str, Path]):
    async with _running(files) as (_, admin):
        assert (await admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/drain"))[0] == 200
        assert (await admin.call("POST", "/api/v1/pools/llama/endpoints", NEW))[0] == 201
        assert (await admin.call("DELETE", f"/api/v1/pools/llama/endpoints/{C}"))[0] == 200
        before = await admin.get("/api/v1/snapshot")
    assert json.loads(files["state"].read_text())["pools"]["llama"]["drained"] == [B]
    async with _running(files) as (_, admin):
        after = await admin.get("/api/v1/snapshot")
        assert served_endpoints(after) == {A: "", B: "DRAINING", "127.0.0.1:9010": ""}
        assert after["groups"] == before["groups"]  # byte for byte the same resources
        endpoints = await admin.endpoints()
        assert endpoints["127.0.0.1:9010"]["origin"] == "api"
        assert (await admin.get("/api/v1/overlay"))["state_file"] == str(files["state"])


async def test_a_file_reload_keeps_the_api_changes(files: dict[str, Path]):
    async with _running(files) as (plane, admin):
        assert (await admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/drain"))[0] == 200
        doc = snapshot_doc(PORTS)
        doc["pools"][0]["endpoints"][0]["weight"] = 5
        write_doc(files["snapshot"], doc)
        await wait_for(lambda: plane.source.reloads == 2)
        endpoints = await admin.endpoints()
        assert endpoints[A]["static_weight"] == 5 and endpoints[B]["state"] == "draining"
        assert served_endpoints(await admin.get("/api/v1/snapshot"))[B] == "DRAINING"


async def test_drained_endpoint_removed_from_the_file_then_restored(files: dict[str, Path]):
    """The documented conflict: the drain outlives the file edit and applies again on return."""
    async with _running(files) as (plane, admin):
        assert (await admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/drain"))[0] == 200
        write_doc(files["snapshot"], snapshot_doc([9001, 9003]))
        await wait_for(lambda: plane.source.reloads == 2)
        assert served_endpoints(await admin.get("/api/v1/snapshot")) == {A: "", C: ""}
        overlay = await admin.get("/api/v1/overlay")
        assert overlay["inert"] == [
            {"pool": "llama", "entry": f"drained {B}", "reason": "not served now"}
        ]
        write_doc(files["snapshot"], snapshot_doc(PORTS))
        await wait_for(lambda: plane.source.reloads == 3)
        assert served_endpoints(await admin.get("/api/v1/snapshot"))[B] == "DRAINING"
        # While absent, the drain could also be lifted: undrain works on the kept entry.
        write_doc(files["snapshot"], snapshot_doc([9001, 9003]))
        await wait_for(lambda: plane.source.reloads == 4)
        status, body = await admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/undrain")
        assert (status, body["state"]) == (200, "not served")
        assert (await admin.get("/api/v1/overlay"))["overlay"]["pools"] == {}


async def test_endpoint_added_via_api_and_then_to_the_file(files: dict[str, Path]):
    async with _running(files) as (plane, admin):
        assert (await admin.call("POST", "/api/v1/pools/llama/endpoints", NEW))[0] == 201
        doc = snapshot_doc(PORTS)
        doc["pools"][0]["endpoints"].append({"address": "127.0.0.1", "port": 9010, "weight": 2})
        write_doc(files["snapshot"], doc)
        await wait_for(lambda: plane.source.reloads == 2)
        new = (await admin.endpoints())["127.0.0.1:9010"]
        assert (new["origin"], new["static_weight"], new["zone"]) == ("file", 2, "")
        [inert] = (await admin.get("/api/v1/overlay"))["inert"]
        assert inert["entry"] == "added 127.0.0.1:9010"


async def test_a_state_file_that_cannot_be_written_refuses_the_change(files: dict[str, Path]):
    state_dir = files["state"].parent / "state-dir"
    state_dir.mkdir()
    files["state"] = state_dir / "state.json"
    async with _running(files) as (plane, admin):
        shutil.rmtree(state_dir)
        generation = plane.cache.generation
        status, body = await admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/drain")
        assert status == 503 and "nothing changed" in body["error"]
        assert plane.cache.generation == generation and plane.overlay.overlay.pools == {}


async def test_a_corrupt_state_file_stops_start_up_naming_it(files: dict[str, Path]):
    files["state"].write_text('{"format": 1, "pools": {"llama": {"drained": ["bad"]}}}')
    plane = ControlPlane(plane_settings(files["snapshot"], state=files["state"]))
    with pytest.raises(StateFileError, match=str(files["state"])):
        await plane.start()
    await plane.stop(0)


def _serve(snapshot: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [*CLI, "serve", "--snapshot", str(snapshot), "--xds-port", "0", "--admin-port", "0"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


def test_serve_exits_2_on_a_corrupt_state_file_or_empty_token_file(files: dict[str, Path]):
    files["state"].write_text("{")
    result = _serve(files["snapshot"], "--state", str(files["state"]))
    assert result.returncode == 2 and f"state file {files['state']} is corrupt" in result.stderr
    files["token"].write_text("  \n")
    result = _serve(files["snapshot"], "--admin-token-file", str(files["token"]))
    assert result.returncode == 2 and f"admin token file {files['token']} is empty" in result.stderr


def test_token_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(TokenError, match="missing"):
        resolve_token(tmp_path / "missing")
    secret, env = "secret" * 6, "env" * 11
    (tmp_path / "t").write_text(f" {secret} \n")
    assert resolve_token(tmp_path / "t", {"XDS_ADMIN_TOKEN": env}) == secret
    assert resolve_token(None, {"XDS_ADMIN_TOKEN": f" {env} "}) == env
    assert resolve_token(None, {}) is None
