"""Reconnect storm: N clients of our xDS server dropped at once and reconnecting at once, over
mTLS and in plaintext, through the product's default admission rate.

Prints, for the same storm over mTLS and in plaintext (in the same run, storms
alternating): the time until every client is served again, each client's wait
(p50 / p99 / max: nobody starves), the server's CPU time over the storm and its
peak RSS, and from that the server CPU of one TLS handshake. Every client is an
Envoy-like one: one connection (its own TLS handshake) and one SotW ADS stream that
asks for every cluster and their endpoints and ACKs. The server is our
`DiscoveryServices` as `serve` starts it, with the default `ClientLimits` (new
streams admitted at 500/s after a burst of 100) except the streams per peer: every
client here is 127.0.0.1 and presents the same certificate.

The server runs in its own process and the clients in several others, so the
server's CPU and memory figures are its own; the parent drives them all with one
JSON line per command. Times are ``time.monotonic()`` (CLOCK_MONOTONIC, shared
across processes on Linux), from the moment every client process starts its storm.

    .venv/bin/python bench/reconnect.py                           # 1000 clients, ~2 min
    .venv/bin/python bench/reconnect.py --clients 200 --repeat 1  # ~20 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import cli
import grpc
from fanout import (
    AdsCall,
    Pki,
    ServerProcess,
    ServerUnderTest,
    client_channel,
    command_loop,
    eds_names_chunk,
    exit_without_goaway,
    raise_fd_limit,
    rss_bytes,
    start_ours,
)

from xds_server.admission import ClientLimits
from xds_server.xds import typeurls

SCRIPT = str(Path(__file__).resolve())
MODES = ("plain", "tls")
#: What a storm does: "full" reconnects and re-subscribes, "connect" only opens the
#: connections (the TCP or TLS handshake and HTTP/2 settings, no stream, no admission).
KINDS = ("full", "connect")
#: Bound on every wait, so a stuck run fails instead of hanging.
PHASE_TIMEOUT = 120.0
#: Pause after a drop (the token bucket refills: a burst of 100 at 500/s takes 0.2 s) and
#: lead time given to the client processes so that they all start at the same instant.
SETTLE, LEAD = 0.5, 0.3
MIB = 1024 * 1024


def storm_limits(args: argparse.Namespace) -> ClientLimits:
    """The product's defaults, the per-peer bound aside (every client is one peer here)."""
    return replace(
        ClientLimits(),
        max_streams_per_peer=10**6,
        admission_rate=args.admission_rate,
        admission_burst=args.admission_burst,
    )


# --- the server under test -------------------------------------------------------------


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> bool:
    """Make VmHWM start again from the current RSS (Linux 4.0+); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


async def run_server(args: argparse.Namespace) -> NoReturn:
    raise_fd_limit()
    under_test = ServerUnderTest(args.pools, args.endpoints)
    _server, admission = await start_ours(under_test, args.tls_dir, storm_limits(args))

    def handle(command: str) -> dict[str, Any]:
        reset = reset_peak_rss() if command == "reset-peak" else None
        return {
            "ready": under_test.in_sync(),
            "streams": admission.open_streams,
            "admitted": admission.admitted,
            "waited": admission.waited,
            "refused": sum(admission.refused.values()),
            "rss": rss_bytes(),
            "peak_rss": peak_rss_bytes(),
            "peak_reset": reset,
            "cpu": time.process_time(),
        }

    await command_loop(handle)
    exit_without_goaway()


# --- a client process: a share of the fleet ----------------------------------------------


class Fleet:
    """``count`` clients, each its own connection with one ADS stream, in this process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.port = args.port
        self.credentials = None if args.tls_dir is None else Pki(args.tls_dir).client_credentials()
        self.ids = range(args.first, args.first + args.count)
        self.eds_names = eds_names_chunk(args.pools)
        self.channels: list[grpc.aio.Channel] = []
        self.calls: list[AdsCall] = []

    async def handle(self, command: str) -> dict[str, Any]:
        verb, *rest = command.split()
        if verb == "drop":
            return await self.drop()
        if verb == "storm":
            return await self.storm(float(rest[0]), rest[1] == "full")
        raise ValueError(f"unknown command {command!r}")

    async def drop(self) -> dict[str, Any]:
        """Close every connection at once (Envoys restarted, a network blip, a failover)."""
        channels, self.channels = self.channels, []
        self.calls.clear()
        await asyncio.gather(*(channel.close() for channel in channels))
        return {"dropped": len(channels)}

    async def storm(self, at: float, streams: bool) -> dict[str, Any]:
        """At ``at``, every client connects and (``streams``) subscribes until it has its
        endpoints; returns each client's times from ``at``: connected, CDS, EDS."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        cpu = time.process_time()
        results = await asyncio.gather(
            *(self.reconnect(i, at, streams) for i in self.ids), return_exceptions=True
        )
        cpu = time.process_time() - cpu
        times = [r for r in results if not isinstance(r, BaseException)]
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        return {
            "connected": [t[0] for t in times],
            "cds": [t[1] for t in times],
            "eds": [t[2] for t in times],
            "errors": errors,
            "cpu": cpu,
        }

    async def reconnect(self, i: int, at: float, streams: bool) -> tuple[float, float, float]:
        channel = client_channel(self.port, self.credentials)
        self.channels.append(channel)
        await asyncio.wait_for(channel.channel_ready(), PHASE_TIMEOUT)
        connected = time.monotonic() - at
        if not streams:
            return connected, math.nan, math.nan
        call = AdsCall(channel, f"storm-{i}", self.eds_names)
        await call.subscribe()
        _payload, header = await call.read(typeurls.ENDPOINT)
        eds = time.monotonic() - at
        await call.ack_endpoints(header)
        self.calls.append(call)
        return connected, call.cds_at - at, eds


async def run_clients(args: argparse.Namespace) -> NoReturn:
    raise_fd_limit()
    fleet = Fleet(args)
    print(json.dumps({"port": 0}), flush=True)
    await command_loop(fleet.handle)
    exit_without_goaway()


# --- the storms ----------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "p50": quantile(values, 0.5),
        "p99": quantile(values, 0.99),
        "max": max(values, default=math.nan),
    }


class Side:
    """One server (plaintext or mTLS) and the client processes that storm it."""

    def __init__(self, mode: str, server: ServerProcess, workers: list[ServerProcess]) -> None:
        self.mode = mode
        self.server = server
        self.workers = workers
        self.connected = False
        self.runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        self.cold: dict[str, Any] = {}

    async def everyone(self, command: str) -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(worker.command(command, PHASE_TIMEOUT) for worker in self.workers)
        )

    async def until(self, done: Any, what: str) -> dict[str, Any]:
        """Server stats, polled until ``done(stats)``."""
        deadline = time.monotonic() + PHASE_TIMEOUT
        while not done(answer := await self.server.command("stats")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.mode}: {what}: {answer}")
            await asyncio.sleep(0.01)
        return answer

    async def storm(self, kind: str, clients: int) -> dict[str, Any]:
        """Drop every client (if connected), then reconnect them all at the same instant."""
        if self.connected:
            await self.everyone("drop")
            await self.until(lambda s: s["streams"] == 0, "streams left after the drop")
            await asyncio.sleep(SETTLE)
        before = await self.server.command("reset-peak")
        at = time.monotonic() + LEAD
        answers = await self.everyone(f"storm {at!r} {kind}")
        clients_done = time.monotonic() - at
        self.connected = True
        if kind == "full":
            after = await self.until(lambda s: s["ready"] >= clients, "clients in sync")
            server_done = time.monotonic() - at
        else:
            after, server_done = await self.server.command("stats"), clients_done
        merged = {key: [t for a in answers for t in a[key]] for key in ("connected", "cds", "eds")}
        errors = [e for a in answers for e in a["errors"]]
        run: dict[str, Any] = {
            "clients_ok": len(merged["connected"]),
            "errors": errors[:5],
            "error_count": len(errors),
            "all_connected_s": max(merged["connected"], default=math.nan),
            "connected_s": spread(merged["connected"]),
            "server_cpu_s": after["cpu"] - before["cpu"],
            "client_cpu_s": sum(a["cpu"] for a in answers),
            "rss_before_bytes": before["rss"],
            "peak_rss_bytes": after["peak_rss"],
            "peak_rss_reset": before["peak_reset"],
            "parent_saw_done_s": clients_done,
        }
        if kind == "full":
            admission_waits = [
                c - s for c, s in zip(merged["cds"], merged["connected"], strict=True)
            ]
            run.update(
                {
                    "all_served_s": max(merged["eds"], default=math.nan),
                    "all_acked_s": server_done,
                    "wait_s": spread(merged["eds"]),
                    "connected_to_cds_s": spread(admission_waits),
                    "admitted": after["admitted"] - before["admitted"],
                    "admission_wait_mean_s": (after["waited"] - before["waited"])
                    / max(1, after["admitted"] - before["admitted"]),
                    "refused": after["refused"] - before["refused"],
                    "rss_in_sync_bytes": after["rss"],
                }
            )
        return run


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Figure by figure, the median over the storms (nested spreads too)."""
    first = runs[0]
    merged: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            merged[key] = {k: statistics.median(r[key][k] for r in runs) for k in value}
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in runs)
    merged["error_count"] = sum(r["error_count"] for r in runs)
    return merged


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    limits = storm_limits(args)
    out: dict[str, Any] = {
        "clients": args.clients,
        "client_processes": args.workers,
        "pools": args.pools,
        "endpoints": args.endpoints,
        "repeat": args.repeat,
        "admission_rate": limits.admission_rate,
        "admission_burst": limits.admission_burst,
        "admission_floor_s": max(0, args.clients - limits.admission_burst) / limits.admission_rate,
        "admission_wait_s": limits.admission_wait,
        "fd_limit": raise_fd_limit(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg()[0],
    }
    sizes = ("--pools", str(args.pools), "--endpoints", str(args.endpoints))
    rates = (
        *("--admission-rate", str(args.admission_rate)),
        *("--admission-burst", str(args.admission_burst)),
    )
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reconnect-")))
        pki = Pki.make(tmp / "pki")

        async def start(role: str, *extra: str) -> ServerProcess:
            process = await ServerProcess.start(role, *sizes, *extra, script=SCRIPT)
            stack.push_async_callback(process.stop)
            return process

        sides: dict[str, Side] = {}
        for mode in MODES:
            tls = ("--tls-dir", str(pki.directory)) if mode == "tls" else ()
            server = await start("server", *rates, *tls)
            workers = []
            share = -(-args.clients // args.workers)
            for first in range(0, args.clients, share):
                count = min(share, args.clients - first)
                where = ("--port", str(server.port), "--first", str(first), "--count", str(count))
                workers.append(await start("clients", *where, *tls))
            sides[mode] = Side(mode, server, workers)
        idle = {mode: await side.server.command("stats") for mode, side in sides.items()}
        await asyncio.sleep(1.0)
        for mode, side in sides.items():
            cpu = (await side.server.command("stats"))["cpu"] - idle[mode]["cpu"]
            out.setdefault("idle_server_cpu_s_per_s", {})[mode] = cpu
        for side in sides.values():  # the first connect: everything cold, not counted
            side.cold = await side.storm("full", args.clients)
        for _ in range(args.repeat):
            for kind in KINDS:
                for side in sides.values():
                    side.runs[kind].append(await side.storm(kind, args.clients))
        for mode, side in sides.items():
            out[mode] = {
                "cold": side.cold,
                **{kind: median_run(side.runs[kind]) for kind in KINDS},
                "runs": side.runs,
            }
    out["loadavg_after"] = os.getloadavg()[0]
    out["tls_cost"] = tls_cost(out)
    return out


def tls_cost(out: dict[str, Any]) -> dict[str, float]:
    """Server CPU that TLS adds, per client: for a bare connection (the handshake alone) and
    for a whole reconnect (handshake, then CDS and EDS encrypted)."""
    n = out["clients"]
    plain, tls = out["plain"], out["tls"]
    return {
        "handshake_cpu_ms": 1000
        * (tls["connect"]["server_cpu_s"] - plain["connect"]["server_cpu_s"])
        / n,
        "reconnect_cpu_ms": 1000
        * (tls["full"]["server_cpu_s"] - plain["full"]["server_cpu_s"])
        / n,
        "tls_over_plain_cpu_full": tls["full"]["server_cpu_s"] / plain["full"]["server_cpu_s"],
        "tls_over_plain_served_full": tls["full"]["all_served_s"] / plain["full"]["all_served_s"],
    }


def report(out: dict[str, Any]) -> str:
    plain, tls = out["plain"], out["tls"]
    lines = [
        f"reconnect storm: {out['clients']} clients ({out['client_processes']} client "
        f"processes), {out['pools']} pools x {out['endpoints']} endpoints, admission "
        f"{out['admission_rate']:g}/s "
        f"after a burst of {out['admission_burst']} (floor {out['admission_floor_s']:.2f} s; a "
        f"stream waits at most {out['admission_wait_s']:g} s, then is refused), "
        f"median of {out['repeat']} storms; {out['cpus']} CPUs, load average "
        f"{out['loadavg_before']:.2f} before, {out['loadavg_after']:.2f} after",
        f"{'':46} {'plaintext':>10} {'mTLS':>10} {'mTLS/plain':>10}",
    ]

    def row(label: str, a: float, b: float, scale: float = 1.0, fmt: str = ".3f") -> None:
        ratio = f"{b / a:10.2f}" if a else f"{'-':>10}"
        lines.append(f"{label:46} {a * scale:10{fmt}} {b * scale:10{fmt}} {ratio}")

    full_p, full_t = plain["full"], tls["full"]
    lines.append("drop all, reconnect all (handshake, admission, CDS, EDS, ACK):")
    row("  last client has its endpoints (s)", full_p["all_served_s"], full_t["all_served_s"])
    row("  server has every ACK (s)", full_p["all_acked_s"], full_t["all_acked_s"])
    for q in ("p50", "p99", "max"):
        row(f"  per-client wait for endpoints, {q} (s)", full_p["wait_s"][q], full_t["wait_s"][q])
    for q in ("p50", "p99", "max"):
        row(
            f"  per-client connected (handshake), {q} (s)",
            full_p["connected_s"][q],
            full_t["connected_s"][q],
        )
    row(
        "  connected -> CDS (admission), p99 (s)",
        full_p["connected_to_cds_s"]["p99"],
        full_t["connected_to_cds_s"]["p99"],
    )
    row(
        "  admission wait assigned, mean (s)",
        full_p["admission_wait_mean_s"],
        full_t["admission_wait_mean_s"],
    )
    row("  server CPU (s)", full_p["server_cpu_s"], full_t["server_cpu_s"])
    n = out["clients"]
    row(
        "  server CPU per client (ms)", full_p["server_cpu_s"] / n, full_t["server_cpu_s"] / n, 1000
    )
    row("  client processes' CPU (s)", full_p["client_cpu_s"], full_t["client_cpu_s"])
    row(
        "  server RSS before (MiB)",
        full_p["rss_before_bytes"],
        full_t["rss_before_bytes"],
        1 / MIB,
        ".1f",
    )
    row(
        "  server peak RSS (MiB)",
        full_p["peak_rss_bytes"],
        full_t["peak_rss_bytes"],
        1 / MIB,
        ".1f",
    )
    cold_p, cold_t = plain["cold"], tls["cold"]
    row(
        "  RSS per client in sync, first connect (KiB)",
        (cold_p["rss_in_sync_bytes"] - cold_p["rss_before_bytes"]) / n,
        (cold_t["rss_in_sync_bytes"] - cold_t["rss_before_bytes"]) / n,
        1 / 1024,
        ".1f",
    )
    row(
        "  refused streams / failed clients",
        full_p["refused"] + full_p["error_count"],
        full_t["refused"] + full_t["error_count"],
        1,
        ".0f",
    )
    con_p, con_t = plain["connect"], tls["connect"]
    lines.append("connect only (TCP or TLS handshake + HTTP/2 settings, no stream):")
    row("  last client connected (s)", con_p["all_connected_s"], con_t["all_connected_s"])
    for q in ("p50", "p99", "max"):
        row(f"  per-client connected, {q} (s)", con_p["connected_s"][q], con_t["connected_s"][q])
    row("  server CPU (s)", con_p["server_cpu_s"], con_t["server_cpu_s"])
    row(
        "  server CPU per connection (ms)",
        con_p["server_cpu_s"] / n,
        con_t["server_cpu_s"] / n,
        1000,
    )
    row("  client processes' CPU (s)", con_p["client_cpu_s"], con_t["client_cpu_s"])
    row("  server peak RSS (MiB)", con_p["peak_rss_bytes"], con_t["peak_rss_bytes"], 1 / MIB, ".1f")
    cost = out["tls_cost"]
    lines += [
        f"TLS handshake, server CPU: {cost['handshake_cpu_ms']:.3f} ms per handshake "
        f"(connect-only storms, mTLS minus plaintext)",
        f"TLS in a whole reconnect, server CPU: {cost['reconnect_cpu_ms']:.3f} ms per client "
        f"(handshake + encrypted CDS/EDS; mTLS minus plaintext)",
        "per storm, last client served (s): "
        + "; ".join(
            f"{mode} " + " ".join(f"{r['all_served_s']:.2f}" for r in out[mode]["runs"]["full"])
            for mode in MODES
        ),
        "cold first connect, last client served (s): "
        + ", ".join(f"{mode} {out[mode]['cold']['all_served_s']:.2f}" for mode in MODES),
        "idle server CPU (s per s): "
        + ", ".join(f"{m} {v:.4f}" for m, v in out["idle_server_cpu_s_per_s"].items()),
    ]
    return "\n".join(lines)


ROLES: dict[str, cli.Role] = {"server": run_server, "clients": run_clients}


def main() -> None:
    parser = cli.parser(__doc__, ROLES)
    parser.add_argument("--clients", type=int, default=1000, help="clients (default 1000)")
    parser.add_argument("--workers", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--pools", type=int, default=100, help="clusters (default 100)")
    parser.add_argument("--endpoints", type=int, default=20, help="per pool (default 20)")
    parser.add_argument("--repeat", type=int, default=3, help="storms of each kind (median)")
    defaults = ClientLimits()
    parser.add_argument(
        "--admission-rate",
        type=float,
        default=defaults.admission_rate,
        help=f"new streams per second (default {defaults.admission_rate:g}, the product's)",
    )
    parser.add_argument(
        "--admission-burst",
        type=int,
        default=defaults.admission_burst,
        help=f"admitted at once (default {defaults.admission_burst}, the product's)",
    )
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not cli.played_role(args, ROLES):
        out = asyncio.run(run_bench(args))
        cli.publish(report(out), out, args.json)


if __name__ == "__main__":
    main()
