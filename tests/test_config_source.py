"""Hot reload: valid edits publish, invalid edits are refused and lose nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xds_server.config.file_source import FileSource
from xds_server.config.types import Config
from xds_server.resources.publisher import Publisher
from xds_server.xds import typeurls
from xds_server.xds.cache import ResourceCache

VALID = {
    "listeners": [{"name": "l", "port": 10000, "routes": [{"prefix": "/", "pool": "p"}]}],
    "pools": [{"name": "p", "endpoints": [{"address": "127.0.0.1", "port": 8001}]}],
}


async def test_valid_edit_is_published_invalid_edit_keeps_last_good(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(VALID))
    cache = ResourceCache()
    source = FileSource(path, Publisher(cache).publish_config)
    assert await source.load()
    first = cache.groups["default"].of_type(typeurls.ENDPOINT).version
    watcher = asyncio.create_task(source.watch(interval=0.02, settle=0.01))
    try:
        edited = yaml.safe_load(yaml.safe_dump(VALID))
        edited["pools"][0]["endpoints"].append({"address": "127.0.0.1", "port": 8002})
        path.write_text(yaml.safe_dump(edited))
        for _ in range(100):
            if source.reloads == 2:
                break
            await asyncio.sleep(0.02)
        second = cache.groups["default"].of_type(typeurls.ENDPOINT).version
        assert source.reloads == 2 and second != first
        generation = cache.generation
        path.write_text("pools: [{name: p, endpoints: [{address: 127.0.0.1, port: 0}]}]")
        for _ in range(100):
            if source.failures:
                break
            await asyncio.sleep(0.02)
        assert source.failures == 1 and cache.generation == generation
        assert source.last is not None and not source.last.ok
        assert any("pools[0].endpoints[0].port" in p for p in source.last.problems)
        assert cache.groups["default"].of_type(typeurls.ENDPOINT).version == second
    finally:
        watcher.cancel()


async def test_watcher_survives_an_unexpected_reload_error(tmp_path: Path, caplog):
    """Issue 12: anything but a SnapshotError (here a publish that raises) ended the watch
    task silently, and hot reload stopped for good. It is logged, counted and survived."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(VALID))
    published: list[int] = []
    calls = 0

    async def publish(config: Config) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug in publishing")
        published.append(len(config.pools[0].endpoints))

    source = FileSource(path, publish)
    assert await source.load()
    watcher = asyncio.create_task(source.watch(interval=0.02, settle=0.01))

    async def until(condition) -> None:
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("not reached")

    try:
        edited = yaml.safe_load(yaml.safe_dump(VALID))
        edited["pools"][0]["endpoints"].append({"address": "127.0.0.1", "port": 8002})
        path.write_text(yaml.safe_dump(edited))
        await until(lambda: source.watch_errors == 1)
        assert not watcher.done()
        assert source.last is not None and not source.last.ok
        assert "a bug in publishing" in source.last.problems[0]
        assert "still watching" in caplog.text and "RuntimeError" in caplog.text
        edited["pools"][0]["endpoints"].append({"address": "127.0.0.1", "port": 8003})
        path.write_text(yaml.safe_dump(edited))
        await until(lambda: published == [1, 3])  # the next edit is served
        assert source.watch_errors == 1 and source.last.ok
    finally:
        watcher.cancel()


def _mutations() -> st.SearchStrategy:
    """The valid document with one value somewhere replaced by an arbitrary value."""
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=8),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    )
    paths = [
        ("listeners", 0, "port"),
        ("listeners", 0, "name"),
        ("listeners", 0, "routes"),
        ("listeners", 0, "routes", 0, "prefix"),
        ("listeners", 0, "routes", 0, "pool"),
        ("pools", 0, "endpoints"),
        ("pools", 0, "endpoints", 0, "address"),
        ("pools", 0, "endpoints", 0, "port"),
        ("pools", 0, "name"),
        ("pools",),
        ("listeners",),
    ]
    return st.tuples(st.sampled_from(paths), leaf)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutation=_mutations())
def test_no_edit_can_break_serving(tmp_path: Path, mutation):
    """Whatever the edit, load() answers True or False and the cache keeps a good snapshot."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(VALID))
    cache = ResourceCache()
    source = FileSource(path, Publisher(cache).publish_config)
    assert asyncio.run(source.load())
    good = cache.groups
    where, value = mutation
    doc = yaml.safe_load(yaml.safe_dump(VALID))
    target = doc
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    path.write_text(yaml.safe_dump(doc))
    if not asyncio.run(source.load()):
        assert cache.groups is good
        assert source.last is not None and all(source.last.problems)
