"""Shedding at saturation: what refusing part of an overloaded pool's traffic at the edge buys.

One real Envoy 1.40 in front of three simulated vLLM servers (`xds-lab simulate`, their own
process), the control plane in this process, and an open-loop load generator in a child
process (Poisson arrivals, non-streamed completions), at 120 % and 150 % of the fleet's
capacity, measured first by driving every server at full batch. Per load, two cells:

  none   the pool as the product ships it (weighting: orca, least_request): no shedding;
  shed   the same pool with `shedding: {}` (max_drop 0.5, settle 5 s: the defaults).

Each cell starts from a fresh fleet, plane and Envoy and sends for `--seconds`; the figures
are over the requests sent from `--measure-from` on (shedding decides once per 5 s, after
the pool saturates): the share Envoy refused (503 with x-envoy-drop-overload), other errors,
requests not answered within the client timeout, and p50/p99 latency of the served ones;
`served` is the rate the fleet finished meanwhile by Envoy's LRS counts, `goodput` the
requests of the window served per second, `drop pub` the mean fraction the plane published,
`loadavg` the machine's load average after the cell (on shared cores the fleet slows when it
is high, and the cells stop being comparable).
Also recorded per second: that fraction, the least pressure, the servers' waiting queues
and LRS rates.

    .venv/bin/python bench/shedding.py                  # ~4 min on 2 cores
    .venv/bin/python bench/shedding.py --loads 1.5 --seconds 30

Writes bench/results/shedding.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings, one_pool_snapshot
from xds_lab.loadgen import Mix, Request, RequestMix, body, percentile, poisson_schedule
from xds_lab.simulator.options import SimulatorConfig
from xds_lab.simulator.process import SimulatorProcess

RESULTS = Path(__file__).resolve().parent / "results"
POOL = "llama"
NODE = "bench-shedding"
SERVERS = 3
#: Small batches and doubled durations: a fleet of a few tens of requests per second, which
#: the load generator and Envoy drive without becoming the bottleneck on two shared cores.
SIM = SimulatorConfig.profile("fast", max_num_seqs=4, time_scale=2.0, seed=1)
MIX = Mix(RequestMix(200, 40, 0.5, max_prompt_tokens=800, max_output_tokens=80), 0.0)
ORCA = {"blackout": 2.0, "push_interval": 1.0}


# --------------------------------------------------------------------------- load generator


async def generate(url: str, rate: float, duration: float, seed: int, timeout: float) -> list[Any]:
    """The child process's work: open-loop arrivals; per request [sent offset, outcome, latency]
    with outcome ok, dropped (Envoy's own 503), error, or timeout (latency None)."""
    schedule = poisson_schedule(rate, duration, random.Random(seed), MIX)
    records: list[Any] = []

    async def one(session: aiohttp.ClientSession, request: Request, sent: float) -> None:
        outcome, latency = "timeout", None
        try:
            async with asyncio.timeout(timeout):
                async with session.post(url, json=body(request, "llama-3-8b")) as resp:
                    await resp.read()
                    if resp.status == 200:
                        outcome = "ok"
                    elif resp.status == 503 and resp.headers.get("x-envoy-drop-overload"):
                        outcome = "dropped"
                    else:
                        outcome = f"error {resp.status}"
                    latency = time.monotonic() - sent
        except TimeoutError:
            pass
        except aiohttp.ClientError as err:
            outcome = f"error {type(err).__name__}"
        records.append([round(sent - started, 4), outcome, latency])

    tasks = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.monotonic()
        for request in schedule:
            await asyncio.sleep(max(0.0, started + request.at - time.monotonic()))
            task = asyncio.create_task(one(session, request, time.monotonic()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.wait(set(tasks))
    return records


async def load_from_child(
    url: str, rate: float, duration: float, seed: int, timeout: float
) -> list[Any]:
    """Runs `generate` in a child process (its own interpreter and core), so the plane and
    the generator do not slow each other down."""
    args = [url, str(rate), str(duration), str(seed), str(timeout)]
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--loadgen",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"load generator failed: {stderr.decode(errors='replace')[-2000:]}")
    records: list[Any] = json.loads(stdout)
    return records


# --------------------------------------------------------------------------- fleet and cells


async def measure_capacity(seconds: float) -> float:
    """Requests per second the fleet serves with every server driven at a full batch and a
    short queue (closed loop, straight to the servers, no Envoy)."""
    fleet = SimulatorProcess(SIM, SERVERS)
    await fleet.start()
    done = 0
    try:
        rng = random.Random(7)
        deadline = time.monotonic() + 2.0 + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def worker(server_url: str) -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    request = Request(0.0, *MIX.draw(rng))
                    async with session.post(
                        f"{server_url}/v1/completions", json=body(request, "llama-3-8b")
                    ) as resp:
                        await resp.read()
                    if resp.status == 200 and time.monotonic() > deadline - seconds:
                        done += 1

            per_server = 2 * SIM.max_num_seqs
            await asyncio.gather(
                *(worker(server.url) for server in fleet.servers for _ in range(per_server))
            )
    finally:
        await fleet.stop()
    return done / seconds


def pool_spec(ports: Sequence[int], shed: bool) -> dict[str, Any]:
    pool: dict[str, Any] = {
        "name": POOL,
        "weighting": "orca",
        "orca": ORCA,
        "endpoints": [{"address": "127.0.0.1", "port": p, "zone": "zone-a"} for p in ports],
    }
    if shed:
        pool["shedding"] = {}
    return pool


#: What `sample` records once a second.
TIMELINE = ("t", "published_drop", "least_pressure", "waiting", "served_rps", "issued_rps")


async def sample(pair: PlaneWithEnvoy, fleet: SimulatorProcess, into: list[Any]) -> None:
    """Once a second, TIMELINE: the drop fraction the plane published, the least pressure the
    policy sees, the requests waiting in the servers' queues, and the rates Envoy reported
    over LRS (finished, issued; over the store's window)."""
    plane = pair.plane
    started = time.monotonic()
    while True:
        weights = plane.publisher.weights.get(POOL)
        state = plane.engine.pools.get(POOL)
        latest = state.latest if state is not None else None
        pressure = latest.saturation.pressure if latest and latest.saturation else None
        waiting = sum([(await s.state()).waiting for s in fleet.servers])
        loads = plane.store.pool_load(POOL, time.monotonic()).values()
        into.append(
            [
                round(time.monotonic() - started, 1),
                weights.drop_ppm / 1e6 if weights is not None else 0.0,
                None if pressure is None else round(pressure, 3),
                waiting,
                round(sum(load.rps for load in loads), 2),
                round(sum(load.issued_rps for load in loads), 2),
            ]
        )
        await asyncio.sleep(1.0)


async def run_cell(
    load: float, shed: bool, capacity: float, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    label = f"{load:.0%} {'shed' if shed else 'none'}"
    folder = workdir / label.replace(" ", "-").replace("%", "")
    folder.mkdir()
    fleet = SimulatorProcess(SIM, SERVERS)
    await fleet.start()
    timeline: list[Any] = []
    try:
        port = free_port()
        document = one_pool_snapshot(port, pool_spec([s.port for s in fleet.servers], shed))
        path = folder / "snapshot.yaml"
        path.write_text(yaml.safe_dump(document))
        pair = PlaneWithEnvoy(local_settings(path), folder, NODE)
        async with pair:
            sampler = asyncio.create_task(sample(pair, fleet, timeline))
            try:
                url = f"http://127.0.0.1:{port}/v1/completions"
                seed = args.seed * 100 + round(load * 10)  # the same arrivals with and without
                records = await load_from_child(
                    url, load * capacity, args.seconds, seed, args.timeout
                )
            finally:
                sampler.cancel()
    finally:
        await fleet.stop()
    cell: dict[str, Any] = {"load": load, "shedding": shed, "loadavg_before": _loadavg()}
    cell["offered_rps"] = round(load * capacity, 2)
    cell |= summarize(records, args.measure_from, args.seconds)
    window = [row for row in timeline if args.measure_from <= row[0] < args.seconds]
    cell["mean_published_drop"] = _mean([row[1] for row in window])
    # What the fleet really served while saturated (Envoy's LRS counts), against which the
    # offered rate is the real overload: the capacity measured alone is a little higher.
    cell["fleet_served_rps"] = _mean([row[4] for row in window])
    cell["loadavg_after"] = _loadavg()
    cell["timeline_columns"] = TIMELINE
    cell["timeline"] = timeline
    return cell


def summarize(records: list[Any], start: float, end: float) -> dict[str, Any]:
    """Figures over the requests sent in [start, end)."""
    sent = [r for r in records if start <= r[0] < end]
    total = len(sent) or 1
    served = sorted(r[2] for r in sent if r[1] == "ok")
    count = {kind: sum(r[1] == kind for r in sent) for kind in ("ok", "dropped", "timeout")}
    errors = len(sent) - sum(count.values())
    return {
        "requests": len(sent),
        "served": count["ok"],
        "dropped_share": round(count["dropped"] / total, 4),
        "error_share": round(errors / total, 4),
        "unanswered_share": round(count["timeout"] / total, 4),
        "goodput_rps": round(count["ok"] / (end - start), 2),
        "p50_s": _round(percentile(served, 50)),
        "p99_s": _round(percentile(served, 99)),
    }


def _round(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def _loadavg() -> float:
    """The machine's 1-minute load average: on shared cores, what to read the cell against."""
    return round(os.getloadavg()[0], 1)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


# --------------------------------------------------------------------------- report


HEADER = (
    f"{'load':>5} {'shedding':>8} {'offered':>8} {'served':>7} {'goodput':>8} {'503 drop':>8} "
    f"{'errors':>7} {'no answer':>9} {'p50 s':>7} {'p99 s':>7} {'drop pub':>8} {'loadavg':>6}"
)


def table_row(cell: dict[str, Any]) -> str:
    def seconds(value: float | None) -> str:
        return f"{value:7.2f}" if value is not None else f"{'-':>7}"

    return (
        f"{cell['load']:>5.0%} {'on' if cell['shedding'] else 'off':>8} "
        f"{cell['offered_rps']:>8.1f} {(cell['fleet_served_rps'] or 0.0):>7.1f} "
        f"{cell['goodput_rps']:>8.1f} "
        f"{cell['dropped_share']:>8.1%} {cell['error_share']:>7.1%} "
        f"{cell['unanswered_share']:>9.1%} {seconds(cell['p50_s'])} {seconds(cell['p99_s'])} "
        f"{(cell['mean_published_drop'] or 0.0):>8.1%} {cell['loadavg_after']:>6.1f}"
    )


async def main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    capacity = args.capacity or await measure_capacity(args.capacity_seconds)
    print(f"fleet capacity {capacity:.1f} requests/s ({SERVERS} servers)", flush=True)
    print(HEADER, flush=True)
    cells = []
    with tempfile.TemporaryDirectory(prefix="bench-shedding-") as workdir:
        for load in args.loads:
            for shed in (False, True):
                cell = await run_cell(load, shed, capacity, args, Path(workdir))
                cells.append(cell)
                print(table_row(cell), flush=True)
    result = {
        "command": " ".join(["bench/shedding.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "note": "shared with other work; timings noisy"},
        "simulator": SIM.as_dict(),
        "servers": SERVERS,
        "orca": ORCA,
        "capacity_rps": round(capacity, 2),
        "seconds": args.seconds,
        "measured_from": args.measure_from,
        "client_timeout_s": args.timeout,
        "cells": cells,
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "shedding.json"
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {target} in {result['wall_s']} s", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--loads", default="1.2,1.5", help="fractions of capacity")
    parser.add_argument("--seconds", type=float, default=45.0, help="of load per cell")
    parser.add_argument("--measure-from", type=float, default=18.0, help="seconds into a cell")
    parser.add_argument("--timeout", type=float, default=15.0, help="client timeout per request")
    parser.add_argument("--capacity-seconds", type=float, default=8.0)
    parser.add_argument("--capacity", type=float, default=0.0, help="skip measuring: this rps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        args.loads = [float(x) for x in args.loads.split(",")]
    except ValueError:
        parser.error("--loads takes fractions of capacity, e.g. 1.2,1.5")
    if not 0 <= args.measure_from < args.seconds:
        parser.error("--measure-from must be within the cell (0 <= it < --seconds)")
    return args


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loadgen"]:
        url, rate, duration, seed, timeout = sys.argv[2:7]
        records = asyncio.run(
            generate(url, float(rate), float(duration), int(seed), float(timeout))
        )
        json.dump(records, sys.stdout)
    else:
        asyncio.run(main(parse_args()))
