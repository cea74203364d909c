"""Issue 14: a reload parses, validates and builds again only what an edit changed, and what it
serves is exactly what a full reload would serve.

Property tests over random snapshot files written in several YAML styles and random edits:
the section-by-section parse equals PyYAML's parse of the whole text (or steps aside), the
Config read through the memo equals the one read without it (the same problems when refused),
and the cache after incremental publishes holds the same resources, bytes and versions as a
cache filled once from `build_all` of the same config and weights.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrs.weights.signals import PoolWeights
from xds_server.config.reader import parse_config
from xds_server.config.sections import Memo, split
from xds_server.config.types import SnapshotError
from xds_server.resources.build import build_all
from xds_server.resources.incremental import Rebuilder
from xds_server.resources.publisher import Publisher
from xds_server.xds.cache import ResourceCache

# --------------------------------------------------------------------------- documents


def _pool(index: int, endpoints: int, weighting: str = "static") -> dict[str, Any]:
    return {
        "name": f"pool-{index}",
        "lb_policy": "least_request" if index % 2 else "round_robin",
        "weighting": weighting,
        "endpoints": [
            {"address": f"10.0.{index}.{e + 1}", "port": 8000, "zone": f"z{e % 2}", "weight": 1}
            for e in range(endpoints)
        ],
    }


def _document(pools: int = 4) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listeners": [
            {
                "name": "inference",
                "port": 10000,
                "body_routing": False,
                "routes": [{"model": f"m{i}", "pool": f"pool-{i}"} for i in range(pools)]
                + [{"prefix": "/", "pool": "pool-0", "timeout": 30}],
            },
            {"name": "split", "port": 10001, "routes": [{"prefix": "/", "pool": "pool-1"}]},
        ],
        "pools": [_pool(i, 3, "orca" if i == 2 else "static") for i in range(pools)],
    }
    return doc


@dataclass(frozen=True)
class Style:
    """How a person might write the same document."""

    indent: int  # items under a top-level key: 0 ("- name") or 2 ("  - name")
    flow_endpoints: bool
    comments: bool
    crlf: bool
    quoted_keys: bool


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _block(value: Any, indent: int, style: Style) -> list[str]:
    """A mapping's lines at `indent`, nested lists as block sequences at `indent`."""
    lines = []
    pad = " " * indent
    for key, item in value.items():
        name = f'"{key}"' if style.quoted_keys and key == "name" else key
        if isinstance(item, list) and item and isinstance(item[0], dict):
            lines.append(f"{pad}{name}:")
            for entry in item:
                if style.flow_endpoints and key == "endpoints":
                    lines.append(f"{pad}  - {_scalar(entry)}")
                else:
                    inner = _block(entry, indent + 4, style)
                    lines.append(f"{pad}  - {inner[0].lstrip()}")
                    lines += inner[1:]
        elif isinstance(item, dict | list):
            lines.append(f"{pad}{name}: {_scalar(item)}")
        else:
            lines.append(f"{pad}{name}: {_scalar(item)}")
    return lines


def render(doc: dict[str, Any], style: Style, noise: int = 0) -> str:
    lines = ["# snapshot"] if style.comments else []
    for key, value in doc.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{key}:  # {len(value)}" if style.comments else f"{key}:")
            for n, item in enumerate(value):
                inner = _block(item, style.indent + 2, style)
                lines.append(f"{' ' * style.indent}- {inner[0].lstrip()}")
                lines += inner[1:]
                if style.comments and (n + noise) % 3 == 0:
                    lines += ["", f"{' ' * (n % 3)}# after {n}"]
        else:
            lines.append(f"{key}: {_scalar(value)}")
    return ("\r\n" if style.crlf else "\n").join(lines) + "\n"


styles = st.builds(Style, st.sampled_from([0, 2]), st.booleans(), st.booleans(), st.booleans(),
                   st.booleans())  # fmt: skip


# --------------------------------------------------------------------------- edits


def _edit(doc: dict[str, Any], kind: str, a: int, b: int) -> None:
    """One edit of the kind a person makes, at positions picked by a and b."""
    pools = doc["pools"]
    pool = pools[a % len(pools)]
    endpoints = pool["endpoints"]
    routes = doc["listeners"][0]["routes"]
    if kind == "weight" and endpoints:
        endpoints[b % len(endpoints)]["weight"] = 1 + b % 50
    elif kind == "add-endpoint":
        endpoints.append({"address": f"10.1.{a % 200}.{b % 250 + 1}", "port": 9000, "zone": "z9"})
    elif kind == "remove-endpoint" and len(endpoints) > 1:
        endpoints.pop(b % len(endpoints))
    elif kind == "add-pool":
        name = f"new-{a}-{b}"
        if all(p["name"] != name for p in pools):
            pools.insert(b % (len(pools) + 1), {**_pool(a + 100, 2), "name": name})
            routes.insert(0, {"model": name, "pool": name})
    elif kind == "remove-pool" and len(pools) > 2 and pool["name"] not in ("pool-0", "pool-1"):
        pools.remove(pool)
        doc["listeners"][0]["routes"] = [r for r in routes if r.get("pool") != pool["name"]]
    elif kind == "drop-pool-keep-routes" and len(pools) > 1:
        pools.remove(pool)  # its routes stay: refused (unknown pool), until "fix"
    elif kind == "policy":
        pool["lb_policy"] = "least_request" if pool["lb_policy"] == "round_robin" else "round_robin"
    elif kind == "weighting":
        pool["weighting"] = "orca" if pool["weighting"] == "static" else "static"
    elif kind == "timeout":
        routes[-1]["timeout"] = 1 + b % 100
    elif kind == "swap":
        i, j = a % len(pools), b % len(pools)
        pools[i], pools[j] = pools[j], pools[i]
    elif kind == "rename-listener":
        doc["listeners"][1]["name"] = f"split-{b % 3}"
    elif kind == "body-router":
        doc["body_router"] = {"timeout": 0.5 + b % 3}
    elif kind == "groups":
        doc["node_groups"] = [
            {"name": "canary", "node_clusters": ["edge-canary"], "listeners": ["inference"]},
            {"name": "default", "listeners": [doc["listeners"][1]["name"]]},
        ]
    elif kind == "no-groups":
        doc.pop("node_groups", None)
    elif kind == "bad-port" and endpoints:
        endpoints[b % len(endpoints)]["port"] = 0
    elif kind == "bad-route":
        routes[0] = {"model": "ghost", "pool": "no-such-pool"}
    elif kind == "fix":
        for p in pools:
            for e in p["endpoints"]:
                e["port"] = e["port"] or 8000
        doc["listeners"][0]["routes"] = [
            r for r in routes if r.get("pool") in {p["name"] for p in pools}
        ]


EDIT_KINDS = [
    "weight",
    "weight",
    "weight",
    "add-endpoint",
    "remove-endpoint",
    "add-pool",
    "remove-pool",
    "policy",
    "weighting",
    "timeout",
    "swap",
    "rename-listener",
    "body-router",
    "groups",
    "no-groups",
    "bad-port",
    "bad-route",
    "drop-pool-keep-routes",
    "fix",
]
edits = st.lists(
    st.tuples(st.sampled_from(EDIT_KINDS), st.integers(0, 1000), st.integers(0, 1000)),
    min_size=1,
    max_size=8,
)


def _parse(text: str, memo: Memo | None = None) -> Any:
    try:
        return parse_config(text, "s.yaml", memo=memo)
    except SnapshotError as err:
        return [str(p) for p in err.problems]


def _contents(cache: ResourceCache) -> dict[str, Any]:
    return {
        name: (
            group.identities,
            {
                type_url: (typed.version, {n: r.body for n, r in typed.resources.items()})
                for type_url, typed in group.types.items()
            },
        )
        for name, group in cache.groups.items()
    }


# --------------------------------------------------------------------------- properties


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(style=styles, steps=edits, weigh=st.lists(st.integers(1, 1000), max_size=8))
def test_an_incremental_reload_serves_what_a_full_reload_serves(style, steps, weigh):
    """Memo + Rebuilder across a run of edits give the same Config (or the same problems)
    and the same cache contents and versions as parsing and building each version whole."""

    async def run() -> None:
        doc = _document()
        memo = Memo()
        cache = ResourceCache()
        publisher = Publisher(cache)
        texts = [render(doc, style)]
        for n, (kind, a, b) in enumerate(steps):
            _edit(doc, kind, a, b)
            texts.append(render(doc, style, noise=n))
        for n, text in enumerate(texts):
            incremental, full = _parse(text, memo), _parse(text)
            assert incremental == full
            if isinstance(full, list):
                continue  # refused: nothing is published
            await publisher.publish_config(incremental)
            if n < len(weigh) and incremental.orca_pools:
                pool = incremental.orca_pools[0]
                share = {e.key: 1 + (weigh[n] + i) % 97 for i, e in enumerate(pool.endpoints)}
                publisher.publish_weights(pool.name, PoolWeights(endpoints=share, localities={}))
            reference = ResourceCache()
            reference.set_all(
                build_all(full, publisher.weights, publisher.body_router),
                lambda c, config=full: config.group_for(c).name,
                {g.name: g.identities for g in full.node_groups},
            )
            assert _contents(cache) == _contents(reference)

    asyncio.run(run())


_JUNK = [
    "",
    "# a comment",
    "  # indented comment",
    "extra: 1",
    "  - {address: 10.9.9.9, port: 1}",
    "- stray",
    "    weight: 3",
    "pools: []",
    "anchor: &a {x: 1}",
    "alias: *a",
    "  - &p {name: anchored}",
    "  - *p",
    "quoted: 'two",
    "  lines'",
    "flow: [1,",
    "  2]",
    "block: |",
    "  text",
    "pools:",
    "---",
    "\tkey: 1",
    "? complex",
    ": value",
]


@settings(max_examples=300, deadline=None)
@given(
    style=styles,
    cuts=st.lists(
        st.tuples(st.integers(0, 500), st.sampled_from(["drop", "dup", "junk"]), st.integers()),
        max_size=4,
    ),
)
def test_the_sections_parse_to_what_the_whole_text_parses_to(style, cuts):
    """Whatever lines are dropped, doubled or inserted (anchors, aliases, multi-line scalars,
    flow collections, markers), a text cut into sections either parses to exactly what
    PyYAML makes of the whole, or is handed back to the whole-text parse (None)."""
    first = render(_document(), style)
    lines = first.splitlines()
    for at, what, pick in cuts:
        at %= len(lines) + 1
        if what == "drop" and at < len(lines):
            del lines[at]
        elif what == "dup" and at < len(lines):
            lines.insert(at, lines[at])
        else:
            lines.insert(at, _JUNK[pick % len(_JUNK)])
    text = "\n".join(lines) + "\n"
    try:
        whole: Any = yaml.load(text, Loader=yaml.CSafeLoader)
    except Exception:
        whole = Exception
    memo = Memo()
    memo.load(first)  # the sections of the unedited text are known, as after a load
    document = memo.load(text)
    if document is not None:
        assert whole is not Exception, text
        assert document.value == whole, text


def test_an_edit_parses_and_validates_only_its_pool():
    doc = _document(pools=20)
    memo = Memo()
    parse_config(render(doc, Style(2, True, True, False, False)), "s.yaml", memo=memo)
    before = dict(memo.pools)
    doc["pools"][7]["endpoints"][1]["weight"] = 9
    config = parse_config(render(doc, Style(2, True, True, False, False)), "s.yaml", memo=memo)
    assert memo.last_parsed == 1  # the one pool's text, of 20 pools, 2 listeners, headers
    assert memo.last_reused > 20
    kept = {key[0]: pool for key, pool in before.items()}
    same = [p for p in config.pools if any(p is q for q in kept.values())]
    assert len(same) == 19 and config.pools[7] not in kept.values()


async def test_a_reload_builds_only_the_changed_pool():
    doc = _document(pools=20)
    memo = Memo()
    publisher = Publisher(ResourceCache())
    style = Style(2, True, False, False, False)
    await publisher.publish_config(parse_config(render(doc, style), "s.yaml", memo=memo))
    built = publisher.rebuilder.built
    doc["pools"][3]["endpoints"][0]["weight"] = 5
    await publisher.publish_config(parse_config(render(doc, style), "s.yaml", memo=memo))
    assert publisher.rebuilder.built - built == 2  # pool-3's Cluster and ClusterLoadAssignment


@pytest.mark.parametrize(
    "text",
    [
        "%YAML 1.1\n---\npools: []\n",
        "---\npools: []\n",
        "- a\n- b\n",
        "  pools: []\n",
        "\ufeffpools: []\n",
        "pools: []\r",
        "",
        "# only a comment\n",
    ],
)
def test_documents_that_are_not_cut(text: str):
    assert split(text) is None


def test_rebuilder_matches_build_all_on_the_demo_snapshot():
    from importlib import resources

    text = resources.files("xds_server").joinpath("data/demo.yaml").read_text()
    config = parse_config(text, "demo.yaml")
    rebuilder = Rebuilder()
    for _ in range(2):
        assert rebuilder.build_all(config) == build_all(config)
    changed = copy.deepcopy(yaml.safe_load(text))
    changed["pools"][0]["endpoints"][0]["weight"] = 3
    other = parse_config(yaml.safe_dump(changed), "demo.yaml")
    assert rebuilder.build_all(other) == build_all(other)
