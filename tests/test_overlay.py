"""The overlay over the snapshot file: how API changes and file edits meet, and the state file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lrs.weights.signals import PoolWeights
from xds_server.config.overlay import Overlay, endpoint_key
from xds_server.config.reader import parse_config
from xds_server.config.state_file import (
    OverlayState,
    SavedWeights,
    StateFileError,
    read_state,
    write_state,
)
from xds_server.config.types import Config, Endpoint

A, B, C = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"


def config(*ports: int, pool: str = "p") -> Config:
    endpoints = ", ".join(f"{{address: 127.0.0.1, port: {p}, zone: z{p % 2}}}" for p in ports)
    text = f"""
listeners: [{{name: l, port: 10000, routes: [{{prefix: /, pool: {pool}}}]}}]
pools: [{{name: {pool}, endpoints: [{endpoints}]}}]
"""
    return parse_config(text, "test.yaml")


def served(overlay: Overlay, file: Config) -> dict[str, bool]:
    """key -> draining, for the pool as served."""
    return {e.key: e.draining for e in overlay.apply(file).pools[0].endpoints}


def test_empty_overlay_serves_the_file_unchanged():
    file = config(9001, 9002)
    assert Overlay().apply(file) is file


def test_drain_add_remove_apply_to_the_served_pool():
    file = config(9001, 9002)
    overlay = (
        Overlay()
        .drain("p", A, True)
        .add("p", Endpoint("127.0.0.1", 9003, "z9", 5), in_file=False)
        .remove("p", B, in_file=True)
    )
    assert served(overlay, file) == {A: True, C: False}
    added = overlay.apply(file).pools[0].endpoints[-1]
    assert (added.zone, added.weight) == ("z9", 5)
    assert served(overlay.drain("p", A, False), file) == {A: False, C: False}


def test_file_endpoint_removed_via_api_comes_back_as_the_file_defines_it():
    file = config(9001, 9002)
    overlay = Overlay().remove("p", B, in_file=True)
    back = overlay.add("p", Endpoint("127.0.0.1", 9002, "other", 7), in_file=True)
    assert back == Overlay()  # nothing recorded: the file's definition is served
    assert served(back, file) == {A: False, B: False}


def test_drained_endpoint_removed_from_the_file_stays_drained_when_it_returns():
    """The documented conflict: a file edit neither lifts a drain nor loses it."""
    overlay = Overlay().drain("p", B, True)
    without = config(9001)
    assert served(overlay, without) == {A: False}
    assert overlay.inert(without) == [
        {"pool": "p", "entry": f"drained {B}", "reason": "not served now"}
    ]
    assert served(overlay, config(9001, 9002)) == {A: False, B: True}


def test_endpoint_added_via_api_then_added_to_the_file_takes_the_files_definition():
    overlay = Overlay().add("p", Endpoint("127.0.0.1", 9002, "api-zone", 3), in_file=False)
    assert served(overlay, config(9001)) == {A: False, B: False}
    file = config(9001, 9002)
    [endpoint] = [e for e in overlay.apply(file).pools[0].endpoints if e.key == B]
    assert (endpoint.zone, endpoint.weight) == ("z0", 1)  # the file's, not the API's
    assert overlay.inert(file) == [
        {"pool": "p", "entry": f"added {B}", "reason": "the file defines it"}
    ]
    # The API added it, so the file dropping it again leaves the API's endpoint served.
    assert served(overlay, config(9001)) == {A: False, B: False}


def test_removal_of_an_endpoint_the_file_dropped_is_inert_and_kept():
    overlay = Overlay().remove("p", B, in_file=True)
    assert served(overlay, config(9001)) == {A: False}
    assert overlay.inert(config(9001))[0]["entry"] == f"removed {B}"
    assert served(overlay, config(9001, 9002)) == {A: False}


def test_changes_to_a_pool_the_file_no_longer_has_are_inert():
    overlay = Overlay().drain("gone", A, True)
    file = config(9001)
    assert overlay.apply(file).pools == file.pools
    assert overlay.inert(file) == [
        {"pool": "gone", "entry": "*", "reason": "the file has no such pool"}
    ]


def test_delete_forgets_the_drain_and_the_addition():
    overlay = Overlay().add("p", Endpoint("127.0.0.1", 9003), in_file=False).drain("p", C, True)
    assert overlay.remove("p", C, in_file=False) == Overlay()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("127.0.0.1:80", "127.0.0.1:80"),
        ("[::0001]:80", "[::1]:80"),
        ("::1:80", "[::1]:80"),  # unbracketed: the last colon separates the port
    ],
)
def test_endpoint_keys_are_normalized(text: str, key: str):
    assert endpoint_key(text) == key


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:0", "host:80", "1.2.3.4:99999", ":80"])
def test_malformed_endpoint_keys_are_refused(text: str):
    with pytest.raises(ValueError):
        endpoint_key(text)


def _overlays() -> st.SearchStrategy[Overlay]:
    keys = st.sampled_from([A, B, C, "[::1]:8000"])
    ops = st.lists(
        st.tuples(st.sampled_from(["add", "remove", "drain", "undrain"]), keys, st.booleans()),
        max_size=12,
    )

    def build(steps: list[tuple[str, str, bool]]) -> Overlay:
        overlay = Overlay()
        for op, key, flag in steps:
            address, port = key.rsplit(":", 1)
            if op == "add":
                endpoint = Endpoint(address.strip("[]"), int(port), "z", 2)
                overlay = overlay.add("p", endpoint, flag)
            elif op == "remove":
                overlay = overlay.remove("p", key, flag)
            else:
                overlay = overlay.drain("p", key, op == "drain")
        return overlay

    return ops.map(build)


@given(_overlays())
def test_json_round_trip(overlay: Overlay):
    assert Overlay.from_json(json.loads(json.dumps(overlay.to_json()))) == overlay


def test_state_file_is_written_atomically_and_read_back(tmp_path: Path):
    path = tmp_path / "state.json"
    assert read_state(path)[0] == Overlay()  # first start: no file yet
    overlay = Overlay().drain("p", A, True)
    write_state(path, overlay, {})
    assert read_state(path)[0] == overlay
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_state_file_writers_with_the_same_pid_do_not_share_a_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Issue 12: two containers on one volume are both pid 1. A temp name made of the pid
    let one writer truncate, rename away or delete the other's half-written file."""
    path = tmp_path / "state.json"
    monkeypatch.setattr("os.getpid", lambda: 1)
    other = tmp_path / ".state.json.1.tmp"  # the other container's write, in progress
    other.write_text("the other writer's data")
    write_state(path, Overlay().drain("p", A, True), {})
    assert other.read_text() == "the other writer's data"
    assert read_state(path)[0] == Overlay().drain("p", A, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.json.1.tmp", "state.json"]


def test_state_file_keeps_its_mode_and_a_new_one_is_0644(tmp_path: Path):
    path = tmp_path / "state.json"
    write_state(path, Overlay(), {})
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o640)
    write_state(path, Overlay().drain("p", A, True), {})
    assert path.stat().st_mode & 0o777 == 0o640


async def test_an_unwritable_state_file_leaves_the_overlay_in_force(tmp_path: Path):
    state = OverlayState(tmp_path / "missing-dir" / "state.json")
    with pytest.raises(OSError):
        await state.save(Overlay().drain("p", A, True))
    assert state.overlay == Overlay()


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        ("{not json", "Expecting property name"),
        ('{"format": 2, "pools": {}}', "format: expected 1"),
        ('{"format": 1, "pools": {"p": {"drained": ["nope"]}}}', "pools.p.drained[0]"),
        ('{"format": 1, "pools": {"p": {"added": [{"address": "x"}]}}}', "pools.p.added[0]"),
        ('{"format": 1, "pools": {"p": {"extra": []}}}', "unknown key 'extra'"),
        ("[]", "expected a mapping"),
        ('{"format": 1, "pools": {}, "weights": {"p": {"published_at": 1.0}}}', "weights.p"),
        (
            '{"format": 1, "pools": {}, "weights": {"p": {"published_at": 1.0, "weights": '
            '{"endpoints": {"a": 0}, "localities": {}}}}}',
            "weights.p.weights: endpoints",
        ),
    ],
)
def test_a_corrupt_state_file_is_an_error_naming_the_file(tmp_path: Path, content: str, hint: str):
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(StateFileError) as err:
        read_state(path)
    assert str(path) in str(err.value) and hint in str(err.value)


def test_state_file_keeps_the_weight_table_beside_the_overlay(tmp_path: Path):
    path = tmp_path / "state.json"
    weights = PoolWeights({A: 700, "10.0.0.2:8000": 300}, {"zone-a": 1}, frozenset({A}))
    saved = {"p": SavedWeights(weights, 1234.5)}
    write_state(path, Overlay().drain("p", A, True), saved)
    assert read_state(path) == (Overlay().drain("p", A, True), saved)


async def test_weights_are_written_only_when_they_changed(tmp_path: Path):
    path = tmp_path / "state.json"
    state = OverlayState(path)
    await state.load()
    await state.flush_weights()
    assert not path.exists()  # nothing published yet: nothing to write
    state.record_weights("p", PoolWeights({A: 5}, {"": 1}))
    await state.flush_weights()
    written = path.stat().st_mtime_ns
    await state.flush_weights()
    assert path.stat().st_mtime_ns == written
    again = OverlayState(path)
    await again.load()
    assert again.weights["p"].weights == PoolWeights({A: 5}, {"": 1})
