"""The open-loop load generator: seeded request mix and Poisson arrivals against a real server."""

from __future__ import annotations

import random

from xds_lab.loadgen import ERROR, OK, Mix, OpenLoopLoad, Outcome, RequestMix
from xds_lab.simulator.model_server import ModelServer
from xds_lab.simulator.options import SimulatorConfig


def test_mix_is_seeded_and_clipped() -> None:
    mix = RequestMix(
        prompt_tokens=200, output_tokens=100, max_prompt_tokens=300, max_output_tokens=150
    )
    first = [mix.draw(random.Random(7)) for _ in range(3)]
    assert first == [mix.draw(random.Random(7)) for _ in range(3)]
    draws = [mix.draw(random.Random(seed)) for seed in range(2000)]
    assert all(1 <= p <= 300 and 1 <= o <= 150 for p, o in draws)
    prompts = sorted(p for p, _ in draws)
    assert 170 <= prompts[len(prompts) // 2] <= 230  # the median is the configured one
    assert prompts[-1] == 300  # the long tail is clipped, not dropped


async def test_open_loop_sends_at_the_rate_and_reports_each_outcome() -> None:
    outcomes: list[Outcome] = []
    # legacy: every answer is max_tokens long, so the counts below are exact
    config = SimulatorConfig.profile("fast", time_scale=0.1, engine_model="legacy")
    async with ModelServer(config, name="sim") as server:
        mix = Mix(RequestMix(prompt_tokens=20, output_tokens=4), stream_share=0.5)
        load = OpenLoopLoad(f"{server.url}/v1/completions", 40.0, outcomes.append, mix=mix)
        await load.run(2.0)
    # Poisson with mean 80: far outside 40..130 only by a bug.
    assert 40 <= len(outcomes) <= 130
    assert {o.status for o in outcomes} == {OK}
    assert {o.upstream for o in outcomes} == {"sim"}
    assert all(o.output_tokens == o.request.max_tokens for o in outcomes)
    streamed = [o for o in outcomes if o.request.stream]
    assert streamed and all(o.sent < o.ttft <= o.finished for o in streamed)
    assert load.in_flight == 0


async def test_unreachable_server_is_an_outcome_not_a_crash() -> None:
    outcomes: list[Outcome] = []
    load = OpenLoopLoad("http://127.0.0.1:9/v1/completions", 20.0, outcomes.append, timeout=2.0)
    await load.run(0.5)
    assert outcomes and {o.status for o in outcomes} == {ERROR}
