"""The `xds-server` command line, run as a user would run it (subprocesses)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from xds_lab.envoy_rig import free_port

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "xds_server.cli"]
LAB = [sys.executable, "-m", "xds_lab.cli"]


def run(*args: str, cli: list[str] = CLI) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["serve", "validate", "bootstrap", "body-router"])
def test_every_command_has_help(command: str):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage: xds-server" in result.stdout


@pytest.mark.parametrize("command", ["demo", "simulate"])
def test_every_lab_command_has_help(command: str):
    result = run(command, "--help", cli=LAB)
    assert result.returncode == 0 and "usage: xds-lab" in result.stdout


@pytest.mark.parametrize("args", [("--load", "5"), ("--load", "0"), ("--duration", "1")])
def test_demo_refuses_impossible_settings_before_starting_anything(args: tuple[str, str]):
    result = run("demo", *args, cli=LAB)
    assert result.returncode == 2 and "--load must be in" in result.stderr


@pytest.mark.parametrize("flag", ["--lrs-interval", "--lrs-cpu-budget"])
@pytest.mark.parametrize("bad", ["0", "-1", "nan", "soon"])
def test_serve_refuses_a_bad_lrs_setting(flag: str, bad: str):
    result = run("serve", flag, bad)
    assert result.returncode == 2 and "expected a positive number" in result.stderr


def test_validate_accepts_every_example():
    for path in sorted((ROOT / "snapshots").glob("*.yaml")):
        result = run("validate", str(path))
        assert result.returncode == 0, result.stderr
        assert "valid" in result.stdout


def test_validate_names_file_path_and_problem(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listeners: [{name: l, port: 10000, routes: [{prefix: /, pool: nope}]}]\n"
        "pools: [{name: p, endpoints: [{address: 127.0.0.1, port: 99999}]}]\n"
    )
    result = run("validate", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 2
    assert any(f"{bad}: pools[0].endpoints[0].port:" in line for line in lines), lines
    assert any(f"{bad}: listeners[0].routes[0].pool:" in line for line in lines), lines


def test_bootstrap_prints_sotw_and_delta():
    sotw = run("bootstrap", "--node-id", "e1", "--xds-address", "127.0.0.1:19000")
    delta = run("bootstrap", "--node-id", "e1", "--delta")
    assert sotw.returncode == 0 and delta.returncode == 0
    assert "api_type: GRPC" in sotw.stdout and "19000" in sotw.stdout
    assert "DELTA_GRPC" in delta.stdout


def test_bootstrap_rejects_bad_address():
    result = run("bootstrap", "--node-id", "e1", "--xds-address", "nope")
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


async def _get_json(url: str, timeout: float = 10.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    return await resp.json()
            except aiohttp.ClientConnectionError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)


async def test_serve_runs_until_sigterm_and_exits_cleanly():
    admin = free_port()
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "serve",
        "--xds-port",
        str(free_port()),
        "--admin-port",
        str(admin),
        "--router-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        health = await _get_json(f"http://127.0.0.1:{admin}/healthz")
        assert health["status"] == "ok" and health["snapshot"]["file"].endswith("demo.yaml")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=15)
        assert proc.returncode == 0, err
        assert b"shutting down" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_refuses_an_invalid_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [{name: p, lb_policy: random}]\n")
    ports = ("--xds-port", "0", "--admin-port", "0", "--router-port", "0")
    result = run("serve", "--snapshot", str(bad), *ports)
    assert result.returncode == 2
    assert f"{bad}: pools[0].lb_policy" in result.stderr


async def test_serve_refuses_a_port_already_in_use():
    """grpc's default SO_REUSEPORT would let two servers share a port and its clients."""
    xds = free_port()
    first = await asyncio.create_subprocess_exec(
        *CLI,
        "serve",
        "--xds-port",
        str(xds),
        "--admin-port",
        "0",
        "--router-port",
        "0",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _wait_listening(xds)
        second = await asyncio.to_thread(
            run, "serve", "--xds-port", str(xds), "--admin-port", "0", "--router-port", "0"
        )
        assert second.returncode != 0
    finally:
        first.terminate()
        await first.wait()


async def _wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)
