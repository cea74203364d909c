"""Spread LRS reporting at fleet scale: ingest CPU of 1,000 Envoys, and what accuracy it costs.

Ingest: 1,000 reporter streams (in generator processes of their own) report like Envoy
1.40 at the interval the server asks: the full node (~61 KB) on every report, and the
clusters the server asked that stream for (100 pools x 20 endpoints, 3 ORCA metrics per
endpoint), re-read from every LoadStatsResponse. The server (its own process: our
LoadReportingService and LoadStore) runs spread reporting (`--lrs-reporters-per-pool K`)
and, in the same run, full reporting (every stream asked for every pool). Figures: the
server's CPU seconds per wall second, reports and endpoint stats per second, and the
interval it ended up asking for (full reporting over its CPU budget lengthens it).

Accuracy: a synthetic fleet (`xds_lab.lrs_fleet`: Envoys whose volume, pool shares and
endpoint splits differ; Poisson counts; a tenth of them reconnecting halfway) played into
the real store, full vs spread, the same traffic: per-endpoint rates, in-flight levels, KV
means and the headroom policy's weights.

    .venv/bin/python bench/lrs_spread.py --json bench/results/lrs_spread.json   # ~3 min
    .venv/bin/python bench/lrs_spread.py --seconds 5 --per-pool 8 --skip-full --skip-accuracy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any, NoReturn

import cli
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.load_stats.v3 import lrs_pb2
from fanout import ServerProcess, command_loop, exit_without_goaway, pool_name, raise_fd_limit
from lrs_ingest import (
    STREAM_METHOD,
    breakdown,
    cluster_stats,
    first_message,
    known_endpoints,
    report_bytes,
)

from lrs.contract import raw_bytes
from lrs.load_reporting_service import LoadReportingService
from lrs.load_store import LoadStore
from xds_lab.lrs_fleet import Fleet, compare, run_fleet
from xds_server.grpc_server import start_grpc_server

SCRIPT = str(Path(__file__).resolve())
TARGET_ENVOYS = 1000
#: Streams per client channel (one TCP connection each).
STREAMS_PER_CHANNEL = 10
#: Spread settings compared for accuracy (reporters per pool).
ACCURACY_K = (4, 8, 16, 32)


# --- the server ------------------------------------------------------------------------


async def run_server(args: argparse.Namespace) -> NoReturn:
    """Our LRS service and store knowing every endpoint; `--per-pool 0`: full reporting."""
    store = LoadStore()
    store.set_known(known_endpoints(args.pools, args.endpoints))
    names = [pool_name(p) for p in range(args.pools)]
    service = LoadReportingService(
        store,
        lambda _: names,
        interval=1.0,
        cpu_budget=args.cpu_budget,
        reporters_per_pool=args.per_pool[0] or None,  # the role is given one K
        max_streams_per_node=4,
    )
    _server, port = await start_grpc_server(service.handlers(), "127.0.0.1", 0)
    print(json.dumps({"port": port}), flush=True)

    def stats(_: str) -> dict[str, Any]:
        loads = [service.assignment.load(i) for i in service.stream_ids()]
        return {
            "reports": service.reports_received,
            "endpoint_stats": store.endpoint_stats,
            "cpu": time.process_time(),
            "interval": service.reporting_interval,
            "reporters": service.connected_reporters,
            "moves": service.assignment.moves,
            "max_stats_per_reporter": max(loads, default=0),
            "reporting_streams": sum(1 for load in loads if load),
        }

    await command_loop(stats)
    exit_without_goaway()


# --- the reporters ---------------------------------------------------------------------


class Reporter:
    """One Envoy-like LRS stream: reports what it was last asked for, at the asked interval."""

    def __init__(self, node: bytes, pools: dict[str, bytes]) -> None:
        self.node = node
        self.pools = pools
        self.asked: list[str] = []
        self.interval = 1.0
        self.changed = asyncio.Event()

    async def run(self, channel: grpc.aio.Channel, ready: asyncio.Event, go: asyncio.Event) -> None:
        call = channel.stream_stream(
            STREAM_METHOD, request_serializer=raw_bytes, response_deserializer=raw_bytes
        )()
        await call.write(self.node)
        self._apply(await call.read())
        ready.set()
        listener = asyncio.create_task(self._listen(call))
        await go.wait()
        try:
            await asyncio.sleep(random.uniform(0, self.interval))  # Envoys are out of phase
            while True:
                # A new response restarts Envoy's timer; so it does here.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), self.interval)
                    self.changed.clear()
                    continue
                await call.write(self.node + b"".join(self.pools[name] for name in self.asked))
        finally:
            listener.cancel()

    async def _listen(self, call: Any) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            self._apply(message)
            self.changed.set()

    def _apply(self, message: Any) -> None:
        response = lrs_pb2.LoadStatsResponse.FromString(message)
        self.asked = [name for name in response.clusters if name in self.pools]
        self.interval = response.load_reporting_interval.ToNanoseconds() / 1e9


async def run_reporters(args: argparse.Namespace) -> NoReturn:
    """`--streams` reporters named from `--first`; prints once all have been answered."""
    raise_fd_limit()
    shared = first_message("bench-envoy")
    every = cluster_stats(args.pools, args.endpoints).cluster_stats
    pools = {
        pool_name(p): lrs_pb2.LoadStatsRequest(cluster_stats=[every[p]]).SerializeToString()
        for p in range(args.pools)
    }
    channels, tasks = [], []
    go = asyncio.Event()
    readies = []
    target = f"127.0.0.1:{args.port}"
    for i in range(args.streams):
        if i % STREAMS_PER_CHANNEL == 0:
            options = [("grpc.use_local_subchannel_pool", 1)]
            channels.append(grpc.aio.insecure_channel(target, options=options))
        # The node field twice: protobuf merges them, so this id overrides the shared one.
        own = base_pb2.Node(id=f"bench-envoy-{args.first + i}")
        node = shared + lrs_pb2.LoadStatsRequest(node=own).SerializeToString()
        ready = asyncio.Event()
        readies.append(ready)
        reporter = Reporter(node, pools)
        tasks.append(asyncio.create_task(reporter.run(channels[-1], ready, go)))
        if i % 50 == 49:
            await asyncio.gather(*(r.wait() for r in readies))  # a join storm, in steps
    await asyncio.gather(*(r.wait() for r in readies))
    print(json.dumps({"port": 0}), flush=True)

    def start(_: str) -> dict[str, Any]:
        go.set()
        return {"cpu": time.process_time(), "failed": sum(t.done() for t in tasks)}

    await command_loop(start)
    exit_without_goaway()


# --- one run ---------------------------------------------------------------------------


async def measure(args: argparse.Namespace, per_pool: int) -> dict[str, Any]:
    """Start the server and the reporter processes, let the fleet settle, then measure."""
    sizes = ("--pools", str(args.pools), "--endpoints", str(args.endpoints))
    server = await ServerProcess.start(
        "server",
        *sizes,
        "--per-pool",
        str(per_pool),
        "--cpu-budget",
        str(args.cpu_budget),
        script=SCRIPT,
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(server.stop)
        share = -(-args.envoys // args.processes)
        generators = []
        joined = time.monotonic()
        for n in range(args.processes):
            streams = min(share, args.envoys - n * share)
            generator = await ServerProcess.start(
                "reporters",
                *sizes,
                "--port",
                str(server.port),
                "--streams",
                str(streams),
                "--first",
                str(n * share),
                script=SCRIPT,
            )
            stack.push_async_callback(generator.stop)
            generators.append(generator)
        joined = time.monotonic() - joined
        for generator in generators:
            await generator.command("go")
        await asyncio.sleep(args.warmup)
        before = await server.command("stats")
        start = time.monotonic()
        await asyncio.sleep(args.seconds)
        after = await server.command("stats")
        wall = time.monotonic() - start
    wall_reports = (after["reports"] - before["reports"]) / wall
    # Every stream asked for something reports once a second; idle ones once a minute.
    offered = after["reporting_streams"] / after["interval"]
    cpu = (after["cpu"] - before["cpu"]) / wall
    return {
        "per_pool": per_pool or None,
        "join_s": joined,
        "offered_reports_per_s": offered,
        # The generators share the machine: when they fall behind, the server's CPU at the
        # full offered rate is projected from its CPU per report.
        "projected_cpu_share": cpu * offered / max(wall_reports, 1e-9),
        "server_cpu_share": cpu,
        "reports_per_s": wall_reports,
        "endpoint_stats_per_s": (after["endpoint_stats"] - before["endpoint_stats"]) / wall,
        "interval_s": after["interval"],
        "reporters": after["reporters"],
        "reporting_streams": after["reporting_streams"],
        "max_stats_per_reporter": after["max_stats_per_reporter"],
        "moves": after["moves"],
    }


def accuracy(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Full vs spread on the synthetic fleet, busy and sparse traffic."""
    rows = []
    for rps in (args.fleet_rps, args.fleet_rps / 10):
        fleet = Fleet(envoys=args.fleet_envoys, pools=args.fleet_pools, rps=rps)
        full = run_fleet(fleet, None)
        for k in ACCURACY_K:
            spread = run_fleet(fleet, k)
            rows.append(
                {
                    "fleet": dataclasses.asdict(fleet),
                    "per_pool": k,
                    "stats_share": spread.endpoint_stats / full.endpoint_stats,
                    "vs_full": compare(spread, full),
                }
            )
    return rows


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "envoys": args.envoys,
        "pools": args.pools,
        "endpoints": args.endpoints,
        "seconds": args.seconds,
        "cpu_budget": args.cpu_budget,
        "loadavg_before": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "in_process_one_pool": breakdown(
            argparse.Namespace(pools=1, endpoints=args.endpoints), report_bytes(1, args.endpoints)
        ),
        "ingest": [await measure(args, k) for k in args.per_pool],
    }
    if not args.skip_full:
        out["ingest"].append(await measure(args, 0))
    out["loadavg_after_ingest"] = os.getloadavg()[0]
    out["accuracy"] = [] if args.skip_accuracy else accuracy(args)
    return out


def _pct(figures: dict[str, float]) -> str:
    return f"{100 * figures['median']:5.1f} {100 * figures['p95']:5.1f}"


def report_table(out: dict[str, Any]) -> str:
    lines = [
        f"lrs spread: {out['envoys']} reporter streams, {out['pools']} pools x "
        f"{out['endpoints']} endpoints, asked interval 1 s, CPU budget {out['cpu_budget']} "
        f"core; load average {out['loadavg_before']:.2f} before, "
        f"{out['loadavg_after_ingest']:.2f} after ({out['cpus']} CPUs, shared)",
        f"{'reporting':>10} {'CPU s/s':>8} {'at offered':>10} {'reports/s':>10} {'offered':>8} "
        f"{'stats/s':>8} {'interval':>8} {'max stats':>9} {'moves':>6} {'join s':>7}",
    ]
    for run in out["ingest"]:
        mode = f"K={run['per_pool']}" if run["per_pool"] else "full"
        lines.append(
            f"{mode:>10} {run['server_cpu_share']:8.3f} {run['projected_cpu_share']:10.3f} "
            f"{run['reports_per_s']:10.0f} {run['offered_reports_per_s']:8.0f} "
            f"{run['endpoint_stats_per_s']:8.0f} {run['interval_s']:7.1f}s "
            f"{run['max_stats_per_reporter']:9d} {run['moves']:6d} {run['join_s']:7.1f}"
        )
    inside = out["in_process_one_pool"]
    lines.append(
        f"one report of one pool in-process (median ms): parse, node skipped "
        f"{inside['parse_without_node_ms']:.3f}; full parse {inside['parse_full_ms']:.3f}; "
        f"parse + merge {inside['parse_and_ingest_ms']:.3f}"
    )
    for run in out["ingest"]:
        if not run["per_pool"]:
            continue
        met = run["projected_cpu_share"] <= 1.0 and run["interval_s"] <= 1.0
        lines.append(
            f"target: {'PASS' if met else 'FAIL'}  {out['envoys']:,} Envoys x "
            f"{out['pools'] * out['endpoints']:,} endpoints at 1 s on one core with "
            f"K={run['per_pool']}: {run['projected_cpu_share']:.2f} CPU s per s at the "
            f"offered {run['offered_reports_per_s']:.0f} reports/s, interval "
            f"{run['interval_s']:g} s"
        )
    lines.append(
        "accuracy, spread vs full, same traffic (relative difference per endpoint, "
        "median and p95, %):"
    )
    lines.append(
        f"{'Envoy rps/endpoint':>19} {'K':>3} {'stats':>6} {'rps':>11} {'in flight':>11} "
        f"{'KV mean':>11} {'weights':>11}"
    )
    for row in out["accuracy"]:
        diff = row["vs_full"]
        lines.append(
            f"{row['fleet']['rps']:19g} {row['per_pool']:3d} {100 * row['stats_share']:5.1f}% "
            f"{_pct(diff['rps'])} {_pct(diff['in_progress'])} {_pct(diff['kv'])} "
            f"{_pct(diff['weights'])}"
        )
    return "\n".join(lines)


ROLES: dict[str, cli.Role] = {"server": run_server, "reporters": run_reporters}


def main() -> None:
    parser = cli.parser(__doc__, ROLES)
    parser.add_argument("--envoys", type=int, default=TARGET_ENVOYS, help="reporter streams")
    parser.add_argument("--processes", type=int, default=2, help="reporter processes")
    parser.add_argument("--pools", type=int, default=100)
    parser.add_argument("--endpoints", type=int, default=20, help="per pool")
    parser.add_argument(
        "--per-pool",
        type=lambda text: [int(k) for k in text.split(",")],
        default=[8, 16],
        help="K of the spread runs, comma-separated (default 8,16)",
    )
    parser.add_argument("--cpu-budget", type=float, default=0.5, help="the server's, cores")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="before measuring")
    parser.add_argument("--skip-full", action="store_true", help="no full-reporting run")
    parser.add_argument("--skip-accuracy", action="store_true", help="no accuracy runs")
    parser.add_argument("--fleet-envoys", type=int, default=1000, help="accuracy fleet")
    parser.add_argument("--fleet-pools", type=int, default=5, help="accuracy fleet")
    parser.add_argument(
        "--fleet-rps", type=float, default=5.0, help="accuracy fleet: rps per Envoy per endpoint"
    )
    # The roles' own arguments.
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not cli.played_role(args, ROLES):
        out = asyncio.run(run_bench(args))
        cli.publish(report_table(out), out, args.json)


if __name__ == "__main__":
    main()
