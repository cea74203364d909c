"""Body routing across a control-plane restart, through a real Envoy 1.40 (bench/router_restart.py
at a smaller scale; the figures are the benchmark's).

An open-loop stream of body-routed completions (half of them streaming for a second or more)
runs while `ControlPlane.shutdown()` ends the plane and a new one starts on the same ports with
the same snapshot. With the router in the plane, the requests in flight at the stop still
finish (the router answered each once and closed its stream) and new ones fail only until the
new plane's router listens; with the router in a process of its own (`xds-server
body-router`), nothing fails. And a router that listens before its first config (the plane's
own does, for a moment, at every start) waits for it instead of refusing the listener.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from bench import router_restart
from bench.router_restart import CaseResult, Load
from xds_lab.simulator.model_server import ModelServer
from xds_lab.simulator.options import SimulatorConfig
from xds_server.config.reader import parse_config
from xds_server.config.types import MODEL_HEADER
from xds_server.router.ext_proc import BodyRouter

LOAD = Load(rate=20.0, seconds=3.0, restart_at=1.5, output_tokens=120, drain=0.2)


async def _measure(case: str, tmp_path: Path) -> CaseResult:
    server = ModelServer(SimulatorConfig(model=router_restart.MODEL))
    await server.start()
    try:
        return await router_restart.measure(case, [server.port], LOAD, tmp_path, "objects")
    finally:
        await server.stop()


@pytest.mark.envoy
async def test_in_flight_requests_survive_a_restart_of_the_plane_that_routes_them(
    tmp_path: Path,
) -> None:
    result = await _measure("in-process", tmp_path)
    why = str(result)
    assert result.failed_before == 0, why
    # Requests in flight at the stop, streams among them still streaming once the new plane
    # served: none failed.
    assert result.in_flight >= 10 and result.spanning_streams >= 1, why
    assert result.in_flight_failed == 0, why
    # New ones may fail while no router listens, not once the new plane's router does.
    assert result.all_new.after_serving == 0, why
    assert result.timeline["envoy_back"] >= result.timeline["serving"], why


@pytest.mark.envoy
async def test_with_the_router_beside_envoy_a_plane_restart_fails_nothing(
    tmp_path: Path,
) -> None:
    result = await _measure("standalone", tmp_path)
    why = str(result)
    assert result.in_flight >= 10 and result.spanning_streams >= 1, why
    assert result.failed_before == 0, why
    assert result.in_flight_failed == 0, why
    assert result.probes.sent >= 50, why
    assert result.all_new.failed == 0, why


async def test_a_router_started_before_its_config_waits_for_it() -> None:
    router = BodyRouter()
    doc = router_restart.snapshot(10000, [8001], None)
    body = b'{"model": "%s", "prompt": "hi"}' % router_restart.MODEL.encode()
    try:
        answering = asyncio.create_task(router.answer_off_loop("inference", body))
        await asyncio.sleep(0.05)
        assert not answering.done()  # no "unknown listener" before the config came
        router.update(parse_config(yaml.safe_dump(doc), "t.yaml"))
        answer = ep.ProcessingResponse.FromString(await asyncio.wait_for(answering, 1))
        (header,) = answer.request_body.response.header_mutation.set_headers
        assert (header.header.key, header.header.raw_value) == (
            MODEL_HEADER,
            router_restart.MODEL.encode(),
        )
        # Once it has a config, a listener it does not know is refused at once.
        refusal = ep.ProcessingResponse.FromString(await router.answer_off_loop("other", body))
        assert refusal.immediate_response.status.code == 503
    finally:
        await router.aclose()
