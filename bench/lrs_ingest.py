"""LRS ingest benchmark: how many Envoy load reports one server process takes in, per second.

Synthetic reporters stream LoadStatsRequests shaped like Envoy 1.40's over real gRPC:
the full node (~61 KB, ~500 extensions) on every report, 100 clusters x 20 endpoints
in two localities, 3 ORCA metrics per endpoint. Prints the reports/s and endpoint
stats/s the server ingests, its CPU time per report, and whether one core covers 1,000
Envoys reporting every second (the target: at most 1 ms of CPU per report).

Baseline in the same run: a bare grpc.aio StreamLoadStats handler that parses every
request in full (LoadStatsRequest.FromString) and drops it: the floor of gRPC plus
protobuf, with nothing kept. Each server runs in its own subprocess, so the reporters'
CPU never sits on its event loop; runs alternate between the two servers.

    .venv/bin/python bench/lrs_ingest.py                # 3 runs of 5 s per server, ~40 s
    .venv/bin/python bench/lrs_ingest.py --seconds 2 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import cli
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.load_stats.v3 import lrs_pb2
from fanout import (
    AdsCall,
    ServerProcess,
    ServerUnderTest,
    command_loop,
    exit_without_goaway,
    pool_name,
)

from lrs.contract import raw_bytes
from lrs.load_reporting_service import METHOD, SERVICE, LoadReportingService
from lrs.load_store import SLICE_STATS, LoadStore
from lrs.wire import TrimmedReport
from xds_lab.envoy_rig import BENCH_LIMITS
from xds_server.admission import Admission
from xds_server.grpc_server import SERVER_OPTIONS, start_grpc_server
from xds_server.xds import typeurls
from xds_server.xds.services import DiscoveryServices

STREAM_METHOD = f"/{SERVICE}/{METHOD}"
ZONES = ("zone-a", "zone-b")
METRICS = (
    ("named_metrics.kv_cache_usage_perc", 0.62),
    ("named_metrics.num_requests_waiting", 1.5),
    ("cpu_utilization", 0.4),
)
#: Reporting every second, 1,000 Envoys send 1,000 reports/s: one core has 1 ms for each.
TARGET_ENVOYS = 1000
TARGET_INTERVAL = 1.0
#: Reporter streams per client channel (TCP connection).
STREAMS_PER_CHANNEL = 10
PHASE_TIMEOUT = 60.0
SCRIPT = str(Path(__file__).resolve())
KB = 1000


# --- what Envoy sends ------------------------------------------------------------------


def envoy_node(node_id: str, extensions: int = 500) -> base_pb2.Node:
    """A node the size of Envoy 1.40's: build info and ~500 extensions, ~61 KB encoded."""
    node = base_pb2.Node(id=node_id, cluster="bench", user_agent_name="envoy")
    version = node.user_agent_build_version.version
    version.major_number, version.minor_number = 1, 40
    node.client_features.extend(["envoy.lb.does_not_support_overprovisioning", "xds.config"])
    categories = ("envoy.filters.http", "envoy.filters.network", "envoy.transport_sockets")
    for i in range(extensions):
        category = categories[i % len(categories)]
        name = f"extension_{i:04d}"
        node.extensions.add(
            name=f"{category}.{name}",
            category=category,
            type_urls=[f"envoy.extensions.{category[6:]}.{name}.v3.Config"],
        )
    return node


def endpoint_key(pool: int, endpoint: int) -> str:
    return f"10.{pool // 250}.{pool % 250}.{endpoint + 1}:8000"


def cluster_stats(pools: int, endpoints: int) -> lrs_pb2.LoadStatsRequest:
    """One report's load: every endpoint busy, as an Envoy that spreads traffic sends it."""
    request = lrs_pb2.LoadStatsRequest()
    for pool in range(pools):
        stats = request.cluster_stats.add(cluster_name=pool_name(pool))
        stats.load_report_interval.FromMilliseconds(1000)
        for z, zone in enumerate(ZONES):
            locality = stats.upstream_locality_stats.add()
            locality.locality.zone = zone
            members = range(z, endpoints, len(ZONES))
            for e in members:
                host, port = endpoint_key(pool, e).split(":")
                endpoint = locality.upstream_endpoint_stats.add(
                    total_successful_requests=12,
                    total_error_requests=1,
                    total_issued_requests=13,
                    total_requests_in_progress=4,
                )
                endpoint.address.socket_address.address = host
                endpoint.address.socket_address.port_value = int(port)
                for name, mean in METRICS:
                    endpoint.load_metric_stats.add(
                        metric_name=name,
                        num_requests_finished_with_metric=13,
                        total_metric_value=13 * mean,
                    )
            locality.total_successful_requests = 12 * len(members)
            locality.total_error_requests = len(members)
            locality.total_issued_requests = 13 * len(members)
            locality.total_requests_in_progress = 4 * len(members)
            for name, mean in METRICS:
                locality.load_metric_stats.add(
                    metric_name=name,
                    num_requests_finished_with_metric=13 * len(members),
                    total_metric_value=13 * len(members) * mean,
                )
    return request


def known_endpoints(pools: int, endpoints: int) -> dict[str, list[str]]:
    return {pool_name(p): [endpoint_key(p, e) for e in range(endpoints)] for p in range(pools)}


def first_message(node_id: str) -> bytes:
    return lrs_pb2.LoadStatsRequest(node=envoy_node(node_id)).SerializeToString()


def report_bytes(pools: int, endpoints: int) -> bytes:
    """A whole report, node included: protobuf merges the concatenated halves."""
    return first_message("bench-envoy") + cluster_stats(pools, endpoints).SerializeToString()


# --- the servers -----------------------------------------------------------------------


def counters(reports: int, endpoint_stats: int) -> dict[str, Any]:
    return {"reports": reports, "endpoint_stats": endpoint_stats, "cpu": time.process_time()}


async def run_ours(pools: int, endpoints: int, slice_stats: int) -> NoReturn:
    """Our LoadReportingService and LoadStore, knowing every endpoint the reports name,
    on one gRPC server with our xDS services (the same pools), as the control plane runs."""
    store = LoadStore()
    store.set_known(known_endpoints(pools, endpoints))
    names = [pool_name(p) for p in range(pools)]
    # Reporters send nonstop: a 1 ms interval keeps them on time (the service drops reports
    # sooner than the asked interval), and a budget of many cores keeps it from being raised.
    service = LoadReportingService(
        store, lambda _: names, interval=0.001, cpu_budget=1000.0, slice_stats=slice_stats
    )
    xds = ServerUnderTest(pools, endpoints)
    gate = Admission(BENCH_LIMITS).gate
    handlers = [*DiscoveryServices(xds.cache, xds.registry, gate).handlers(), *service.handlers()]
    _server, port = await start_grpc_server(handlers, "127.0.0.1", 0)  # keep a ref
    print(json.dumps({"port": port}), flush=True)
    await command_loop(lambda _: counters(service.reports_received, store.endpoint_stats))
    exit_without_goaway()


class RawLrs:
    """The floor: grpc.aio parsing each request in full, answering the first, keeping nothing."""

    def __init__(self, pools: int) -> None:
        names = [pool_name(p) for p in range(pools)]
        response = lrs_pb2.LoadStatsResponse(clusters=names, report_endpoint_granularity=True)
        response.load_reporting_interval.FromSeconds(1)
        self.response = response.SerializeToString()
        self.reports = 0

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.serve,
            request_deserializer=lrs_pb2.LoadStatsRequest.FromString,
            response_serializer=raw_bytes,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})

    async def serve(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        answered = False
        async for _request in requests:
            self.reports += 1
            if not answered:
                answered = True
                await context.write(self.response)


async def run_raw(pools: int) -> NoReturn:
    raw = RawLrs(pools)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers([raw.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"port": port}), flush=True)
    await command_loop(lambda _: counters(raw.reports, 0))
    exit_without_goaway()


async def start_role(role: str, args: argparse.Namespace) -> ServerProcess:
    sizes = ("--pools", str(args.pools), "--endpoints", str(args.endpoints))
    sizes += ("--slice-stats", str(args.slice_stats))
    command = (sys.executable, SCRIPT, "--role", role, *sizes)
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(*command, stdin=pipe, stdout=pipe)
    line = await asyncio.wait_for(proc.stdout.readline(), PHASE_TIMEOUT)  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"{role} server exited before listening")
    return ServerProcess(proc, json.loads(line)["port"])


# --- the reporters ---------------------------------------------------------------------


class Reporters:
    """N LRS streams, each sending the same pre-encoded report as fast as the server reads.

    Pre-encoded, so the bench process spends its CPU on sending, not on encoding.
    """

    def __init__(self, port: int, streams: int, report: bytes) -> None:
        self.target = f"127.0.0.1:{port}"
        self.streams = streams
        self.report = report
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.connected = 0
        self.go = asyncio.Event()

    async def start(self) -> None:
        """Open every stream and wait for every handshake; then all of them report nonstop.

        Handshakes first: a server saturated by reports accepts new streams slowly (that
        is measured on its own, by `handshake_seconds`).
        """
        for _ in range(-(-self.streams // STREAMS_PER_CHANNEL)):
            options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection each
            self.channels.append(grpc.aio.insecure_channel(self.target, options=options))
        for i in range(self.streams):
            channel = self.channels[i // STREAMS_PER_CHANNEL]
            self.tasks.append(asyncio.create_task(self.run(channel, f"bench-envoy-{i}")))
        deadline = time.monotonic() + PHASE_TIMEOUT
        while self.connected < self.streams:
            for task in self.tasks:
                if task.done():
                    task.result()  # a stream's error
                    raise RuntimeError("a reporter stream ended early")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.connected}/{self.streams} handshakes in time")
            await asyncio.sleep(0.01)
        self.go.set()

    async def run(self, channel: grpc.aio.Channel, node_id: str) -> None:
        call = await handshake(channel, node_id)
        self.connected += 1
        await self.go.wait()
        while True:
            await call.write(self.report)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        await asyncio.gather(*(c.close() for c in self.channels))
        self.channels.clear()


async def handshake(channel: grpc.aio.Channel, node_id: str) -> grpc.aio.StreamStreamCall:
    """Open an LRS stream as Envoy does: the node first, then the server's answer."""
    call = channel.stream_stream(
        STREAM_METHOD, request_serializer=raw_bytes, response_deserializer=raw_bytes
    )()
    await call.write(first_message(node_id))
    if await call.read() is grpc.aio.EOF:
        raise RuntimeError(f"{node_id}: the server closed the stream")
    return call


async def handshake_seconds(port: int) -> float:
    """How long a newly connecting Envoy waits for its first LoadStatsResponse right now."""
    start = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            call = await asyncio.wait_for(handshake(channel, "bench-probe"), PHASE_TIMEOUT)
        except TimeoutError:
            return math.inf
        call.cancel()
    return time.monotonic() - start


async def xds_first_response_seconds(port: int) -> float:
    """How long a newly connecting ADS client waits for its first CDS response right now;
    NaN where no xDS is served (the raw server)."""
    start = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        ads = AdsCall(channel, "bench-xds-probe", b"")
        first = discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER)
        first.node.id, first.node.cluster = "bench-xds-probe", "bench"
        try:
            await ads.call.write(first.SerializeToString())
            await asyncio.wait_for(ads.read(typeurls.CLUSTER), PHASE_TIMEOUT)
        except grpc.aio.AioRpcError:
            return math.nan
        except TimeoutError:
            return math.inf
        finally:
            ads.call.cancel()
    return time.monotonic() - start


async def measure(server: ServerProcess, args: argparse.Namespace, report: bytes) -> dict:
    """One run: open the streams, warm up, then count what the server took in for a while.

    Meanwhile one more LRS stream and one ADS stream connect, timing their first response
    under that load.
    """
    fleet = Reporters(server.port, args.streams, report)
    try:
        await fleet.start()
        await asyncio.sleep(args.warmup)
        before = await server.command("stats")
        start, cpu = time.monotonic(), time.process_time()
        probe = asyncio.create_task(handshake_seconds(server.port))
        await asyncio.sleep(args.seconds / 2)
        xds_probe = asyncio.create_task(xds_first_response_seconds(server.port))
        await asyncio.sleep(args.seconds / 2)
        after = await server.command("stats")
        wall, cpu = time.monotonic() - start, time.process_time() - cpu
        probed, xds_probed = await probe, await xds_probe
    finally:
        await fleet.close()
    reports = after["reports"] - before["reports"]
    server_cpu = after["cpu"] - before["cpu"]
    return {
        "reports_per_s": reports / wall,
        "endpoint_stats_per_s": (after["endpoint_stats"] - before["endpoint_stats"]) / wall,
        "server_cpu_ms_per_report": 1000 * server_cpu / max(reports, 1),
        "server_cpu_share": server_cpu / wall,
        "client_cpu_share": cpu / wall,
        "handshake_s": probed,
        "xds_first_response_s": xds_probed,
    }


# --- in-process breakdown of one report ------------------------------------------------


def _median_ms(action: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def after_node(report: bytes) -> memoryview:
    """The report past a leading node field (field 1, length-delimited), as a view."""
    view = memoryview(report)
    if not report or report[0] != 0x0A:
        return view
    length, shift, at = 0, 0, 1
    while True:
        byte = report[at]
        length |= (byte & 0x7F) << shift
        at += 1
        shift += 7
        if byte < 0x80:
            return view[at + length :]


def breakdown(args: argparse.Namespace, report: bytes) -> dict[str, float]:
    """Where one report's CPU goes, without gRPC: the two parses, the store's ingest of a
    parsed message again and again, and parse plus ingest of a fresh one per report."""
    store = LoadStore()
    store.set_known(known_endpoints(args.pools, args.endpoints))
    parsed = TrimmedReport.FromString(report)
    clock = iter(range(10**9))
    store.ingest("warm", parsed, 0.0)
    return {
        "parse_full_ms": _median_ms(lambda: lrs_pb2.LoadStatsRequest.FromString(report), 30),
        "parse_without_node_ms": _median_ms(lambda: TrimmedReport.FromString(report), 30),
        # The alternative: cut the node off in Python first (a view, no copy). upb skips
        # an undeclared field about as fast, so the service does not.
        "parse_node_cut_ms": _median_ms(lambda: TrimmedReport.FromString(after_node(report)), 30),
        "ingest_ms": _median_ms(lambda: store.ingest("r", parsed, next(clock) * 0.1), 30),
        # upb builds Python wrappers on first access and reuses them while the message
        # lives: a fresh message per report, as the service has, costs more to read.
        "parse_and_ingest_ms": _median_ms(
            lambda: store.ingest("r", TrimmedReport.FromString(report), next(clock) * 0.1), 30
        ),
        "pool_load_all_ms": _median_ms(
            lambda: [store.pool_load(pool_name(p), 3.0) for p in range(args.pools)], 10
        ),
    }


# --- report ----------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    report = report_bytes(args.pools, args.endpoints)
    out: dict[str, Any] = {
        "pools": args.pools,
        "endpoints": args.endpoints,
        "streams": args.streams,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "report_bytes": len(report),
        "node_bytes": len(first_message("bench-envoy")),
        "endpoint_stats_per_report": args.pools * args.endpoints,
        "loadavg_before": os.getloadavg()[0],
        "in_process": breakdown(args, report),
    }
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "raw": []}
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for role in ("ours", "raw"):
            servers[role] = await start_role(role, args)
            stack.push_async_callback(servers[role].stop)
        for _ in range(args.repeat):
            for role, server in servers.items():
                runs[role].append(await measure(server, args, report))
    for role, results in runs.items():
        out[role] = {key: statistics.median(r[key] for r in results) for key in results[0]}
        out[role]["runs"] = results
    out["loadavg_after"] = os.getloadavg()[0]
    return out


def report_table(out: dict[str, Any]) -> str:
    ours, raw = out["ours"], out["raw"]
    per_report = out["endpoint_stats_per_report"]
    raw_stats = raw["reports_per_s"] * per_report  # the raw server parses, it does not count
    rows = [
        ("LoadStatsRequests/s", ours["reports_per_s"], raw["reports_per_s"]),
        ("endpoint stats/s", ours["endpoint_stats_per_s"], raw_stats),
    ]
    for label, key in (
        ("server CPU per report (ms)", "server_cpu_ms_per_report"),
        ("server CPU share (cores)", "server_cpu_share"),
        ("client CPU share (cores)", "client_cpu_share"),
        ("new LRS stream's handshake (s)", "handshake_s"),
        ("new ADS stream's first CDS (s)", "xds_first_response_s"),
    ):
        rows.append((label, ours[key], raw[key]))
    lines = [
        f"lrs ingest: {out['streams']} reporter streams, {out['pools']} clusters x "
        f"{out['endpoints']} endpoints ({per_report} endpoint stats, 3 ORCA metrics each) per "
        f"report of {out['report_bytes'] / KB:.0f} kB (node {out['node_bytes'] / KB:.0f} kB); "
        f"median of {out['repeat']} runs of {out['seconds']:g} s; load average "
        f"{out['loadavg_before']:.2f} before, {out['loadavg_after']:.2f} after",
        f"{'':32} {'ours':>12} {'raw':>12} {'ours/raw':>9}",
    ]
    for label, mine, theirs in rows:
        ratio = f"{mine / theirs:9.2f}" if theirs else f"{'-':>9}"
        lines.append(f"{label:32} {mine:12.2f} {theirs:12.2f} {ratio}")
    for role in ("ours", "raw"):
        per_run = " ".join(f"{r['reports_per_s']:.0f}" for r in out[role]["runs"])
        lines.append(f"reports/s per run, {role}: {per_run}")
    inside = out["in_process"]
    lines += [
        "one report in-process, no gRPC (median ms):",
        f"  parse as LoadStatsRequest (node included)   {inside['parse_full_ms']:8.3f}",
        f"  parse as TrimmedReport (node skipped)       {inside['parse_without_node_ms']:8.3f}",
        f"  cut the node off in Python, then parse      {inside['parse_node_cut_ms']:8.3f}",
        f"  LoadStore.ingest, same message again        {inside['ingest_ms']:8.3f}",
        f"  parse + LoadStore.ingest, fresh message     {inside['parse_and_ingest_ms']:8.3f}",
        f"  pool_load of every cluster (all endpoints)  {inside['pool_load_all_ms']:8.3f}",
    ]
    budget_ms = 1000 * TARGET_INTERVAL / TARGET_ENVOYS
    cost_ms = ours["server_cpu_ms_per_report"]
    verdict = "PASS" if cost_ms <= budget_ms else "FAIL"
    lines += [
        "target:",
        f"  {verdict}  {TARGET_ENVOYS:,} Envoys at a {TARGET_INTERVAL:g} s interval on one core: "
        f"{cost_ms:.2f} ms of CPU per report (budget {budget_ms:.2f} ms)",
        f"  one core covers {1000 / cost_ms:,.0f} Envoys at {TARGET_INTERVAL:g} s, or "
        f"{TARGET_ENVOYS:,} Envoys at an interval of {TARGET_ENVOYS * cost_ms / 1000:.1f} s",
    ]
    return "\n".join(lines)


#: The copies of itself the benchmark starts: the LRS service under test, and the raw baseline.
ROLES: dict[str, cli.Role] = {
    "ours": lambda args: run_ours(args.pools, args.endpoints, args.slice_stats),
    "raw": lambda args: run_raw(args.pools),
}


def main() -> None:
    parser = cli.parser(__doc__, ROLES)
    parser.add_argument("--streams", type=int, default=40, help="reporter streams (default 40)")
    parser.add_argument("--pools", type=int, default=100, help="clusters (default 100)")
    parser.add_argument("--endpoints", type=int, default=20, help="per cluster (default 20)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="before each run (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per server (median)")
    parser.add_argument(
        "--slice-stats",
        type=int,
        default=SLICE_STATS,
        help=f"endpoint stats merged between yields to the loop (default {SLICE_STATS})",
    )
    args = parser.parse_args()
    if not cli.played_role(args, ROLES):
        out = asyncio.run(run_bench(args))
        cli.publish(report_table(out), out, args.json)


if __name__ == "__main__":
    main()
