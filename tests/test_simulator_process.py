"""Simulators in a child process: started on free ports, driven and read over HTTP, stopped."""

from __future__ import annotations

import argparse

import aiohttp
import pytest

from xds_lab.simulator.options import (
    SimulatorConfig,
    add_arguments,
    config_from_args,
    to_arguments,
)
from xds_lab.simulator.process import SimulatorProcess


async def test_servers_answer_report_state_and_take_changes() -> None:
    config = SimulatorConfig.profile("slow", max_num_seqs=4, kv_cache_tokens=1024)
    async with SimulatorProcess(config, count=2) as fleet:
        assert len({s.port for s in fleet.servers}) == 2
        first = fleet.servers[0]
        async with aiohttp.ClientSession() as session:
            body = {"prompt_tokens": 10, "max_tokens": 2}
            async with session.post(f"{first.url}/v1/completions", json=body) as response:
                assert response.status == 200
            async with session.get(f"{first.url}/admin/profile") as response:
                view = await response.json()
        # Every parameter reached the child, not just the profile name.
        assert view["config"]["kv_cache_tokens"] == 1024 and view["config"]["max_num_seqs"] == 4
        await first.update(slowdown=2.5)
        state, other = await first.state(), await fleet.servers[1].state()
        assert state.slowdown == 2.5 and state.running == 0 and state.waiting == 0
        assert other.slowdown == 1.0
        assert state.speed_factor != other.speed_factor  # servers of one process differ
        with pytest.raises(ValueError, match="slowdown"):
            await first.update(slowdown=-1)
        process = fleet._proc
    assert process is not None and process.returncode is not None  # stopped, not orphaned


class _BrokenFlag(SimulatorProcess):
    def _argv(self) -> list[str]:
        return [*super()._argv(), "--max-num-seqs", "0"]


async def test_a_child_that_cannot_start_says_why() -> None:
    with pytest.raises(RuntimeError, match="max_num_seqs must be >= 1"):
        await _BrokenFlag(SimulatorConfig()).start()
    with pytest.raises(ValueError, match="count"):
        SimulatorProcess(SimulatorConfig(), count=0)


def test_a_config_survives_the_command_line_round_trip() -> None:
    """What a SimulatorProcess passes its child is parsed back to the same config."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for config in (
        SimulatorConfig.profile("slow", max_num_seqs=3, time_scale=0.5, orca_signals="cswrr"),
        SimulatorConfig.profile("fast", model="qwen", kv_cache_tokens=2048),
        SimulatorConfig.profile("small", engine_model="legacy", seed=9, step_jitter=0.0),
        SimulatorConfig(decode_step_per_kv_token_s=1.5e-7, output_sigma=1.25, speed_spread=0.1),
    ):
        assert config_from_args(parser.parse_args(to_arguments(config))) == config
