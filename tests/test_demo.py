"""Both demo scenarios run end to end on a real Envoy and report what they promise."""

from __future__ import annotations

import io

import pytest

from xds_lab.edits_demo import run_demo
from xds_lab.weights_demo import run_weights_demo

pytestmark = pytest.mark.envoy


async def test_weights_demo_shows_every_server_and_a_summary_per_phase() -> None:
    out = io.StringIO()
    assert await run_weights_demo(duration=9.0, load=0.5, out=out) == 0
    text = out.getvalue()
    for label in ("fast-1", "fast-2", "slow-1", "slow-2"):
        assert label in text
    frames = text.count("share of the last")
    assert frames >= 3, text  # not a TTY: one frame per phase at least
    summary = text[text.index("share of answered requests per server") :].splitlines()
    phases = summary[2:]
    assert [line.split()[0] for line in phases] == ["steady", "fast-1", "fast-1"], summary
    # Every phase answered requests (a share column is not all zero) and with no errors.
    for line in phases:
        assert any(cell.endswith("%") and cell != "0%" for cell in line.split()), line
        assert line.split()[-1] == "0", line


async def test_edits_demo_walks_through_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_demo(requests_per_phase=20) == 0
    text = capsys.readouterr().out
    for step in ("1. ", "2. after the weight edit", "3. after removing", "4. requests for", "5. "):
        assert step in text
    assert "refused:" in text
