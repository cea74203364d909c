"""The Grafana dashboard only queries series that /metrics really exposes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from lrs.load_store import LoadStore
from lrs.weights.signals import PoolWeights
from tests.admin_rig import (
    KV,
    TOKEN,
    lrs_report,
    running,
    scrape,
    snapshot_doc,
    wait_for,
    write_doc,
)
from tests.xds_client import SotwClient, node
from xds_lab.envoy_rig import node_in_sync
from xds_server.xds.typeurls import ENDPOINT

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "xds-server.json"
METRIC = re.compile(r"\bxds_[a-zA-Z0-9_]+")
A, B = "127.0.0.1:9001", "127.0.0.1:9002"
QUEUE = "named_metrics.num_requests_waiting"


def expressions(node: Any) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template variable queries."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found += expressions(value)
    elif isinstance(node, list):
        for item in node:
            found += expressions(item)
    return found


def test_dashboard_covers_the_operator_questions():
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows[:5] == ["Fleet sync", "NACKs", "Push latency", "Weights", "Load"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel
    for expr in expressions(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


async def test_every_queried_series_is_exposed(tmp_path: Path):
    doc = snapshot_doc([9001, 9002, 9003])
    doc["pools"][0]["weighting"] = "orca"
    write_doc(tmp_path / "snapshot.yaml", doc)
    (tmp_path / "token").write_text(TOKEN)
    async with running(tmp_path / "snapshot.yaml", admin_token_file=tmp_path / "token") as (
        plane,
        admin,
    ):
        # Give every series a sample: a client that ACKs then NACKs, a drain, load, weights.
        async with SotwClient(f"127.0.0.1:{plane.xds_port}", node("edge")) as client:
            client.request(ENDPOINT, ["llama"])
            first = await client.recv()
            client.ack(first, ["llama"])
            await wait_for(lambda: node_in_sync(plane, "edge"))
            assert (await admin.call("POST", f"/api/v1/pools/llama/endpoints/{A}/drain"))[0] == 200
            client.nack(await client.recv(), "rejected", first.version_info, ["llama"])
            await wait_for(lambda: node_in_sync(plane, "edge"))
            store = LoadStore()
            store.set_known({"llama": [A, B]})
            means = {9001: {KV: 0.5, QUEUE: 3.0}, 9002: {KV: 0.25}}
            store.ingest("envoy-1", lrs_report(means), time.monotonic())
            plane.observe_load(
                lambda pool: store.pool_load(pool, time.monotonic()), lambda: store.reports
            )
            plane.publisher.publish_weights("llama", PoolWeights({A: 3, B: 1}, {"zone-0": 3}))
            samples = await scrape(admin)
    exposed = {name for name, _ in samples}
    queried = {
        m for expr in expressions(json.loads(DASHBOARD.read_text())) for m in METRIC.findall(expr)
    }
    assert queried, "no xds_ series found in the dashboard"
    missing = sorted(queried - exposed)
    assert not missing, f"the dashboard queries series /metrics does not expose: {missing}"
    metric_labels = {dict(labels).get("metric") for name, labels in samples}
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        for name in re.findall(r'metric="([^"]+)"', expr):
            assert name in metric_labels, name
