"""The status page in a real headless Chromium: it loads, shows pools, and follows a drain."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lrs.load_store import LoadStore
from tests.admin_rig import KV, TOKEN, lrs_report, running, snapshot_doc, write_doc
from tests.cdp import Chromium, find_chromium
from tests.xds_client import SotwClient, node
from xds_server.xds.typeurls import ENDPOINT

A, B, C = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on PATH: install Debian's `chromium` (.ci/run does)")
    chromium = Chromium(binary, tmp_path)
    try:
        await chromium.start()
        yield chromium
    finally:
        await chromium.stop()


def row_state(key: str) -> str:
    """JS: the state shown in the row of endpoint `key` of pool llama (null if absent)."""
    selector = json.dumps(f'[data-pool="llama"] tr[data-endpoint="{key}"]')
    return f"(document.querySelector({selector})?.dataset.state ?? null)"


async def test_page_shows_pools_and_follows_a_drain(browser: Chromium, tmp_path: Path):
    write_doc(tmp_path / "snapshot.yaml", snapshot_doc([9001, 9002, 9003]))
    (tmp_path / "token").write_text(TOKEN)
    async with running(tmp_path / "snapshot.yaml", admin_token_file=tmp_path / "token") as (
        plane,
        admin,
    ):
        store = LoadStore()
        store.set_known({"llama": [A, B, C]})
        store.ingest("envoy-1", lrs_report({9001: {KV: 0.3}, 9002: {KV: 0.6}}), time.monotonic())
        plane.observe_load(lambda pool: store.pool_load(pool, time.monotonic()))
        async with SotwClient(f"127.0.0.1:{plane.xds_port}", node("edge-<b>1</b>")) as client:
            client.request(ENDPOINT, ["llama"])
            first = await client.recv()
            client.ack(first, ["llama"])
            await browser.navigate(f"http://127.0.0.1:{plane.admin_port}/?interval=250")
            await browser.wait_for("document.querySelector('[data-pool=\"llama\"]') !== null")
            assert await browser.evaluate(row_state(A)) == "active"
            rows = await browser.evaluate(
                "[...document.querySelectorAll('[data-pool=\"llama\"] tbody tr')]"
                ".map(r => r.dataset.endpoint)"
            )
            assert rows == [A, B, C]
            # The node id is shown as text, never parsed as HTML.
            node_cell = await browser.evaluate(
                "document.querySelector('#nodes tbody tr td').textContent"
            )
            assert node_cell == "edge-<b>1</b>"
            kv_cell = await browser.evaluate(
                f"document.querySelector('tr[data-endpoint=\"{B}\"]').cells[8].textContent"
            )
            assert kv_cell == "60 %"
            # Charts: one weight line per endpoint, KV lines for the two with reports.
            await browser.wait_for(
                "[...document.querySelectorAll('[data-pool=\"llama\"] polyline')]"
                ".filter(p => p.getAttribute('points').split(' ').length >= 2).length === 5"
            )

            status, _ = await admin.call("POST", f"/api/v1/pools/llama/endpoints/{B}/drain")
            assert status == 200
            await browser.wait_for(f"{row_state(B)} === 'draining'")
            summary = await browser.evaluate(
                "document.querySelector('[data-pool=\"llama\"] .muted').textContent"
            )
            assert "2 active, 1 draining" in summary
            # The drain reached the client, which rejects it: the page shows why.
            client.nack(await client.recv(), "bad <i>weights</i>", first.version_info, ["llama"])
            nack = await browser.wait_for(
                "document.querySelector('#nodes .nack')?.textContent ?? ''"
            )
            assert nack.endswith(": bad <i>weights</i>")
            assert (
                await browser.evaluate(
                    "document.querySelector('#nodes tbody tr td:nth-child(5)').textContent"
                )
                == "rejected"
            )
            assert await browser.evaluate("document.getElementById('error').hidden")
    assert browser.exceptions == []
