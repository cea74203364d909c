"""Whatever a user saves, the parser answers with a Config or a SnapshotError, never a crash.

A crash here would take down the file watcher or hide every other problem, so
these properties throw arbitrary text, arbitrary YAML-shaped trees and broken
variants of the demo document at it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xds_server.config.reader import parse_config
from xds_server.config.types import Config, SnapshotError

DEMO = yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "snapshots" / "demo.yaml").read_text()
)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
keys = st.one_of(
    st.sampled_from(
        [
            "listeners",
            "pools",
            "node_groups",
            "envoy",
            "name",
            "port",
            "address",
            "routes",
            "model",
            "prefix",
            "pool",
            "timeout",
            "endpoints",
            "zone",
            "weight",
            "lb_policy",
            "weighting",
            "connect_timeout",
            "node_clusters",
            "clusters",
            "@type",
        ]
    ),
    st.text(max_size=10),
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=30,
)


def check(text: str) -> None:
    try:
        result = parse_config(text, "fuzz.yaml")
    except SnapshotError as err:
        assert err.problems
        for problem in err.problems:
            assert problem.file and problem.path and problem.message
            assert "\n" not in str(problem)
    else:
        assert isinstance(result, Config)
        assert result.node_groups[-1].name == "default"


@FAST
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    check(text)


@FAST
@given(trees)
def test_arbitrary_structures(tree: Any) -> None:
    check(yaml.safe_dump(tree))


@FAST
@given(st.dictionaries(keys, trees, max_size=4))
def test_arbitrary_envoy_section(tree: dict) -> None:
    check(yaml.safe_dump({**DEMO, "envoy": tree}))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in the document that can be replaced."""
    found = [prefix] if prefix else []
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in children:
        found.extend(_paths(child, (*prefix, key)))
    return found


DEMO_PATHS = _paths(DEMO)


def _replaced(path: tuple, value: Any) -> dict:
    document = yaml.safe_load(yaml.safe_dump(DEMO))
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


@FAST
@given(st.sampled_from(DEMO_PATHS), trees)
def test_mutated_demo(path: tuple, value: Any) -> None:
    check(yaml.safe_dump(_replaced(path, value)))


@FAST
@given(st.sampled_from(DEMO_PATHS), st.sampled_from(DEMO_PATHS))
def test_demo_with_a_field_moved(source: tuple, destination: tuple) -> None:
    document = yaml.safe_load(yaml.safe_dump(DEMO))
    node = document
    for key in source:
        node = node[key]
    check(yaml.safe_dump(_replaced(destination, node)))
