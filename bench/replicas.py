"""Replicas benchmark: control planes sharing one Redis, each `xds-server serve --redis` in its
own process, with synthetic ADS clients and LRS reporters spread over them.

What it measures (issue 13 item 6), on one machine, everything on loopback:

1. a drain made through replica A's admin API: when every ADS client, on every replica,
   receives the EDS response that has the endpoint DRAINING (first / median / last after
   the POST started), and the POST's own latency; the undrain likewise;
2. LRS ingest with reporters on 1, 2 and 3 replicas: load reports and endpoint stats merged
   per second, per replica and in total, and each replica's CPU;
3. time to a new leader: the replica holding the lease is killed (SIGKILL, by PID) or
   stopped (SIGTERM, which releases the lease), until another one's /healthz says it leads;
4. what a replica costs Redis: `redis-cli INFO` deltas (network bytes, commands by type,
   Redis CPU) over a steady-state window, divided by the replicas.

The replicas are the real CLI path (`python -m xds_server.cli serve --redis URL`, per-client
limits lifted with serve's flags, since every client here is 127.0.0.1); Redis is Debian's
`redis-server` on a loopback port (`xds_lab.redis_server`). ADS clients and LRS reporters
are copies of this script in processes of their own (`--role ads`, `--role lrs`), driven
over stdin/stdout with one JSON line per command; times are CLOCK_MONOTONIC, shared by all
processes. JSON goes to bench/results/replicas.json unless --json says elsewhere.

    .venv/bin/python bench/replicas.py                          # ~4.5 min on 2 cores
    .venv/bin/python bench/replicas.py --steady-seconds 15 --ingest-rounds 1 --failovers 1
    .venv/bin/python bench/replicas.py --phases drains,failover
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shlex
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import cli
import grpc
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.load_stats.v3 import lrs_pb2
from fanout import (
    STREAMS_PER_CHANNEL,
    AdsCall,
    client_channel,
    eds_names_chunk,
    exit_without_goaway,
    pool_name,
)
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from lrs_ingest import STREAM_METHOD, endpoint_key, first_message, report_bytes

from lrs.contract import raw_bytes
from xds_lab.envoy_rig import BENCH_LIMITS, free_port
from xds_lab.redis_server import RedisServer
from xds_server.xds import typeurls

RESULTS = Path(__file__).resolve().parent / "results"
SCRIPT = str(Path(__file__).resolve())
TOKEN = "bench-replicas-admin-token-0123456789abcdef"
#: Per-client limits lifted on every replica: all clients share 127.0.0.1.
LIMIT_FLAGS = ("max_streams", "max_streams_per_peer", "admission_rate", "admission_burst")
PHASES = ("steady", "drains", "ingest", "failover")
START_TIMEOUT = 60.0
PHASE_TIMEOUT = 60.0
#: How often /healthz is polled while waiting for a new leader.
LEADER_POLL = 0.01
DRAINING = health_check_pb2.HealthStatus.DRAINING
CLK_TCK = os.sysconf("SC_CLK_TCK")
KB = 1000


# --- the fleet the replicas serve ------------------------------------------------------


def snapshot_yaml(pools: int, endpoints: int) -> str:
    """One listener routing by model to every pool; every pool weighted by load (`orca`), so
    replicas take load reports for all of them, share their windows and the leader weighs."""
    lines = ["listeners:", "  - name: inference", "    port: 10000", "    routes:"]
    for p in range(pools):
        lines += [f"      - model: {pool_name(p)}", f"        pool: {pool_name(p)}"]
    lines.append("pools:")
    for p in range(pools):
        lines += [
            f"  - name: {pool_name(p)}",
            "    lb_policy: least_request",
            "    weighting: orca",
            "    endpoints:",
        ]
        for e in range(endpoints):
            host, port = endpoint_key(p, e).split(":")
            lines.append(f"      - {{address: {host}, port: {port}, zone: zone-{'ab'[e % 2]}}}")
    return "\n".join(lines) + "\n"


# --- child processes driven one JSON line at a time -------------------------------------


async def command_loop(handle: Callable[[list[str]], Awaitable[dict[str, Any]]]) -> None:
    """Answer one JSON line per stdin command until `quit` or the parent goes away."""
    while True:
        line = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if line in ("", "quit"):
            return
        answer = await handle(line.split())
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def announce(what: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(what) + "\n")
    sys.stdout.flush()


class Child:
    """A copy of this script playing a role, driven one command at a time."""

    def __init__(self, proc: asyncio.subprocess.Process, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.hello = hello

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, role: str, *extra: str) -> Child:
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, "--role", role, *extra, stdin=pipe, stdout=pipe
        )
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"{role} process exited before it started")
        return cls(proc, json.loads(line))

    async def command(self, *words: Any, timeout: float = PHASE_TIMEOUT + 30) -> dict[str, Any]:
        self.proc.stdin.write((" ".join(map(str, words)) + "\n").encode())  # type: ignore[union-attr]
        await self.proc.stdin.drain()  # type: ignore[union-attr]
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"child exited on {words!r}")
        return json.loads(line)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()  # this child, by its PID
                await self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuMeter:
    """CPU shares (cores) over a window: each group of processes, this process, and the
    whole machine (so a saturated machine shows)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        busy, total = machine_ticks()
        read = {"at": time.monotonic(), "busy": busy, "total": total}
        read["bench"] = time.process_time()
        for name, pids in self.groups.items():
            read[name] = sum(cpu_seconds(pid) for pid in pids)
        return read

    def shares(self) -> dict[str, float]:
        end = self._read()
        wall = end["at"] - self.start["at"]
        out = {name: (end[name] - self.start[name]) / wall for name in (*self.groups, "bench")}
        cpus = os.cpu_count() or 1
        out["machine"] = (
            cpus * (end["busy"] - self.start["busy"]) / (end["total"] - self.start["total"])
        )
        return out


# --- ADS clients (role "ads") -----------------------------------------------------------


def response_lite_class() -> type[Message]:
    """A DiscoveryResponse whose resources are (type_url, value bytes) pairs: enough to ACK
    and to find one cluster's assignment without parsing the others."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="bench_replicas.proto", package="bench_replicas", syntax="proto3"
    )
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    text = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    resource = proto.message_type.add(name="AnyLite")
    resource.field.add(name="type_url", number=1, type=text, label=optional)
    resource.field.add(
        name="value",
        number=2,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=optional,
    )
    response = proto.message_type.add(name="ResponseLite")
    response.field.add(name="version_info", number=1, type=text, label=optional)
    response.field.add(
        name="resources",
        number=2,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        type_name=".bench_replicas.AnyLite",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    response.field.add(name="type_url", number=4, type=text, label=optional)
    response.field.add(name="nonce", number=5, type=text, label=optional)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    found = pool.FindMessageTypeByName("bench_replicas.ResponseLite")
    return message_factory.GetMessageClass(found)


ResponseLite = response_lite_class()


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@dataclass(frozen=True, slots=True)
class Watch:
    """The state a drain (or undrain) should bring: `key` in `pool` DRAINING or not."""

    pool: str
    key: str
    draining: bool

    @property
    def prefix(self) -> bytes:
        """How a ClusterLoadAssignment of `pool` starts: field 1, cluster_name."""
        name = self.pool.encode()
        return b"\n" + varint(len(name)) + name

    def seen_in(self, response: Any) -> bool:
        prefix = self.prefix
        for resource in response.resources:
            if not resource.value.startswith(prefix):
                continue
            cla = endpoint_pb2.ClusterLoadAssignment.FromString(resource.value)
            for locality in cla.endpoints:
                for lb in locality.lb_endpoints:
                    address = lb.endpoint.address.socket_address
                    if f"{address.address}:{address.port_value}" == self.key:
                        return (lb.health_status == DRAINING) == self.draining
        return False


@dataclass(eq=False, slots=True)
class Client:
    replica: int
    ready: bool = False
    alive: bool = True
    seen: float = 0.0  # when the watched state arrived (CLOCK_MONOTONIC); 0 until then


class AdsFleet:
    """ADS clients spread over the replicas (global client i on replica i % replicas), 50
    streams per connection; each ACKs every response and records when the watched state
    arrives."""

    def __init__(self, ports: list[int], count: int, first: int, pools: int) -> None:
        self.ports = ports
        self.count = count
        self.first = first
        self.eds_names = eds_names_chunk(pools)
        self.clients: list[Client] = []
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.watch: Watch | None = None
        self.changed = asyncio.Event()

    async def start(self) -> None:
        by_replica: dict[int, list[Client]] = {}
        for i in range(self.first, self.first + self.count):
            client = Client(i % len(self.ports))
            self.clients.append(client)
            by_replica.setdefault(client.replica, []).append(client)
        for replica, clients in by_replica.items():
            for start in range(0, len(clients), STREAMS_PER_CHANNEL):
                channel = client_channel(self.ports[replica], None)
                self.channels.append(channel)
                for n, client in enumerate(clients[start : start + STREAMS_PER_CHANNEL]):
                    node = f"bench-{replica}-{start + n}-{self.first}"
                    call = AdsCall(channel, node, self.eds_names)
                    self.tasks.append(asyncio.create_task(self.run(client, call)))

    async def run(self, client: Client, call: AdsCall) -> None:
        try:
            await call.subscribe()
            while True:
                payload = await call.call.read()
                at = time.monotonic()
                if payload is grpc.aio.EOF:
                    break
                response = ResponseLite.FromString(payload)
                if response.type_url == typeurls.ENDPOINT:
                    if not client.ready:
                        client.ready = True
                        self.changed.set()
                    elif self.watch and not client.seen and self.watch.seen_in(response):
                        client.seen = at
                        self.changed.set()
                    names = self.eds_names
                else:
                    names = b""
                await call.call.write(call.reply(response, names))
        except (grpc.aio.AioRpcError, RuntimeError, grpc.aio.UsageError):
            pass  # the replica went away (a failover): this client is out of the run
        finally:
            client.alive = False
            self.changed.set()

    async def handle(self, words: list[str]) -> dict[str, Any]:
        command = words[0]
        if command == "stats":
            alive = [c for c in self.clients if c.alive]
            return {
                "alive": len(alive),
                "ready": sum(c.ready for c in alive),
                "cpu": time.process_time(),
            }
        if command == "watch":  # watch POOL KEY 0|1
            self.watch = Watch(words[1], words[2], words[3] == "1")
            for client in self.clients:
                client.seen = 0.0
            return {"ok": True}
        if command == "wait":  # wait SECONDS: until every live client has the watched state
            deadline = time.monotonic() + float(words[1])
            while not all(c.seen or not c.alive for c in self.clients):
                self.changed.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), left)
            seen = [c for c in self.clients if c.seen]
            return {
                "times": [c.seen for c in seen],
                "replicas": [c.replica for c in seen],
                "missing": sum(1 for c in self.clients if c.alive and not c.seen),
                "alive": sum(c.alive for c in self.clients),
            }
        raise ValueError(f"unknown command {words!r}")


async def run_ads(args: argparse.Namespace) -> None:
    fleet = AdsFleet([int(p) for p in args.ports.split(",")], args.count, args.first, args.pools)
    await fleet.start()
    announce({"clients": args.count})
    await command_loop(fleet.handle)
    exit_without_goaway()


# --- LRS reporters (role "lrs") ---------------------------------------------------------


class LrsFleet:
    """LRS streams to one replica, each reporting like an Envoy: the node first, then one
    report every asked `load_reporting_interval` (following changes mid-stream), at a random
    phase. A reporter whose write waits (the replica reads slower: HTTP/2 flow control)
    sends its next report when the write is done, if its interval has passed by then."""

    def __init__(self, port: int, streams: int, tag: str, report: bytes) -> None:
        self.port = port
        self.streams = streams
        self.tag = tag
        self.report = report
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.connected = 0
        self.sent = 0
        self.failed: dict[str, int] = {}
        self.intervals: dict[int, float] = {}

    def start(self) -> None:
        per_channel = 10
        for i in range(self.streams):
            if i % per_channel == 0:
                self.channels.append(client_channel(self.port, None))
            self.tasks.append(asyncio.create_task(self.run(self.channels[-1], i)))

    async def run(self, channel: grpc.aio.Channel, i: int) -> None:
        call = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=raw_bytes,
            response_deserializer=lrs_pb2.LoadStatsResponse.FromString,
        )()
        try:
            await call.write(first_message(f"{self.tag}-{i}"))
            response = await call.read()
            if response is grpc.aio.EOF:
                raise RuntimeError("closed before answering")
            self.intervals[i] = response.load_reporting_interval.ToTimedelta().total_seconds()
            self.connected += 1
            listener = asyncio.create_task(self.listen(call, i))
            try:
                next_at = time.monotonic() + random.uniform(0, self.intervals[i])
                while True:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await call.write(self.report)
                    self.sent += 1
                    next_at = max(next_at + self.intervals[i], time.monotonic())
            finally:
                listener.cancel()
        except grpc.aio.AioRpcError as err:
            reason = err.code().name
            self.failed[reason] = self.failed.get(reason, 0) + 1
        except RuntimeError as err:
            self.failed[str(err)] = self.failed.get(str(err), 0) + 1

    async def listen(self, call: Any, i: int) -> None:
        """Later LoadStatsResponses: a changed interval applies from the next report on."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (response := await call.read()) is not grpc.aio.EOF:
                self.intervals[i] = response.load_reporting_interval.ToTimedelta().total_seconds()

    async def handle(self, words: list[str]) -> dict[str, Any]:
        if words[0] == "stats":
            intervals = list(self.intervals.values()) or [0.0]
            return {
                "connected": self.connected,
                "sent": self.sent,
                "failed": self.failed,
                "interval_max": max(intervals),
                "cpu": time.process_time(),
            }
        raise ValueError(f"unknown command {words!r}")


async def run_lrs(args: argparse.Namespace) -> None:
    fleet = LrsFleet(args.port, args.count, args.tag, report_bytes(args.pools, args.endpoints))
    fleet.start()
    announce({"streams": args.count})
    await command_loop(fleet.handle)
    exit_without_goaway()


# --- the replicas ------------------------------------------------------------------------


def limit_flags() -> list[str]:
    flags = []
    for name in LIMIT_FLAGS:
        value = getattr(BENCH_LIMITS, name)
        flags += ["--" + name.replace("_", "-"), str(int(value))]
    return [*flags, "--max-connection-age", "0"]


@dataclass(eq=False)
class Replica:
    """One `xds-server serve --redis` process."""

    name: str
    proc: asyncio.subprocess.Process
    xds_port: int
    admin_port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@dataclass
class Rig:
    """Redis, the replicas, and what drives them."""

    args: argparse.Namespace
    workdir: Path
    redis: RedisServer
    session: aiohttp.ClientSession
    replicas: list[Replica] = field(default_factory=list)
    ads: list[Child] = field(default_factory=list)
    names: list[str] = field(default_factory=lambda: list(string.ascii_uppercase))

    @property
    def snapshot(self) -> Path:
        return self.workdir / "snapshot.yaml"

    @property
    def token(self) -> Path:
        return self.workdir / "token"

    async def start_replica(self) -> Replica:
        name = self.names.pop(0)
        xds_port, admin_port = free_port(), free_port()
        log = (self.workdir / f"replica-{name}.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds_server.cli", "--log-level", "warning", "serve",
            "--snapshot", str(self.snapshot), "--redis", self.redis.url,
            "--xds-port", str(xds_port), "--admin-port", str(admin_port), "--router-port", "0",
            "--admin-token-file", str(self.token),
            "--drain-period", str(self.args.drain_period),
            "--lrs-cpu-budget", str(self.args.lrs_cpu_budget),
            *limit_flags(),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        replica = Replica(name, proc, xds_port, admin_port)
        self.replicas.append(replica)
        deadline = time.monotonic() + START_TIMEOUT
        while not await self.answers(replica, "/readyz"):
            if proc.returncode is not None:
                raise RuntimeError(f"replica {name} exited: see {self.workdir}/replica-{name}.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {name} not ready in {START_TIMEOUT:g} s")
            await asyncio.sleep(0.05)
        return replica

    def meter(self, reporters: list[Child]) -> CpuMeter:
        """CPU of each replica, the ADS client processes, the reporters, the machine."""
        groups = {r.name: [r.pid] for r in self.replicas}
        groups["ads"] = [c.pid for c in self.ads]
        groups["reporters"] = [c.pid for c in reporters]
        return CpuMeter(groups)

    async def answers(self, replica: Replica, path: str) -> bool:
        try:
            async with self.session.get(replica.url + path) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    async def health(self, replica: Replica) -> dict[str, Any] | None:
        try:
            async with self.session.get(replica.url + "/healthz") as response:
                return await response.json()
        except aiohttp.ClientError:
            return None

    async def leaders(self, among: list[Replica]) -> list[Replica]:
        healths = await asyncio.gather(*(self.health(r) for r in among))
        return [r for r, h in zip(among, healths, strict=True) if h and h["redis"]["leader"]]

    async def metrics(self, replica: Replica) -> dict[str, float]:
        """The few /metrics series the bench reads, summed over their labels."""
        wanted = {
            "xds_lrs_load_reports_received_total": "received",
            "xds_lrs_reports_early_total": "early",
            "xds_lrs_reporting_interval_seconds": "interval",
            "xds_lrs_ingest_cpu_cores": "ingest_cores",
            'xds_replica_load_bytes_total{direction="written"}': "load_written",
            'xds_replica_load_bytes_total{direction="read"}': "load_read",
            "xds_replica_elections_total": "elections",
        }
        values = dict.fromkeys(wanted.values(), 0.0)
        values["lrs_refused"] = 0.0
        async with self.session.get(replica.url + "/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if not line.startswith("xds_"):
                continue
            name, _, value = line.rpartition(" ")
            if name in wanted:
                values[wanted[name]] += float(value)
            elif name.startswith("xds_client_refused_total{") and 'service="lrs"' in name:
                values["lrs_refused"] += float(value)
        return values

    async def admin_post(self, replica: Replica, path: str) -> int:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.session.post(replica.url + path, headers=headers) as response:
            await response.read()
            return response.status

    async def stop_replica(self, replica: Replica) -> None:
        """SIGTERM this replica (by its PID) and reap it."""
        if replica.proc.returncode is None:
            os.kill(replica.pid, signal.SIGTERM)
        await self.reap(replica)

    async def reap(self, replica: Replica) -> None:
        """Wait for a signalled replica to exit (SIGKILL if it outlives its drain period)."""
        if replica in self.replicas:
            self.replicas.remove(replica)
        try:
            await asyncio.wait_for(replica.proc.wait(), self.args.drain_period + 15)
        except TimeoutError:
            os.kill(replica.pid, signal.SIGKILL)
            await replica.proc.wait()


# --- Redis's view ----------------------------------------------------------------------


async def redis_info(port: int, *sections: str) -> dict[str, str]:
    """`redis-cli INFO <section>`, each section, as key -> value."""
    out: dict[str, str] = {}
    for section in sections:
        proc = await asyncio.create_subprocess_exec(
            "redis-cli", "-h", "127.0.0.1", "-p", str(port), "INFO", section,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        text, _ = await proc.communicate()
        for line in text.decode().splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                out[key.strip()] = value.strip()
    return out


def command_calls(info: dict[str, str]) -> dict[str, tuple[int, int]]:
    """cmdstat_X -> (calls, usec), from INFO commandstats."""
    calls = {}
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            parts = dict(item.split("=") for item in value.split(","))
            calls[key[len("cmdstat_") :]] = (int(parts["calls"]), int(parts["usec"]))
    return calls


async def redis_window(
    rig: Rig, seconds: float, reporters: list[Child], sample_every: float = 5.0
) -> dict[str, Any]:
    """INFO deltas over `seconds` (CPU too), sampling instantaneous ops meanwhile."""
    port = rig.redis.port
    sections = ("stats", "commandstats", "cpu", "clients")
    replicas = list(rig.replicas)
    metrics_before = await sample(rig, replicas)
    before = await redis_info(port, *sections)
    meter = rig.meter(reporters)
    start = time.monotonic()
    samples: list[dict[str, float]] = []
    while (left := start + seconds - time.monotonic()) > 0:
        await asyncio.sleep(min(sample_every, left))
        info = await redis_info(port, "stats")
        samples.append(
            {
                "ops": float(info["instantaneous_ops_per_sec"]),
                "input_kbps": float(info["instantaneous_input_kbps"]),
                "output_kbps": float(info["instantaneous_output_kbps"]),
            }
        )
    wall = time.monotonic() - start
    cpu = meter.shares()
    after = await redis_info(port, *sections)
    metrics_after = await sample(rig, replicas)
    n = len(replicas)

    def delta(key: str) -> float:
        return float(after[key]) - float(before[key])

    calls_before, calls_after = command_calls(before), command_calls(after)
    commands = {}
    for name, (calls, usec) in sorted(calls_after.items()):
        was_calls, was_usec = calls_before.get(name, (0, 0))
        if calls > was_calls and name != "info":  # INFO is the bench's own polling
            commands[name] = {
                "per_s": (calls - was_calls) / wall,
                "per_s_per_replica": (calls - was_calls) / wall / n,
                "redis_usec_per_s": (usec - was_usec) / wall,
            }
    polls = calls_after.get("info", (0, 0))[0] - calls_before.get("info", (0, 0))[0]
    processed = delta("total_commands_processed") - polls  # without the bench's own INFO
    redis_cpu = delta("used_cpu_sys") + delta("used_cpu_user")
    ours = sum(v for k, v in cpu.items() if k != "machine") + redis_cpu / wall
    cpu["others"] = max(0.0, cpu["machine"] - ours)
    return {
        "seconds": wall,
        "replicas": n,
        "net_input_bytes_per_s": delta("total_net_input_bytes") / wall,
        "net_output_bytes_per_s": delta("total_net_output_bytes") / wall,
        "net_input_bytes_per_s_per_replica": delta("total_net_input_bytes") / wall / n,
        "net_output_bytes_per_s_per_replica": delta("total_net_output_bytes") / wall / n,
        "commands_per_s": processed / wall,
        "commands_per_s_per_replica": processed / wall / n,
        "instantaneous_ops_median": statistics.median(s["ops"] for s in samples),
        "instantaneous_input_kbps_median": statistics.median(s["input_kbps"] for s in samples),
        "instantaneous_output_kbps_median": statistics.median(s["output_kbps"] for s in samples),
        "redis_cpu_share": redis_cpu / wall,
        "connected_clients": int(after["connected_clients"]),
        "commands": commands,
        "replica_cpu_share": {r.name: cpu[r.name] for r in replicas},
        "cpu_share": cpu,
        "load_window_bytes_per_s": {
            name: {
                key: (metrics_after[name][f"load_{key}"] - m[f"load_{key}"])
                / (metrics_after[name]["at"] - m["at"])  # each replica's own scrape times
                for key in ("written", "read")
            }
            for name, m in metrics_before.items()
        },
    }


# --- phases ------------------------------------------------------------------------------


def spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts differing by at most one."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def start_reporters(
    targets: list[Replica], total: int, tag: str, args: argparse.Namespace
) -> list[Child]:
    """One reporter process per target replica, `total` streams spread evenly over them."""
    children = []
    for replica, count in zip(targets, spread(total, len(targets)), strict=True):
        if count:
            children.append(
                await Child.start(
                    "lrs",
                    *("--port", str(replica.xds_port), "--count", str(count)),
                    *("--tag", f"{tag}-{replica.name}"),
                    *("--pools", str(args.pools), "--endpoints", str(args.endpoints)),
                )
            )
    deadline = time.monotonic() + PHASE_TIMEOUT
    while True:
        stats = [await child.command("stats") for child in children]
        if sum(s["connected"] for s in stats) >= total:
            return children
        failed = [s["failed"] for s in stats if s["failed"]]
        if failed or time.monotonic() > deadline:
            connected = sum(s["connected"] for s in stats)
            raise RuntimeError(f"{connected}/{total} reporters connected; failures: {failed}")
        await asyncio.sleep(0.1)


async def stop_all(children: list[Child]) -> None:
    await asyncio.gather(*(child.stop() for child in children))


async def wait_ads_ready(ads: list[Child], clients: int) -> float:
    """Seconds until every ADS client has its first EDS response."""
    start = time.monotonic()
    while True:
        stats = [await child.command("stats") for child in ads]
        if sum(s["ready"] for s in stats) >= clients:
            return time.monotonic() - start
        if sum(s["alive"] for s in stats) < clients:
            raise RuntimeError("an ADS client's stream ended during the initial sync")
        if time.monotonic() - start > PHASE_TIMEOUT:
            raise TimeoutError("ADS clients not in sync in time")
        await asyncio.sleep(0.05)


async def wait_leader(rig: Rig, among: list[Replica] | None = None) -> Replica:
    deadline = time.monotonic() + PHASE_TIMEOUT
    while len(found := await rig.leaders(among or rig.replicas)) != 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(found)} leaders after {PHASE_TIMEOUT:g} s")
        await asyncio.sleep(0.05)
    return found[0]


def spread_ms(times: list[float], start: float) -> dict[str, float]:
    ms = sorted(1000 * (t - start) for t in times)
    if not ms:
        return {"first_ms": float("nan"), "median_ms": float("nan"), "last_ms": float("nan")}
    return {"first_ms": ms[0], "median_ms": statistics.median(ms), "last_ms": ms[-1]}


async def drain_phase(
    rig: Rig, names: list[str], reporters: list[Child], args: argparse.Namespace
) -> dict[str, Any]:
    """Drain (then undrain) an endpoint through replica A, `--drains` times; each client
    records when the EDS response with the new state arrives."""
    ads = rig.ads
    through = rig.replicas[0]
    meter = rig.meter(reporters)
    runs = []
    for i in range(args.drains):
        pool, key = pool_name((i * 37) % args.pools), endpoint_key((i * 37) % args.pools, i)
        for verb, draining in (("drain", 1), ("undrain", 0)):
            await asyncio.gather(*(c.command("watch", pool, key, draining) for c in ads))
            path = f"/api/v1/pools/{pool}/endpoints/{key}/{verb}"
            start = time.monotonic()
            status = await rig.admin_post(through, path)
            answered = time.monotonic()
            if status != 200:
                raise RuntimeError(f"POST {path} through {through.name}: {status}")
            waits = await asyncio.gather(*(c.command("wait", PHASE_TIMEOUT) for c in ads))
            times = [t for w in waits for t in w["times"]]
            owners = [names[r] for w in waits for r in w["replicas"]]
            per_replica = {
                name: {
                    "clients": owners.count(name),
                    **spread_ms(
                        [t for t, o in zip(times, owners, strict=True) if o == name], start
                    ),
                }
                for name in sorted(set(owners))
            }
            runs.append(
                {
                    "verb": verb,
                    "pool": pool,
                    "endpoint": key,
                    "post_ms": 1000 * (answered - start),
                    "clients": len(times),
                    "missing": sum(w["missing"] for w in waits),
                    **spread_ms(times, start),
                    "per_replica": per_replica,
                }
            )
            await asyncio.sleep(args.drain_pause)
    summary = {}
    for verb in ("drain", "undrain"):
        mine = [r for r in runs if r["verb"] == verb]
        summary[verb] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("post_ms", "first_ms", "median_ms", "last_ms")
        }
        summary[verb]["per_replica_last_ms"] = {
            name: statistics.median(r["per_replica"][name]["last_ms"] for r in mine)
            for name in mine[0]["per_replica"]
        }
        summary[verb]["per_replica_first_ms"] = {
            name: statistics.median(r["per_replica"][name]["first_ms"] for r in mine)
            for name in mine[0]["per_replica"]
        }
    cpu = meter.shares()
    cpu["others"] = max(0.0, cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine"))
    return {"through": through.name, "summary": summary, "runs": runs, "cpu_share": cpu}


async def sample(rig: Rig, replicas: list[Replica]) -> dict[str, dict[str, float]]:
    """Each replica's counters and CPU, read together, with the time they were read."""
    out = {}
    for replica in replicas:
        metrics = await rig.metrics(replica)
        out[replica.name] = {**metrics, "cpu": cpu_seconds(replica.pid), "at": time.monotonic()}
    return out


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def ingest_once(rig: Rig, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """`--reporters` streams spread evenly over the first k replicas, for one window."""
    stats_per_report = args.pools * args.endpoints
    targets = rig.replicas[:k]
    children = await start_reporters(targets, args.reporters, f"ingest{k}", args)
    try:
        await asyncio.sleep(args.ingest_warmup)
        redis_before = await redis_info(rig.redis.port, "cpu")
        clients_before = [await c.command("stats") for c in children]
        before = await sample(rig, rig.replicas)
        start = time.monotonic()
        meter = rig.meter(children)
        await asyncio.sleep(args.ingest_seconds)
        shares = meter.shares()
        after = await sample(rig, rig.replicas)
        wall = time.monotonic() - start
        clients_after = [await c.command("stats") for c in children]
        redis_after = await redis_info(rig.redis.port, "cpu")
        rss = {r.name: rss_mib(r.pid) for r in rig.replicas}
    finally:
        await stop_all(children)
    counts = dict(zip(targets, spread(args.reporters, k), strict=True))
    per_replica = {}
    for replica in rig.replicas:
        b, a = before[replica.name], after[replica.name]
        seconds = a["at"] - b["at"]
        merged = (a["received"] - b["received"]) - (a["early"] - b["early"])
        cpu = a["cpu"] - b["cpu"]
        per_replica[replica.name] = {
            "reporters": counts.get(replica, 0),
            "reports_per_s": merged / seconds,
            "endpoint_stats_per_s": merged * stats_per_report / seconds,
            "cpu_share": cpu / seconds,
            "cpu_ms_per_report": 1000 * cpu / merged if merged else float("nan"),
            "early": a["early"] - b["early"],
            "refused": a["lrs_refused"] - b["lrs_refused"],
            "interval_s": a["interval"],
            "rss_mib": rss[replica.name],
        }
    sent = sum(c["sent"] for c in clients_after) - sum(c["sent"] for c in clients_before)
    redis_cpu = sum(
        float(redis_after[key]) - float(redis_before[key])
        for key in ("used_cpu_sys", "used_cpu_user")
    )
    total = sum(r["reports_per_s"] for r in per_replica.values())
    replicas_cpu = sum(shares[r.name] for r in rig.replicas)
    ours = replicas_cpu + shares["reporters"] + shares["ads"] + shares["bench"] + redis_cpu / wall
    return {
        "replicas_reported_to": k,
        "reporters": args.reporters,
        "offered_reports_per_s": args.reporters / args.lrs_interval,
        "seconds": wall,
        "per_replica": per_replica,
        "reports_per_s": total,
        "endpoint_stats_per_s": total * stats_per_report,
        "replicas_cpu_share": replicas_cpu,
        "reporters_sent_per_s": sent / wall,
        "reporters_cpu_share": shares["reporters"],
        "redis_cpu_share": redis_cpu / wall,
        "ads_cpu_share": shares["ads"],
        "bench_cpu_share": shares["bench"],
        "machine_busy_cores": shares["machine"],
        "others_cpu_share": max(0.0, shares["machine"] - ours),
        "loadavg": os.getloadavg()[0],
    }


#: Figures of an ingest window whose median over the rounds is reported per k.
INGEST_MEDIANS = (
    "reports_per_s",
    "endpoint_stats_per_s",
    "replicas_cpu_share",
    "reporters_cpu_share",
    "ads_cpu_share",
    "redis_cpu_share",
    "machine_busy_cores",
    "others_cpu_share",
)


async def ingest_phase(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of k = 1, 2, ... replicas reported to, so the machine's other load falls on
    each k alike; medians per k over the rounds."""
    runs = []
    for _ in range(args.ingest_rounds):
        for k in range(1, len(rig.replicas) + 1):
            runs.append(await ingest_once(rig, k, args))
    by_k: dict[int, dict[str, Any]] = {}
    for k in sorted({run["replicas_reported_to"] for run in runs}):
        mine = [run for run in runs if run["replicas_reported_to"] == k]
        by_k[k] = {key: statistics.median(run[key] for run in mine) for key in INGEST_MEDIANS}
        by_k[k]["per_replica_reports_per_s"] = {
            name: statistics.median(run["per_replica"][name]["reports_per_s"] for run in mine)
            for name, r in mine[0]["per_replica"].items()
            if r["reporters"]
        }
        by_k[k]["per_replica_cpu_share"] = {
            name: statistics.median(run["per_replica"][name]["cpu_share"] for run in mine)
            for name, r in mine[0]["per_replica"].items()
            if r["reporters"]
        }
    for figures in by_k.values():
        figures["scaling"] = figures["reports_per_s"] / by_k[1]["reports_per_s"]
    return {"by_k": {str(k): v for k, v in by_k.items()}, "runs": runs}


async def failover(rig: Rig, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Signal the lease holder (by PID) and poll every replica's /healthz until another one
    leads; then reap it and start a replacement, so the next failover again has every
    replica. After SIGTERM the old one answers through its drain period: the polls also
    say when it stopped leading and whether it led again meanwhile."""
    leader = await wait_leader(rig)
    others = [r for r in rig.replicas if r is not leader]
    sig = signal.SIGKILL if kind == "kill" else signal.SIGTERM
    start = time.monotonic()
    os.kill(leader.pid, sig)
    polls = 0
    old_stepped_down = old_led_again = None
    while True:
        healths = await asyncio.gather(*(rig.health(r) for r in [leader, *others]))
        at = time.monotonic() - start
        polls += 1
        old, *rest = healths
        if old is not None and kind == "term":
            if not old["redis"]["leader"] and old_stepped_down is None:
                old_stepped_down = at
            elif old["redis"]["leader"] and old_stepped_down is not None and not old_led_again:
                old_led_again = at
        found = [r for r, h in zip(others, rest, strict=True) if h and h["redis"]["leader"]]
        if found:
            break
        if at > PHASE_TIMEOUT:
            raise TimeoutError(f"no new leader {PHASE_TIMEOUT:g} s after {kind}")
        await asyncio.sleep(LEADER_POLL)
    await rig.reap(leader)
    exited = time.monotonic() - start
    starting = time.monotonic()
    replacement = await rig.start_replica()
    return {
        "kind": kind,
        "old": leader.name,
        "new": found[0].name,
        "leaders_seen": len(found),
        "to_new_leader_s": at,
        "polls": polls,
        "old_stepped_down_s": old_stepped_down,
        "old_led_again_s": old_led_again,
        "old_exited_s": exited,
        "replacement": replacement.name,
        "replacement_ready_s": time.monotonic() - starting,
    }


# --- the whole run -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    redis_version = version.stdout.split()[2]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "redis": redis_version.removeprefix("v="),
    }


def command_line() -> str:
    python = os.path.relpath(sys.executable) if sys.executable else "python"
    return shlex.join([python, os.path.relpath(sys.argv[0]), *sys.argv[1:]])


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "machine": machine(),
        "command": command_line(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("role", "json")},
        "report_bytes": len(report_bytes(args.pools, args.endpoints)),
        "loadavg_before": os.getloadavg()[0],
    }
    begun = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="replicas-")))
        redis = RedisServer(workdir / "redis", free_port())
        await redis.start()
        stack.push_async_callback(redis.stop)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        rig = Rig(args, workdir, redis, session)
        rig.snapshot.write_text(snapshot_yaml(args.pools, args.endpoints))
        rig.token.write_text(TOKEN)

        async def stop_replicas() -> None:
            await asyncio.gather(*(rig.stop_replica(r) for r in list(rig.replicas)))

        stack.push_async_callback(stop_replicas)
        starts = []
        for _ in range(args.replicas):
            starting = time.monotonic()
            await rig.start_replica()
            starts.append(time.monotonic() - starting)
        out["replica_start_s"] = starts
        out["first_leader"] = (await wait_leader(rig)).name
        names = [r.name for r in rig.replicas]
        print(f"replicas {', '.join(names)} ready; leader {out['first_leader']}", flush=True)

        ports = ",".join(str(r.xds_port) for r in rig.replicas)
        ads: list[Child] = []
        first = 0
        for count in spread(args.clients, args.ads_processes):
            child = await Child.start(
                "ads",
                *("--ports", ports, "--count", str(count), "--first", str(first)),
                *("--pools", str(args.pools)),
            )
            stack.push_async_callback(child.stop)
            ads.append(child)
            rig.ads.append(child)
            first += count
        out["ads_initial_sync_s"] = await wait_ads_ready(ads, args.clients)
        print(
            f"{args.clients} ADS clients in sync in {out['ads_initial_sync_s']:.1f} s", flush=True
        )

        phases = set(args.phases.split(","))
        steady = await start_reporters(rig.replicas, args.steady_reporters, "steady", args)
        if phases & {"steady", "drains"}:
            await asyncio.sleep(args.warmup)
        if "steady" in phases:
            print(f"steady state: Redis traffic over {args.steady_seconds:g} s", flush=True)
            out["steady"] = await redis_window(rig, args.steady_seconds, steady)
        if "drains" in phases:
            print(f"drains through {names[0]}, {args.drains} times", flush=True)
            out["drains"] = await drain_phase(rig, names, steady, args)
        await stop_all(steady)

        if "ingest" in phases:
            print("LRS ingest with reporters on 1, 2, ... replicas", flush=True)
            out["ingest"] = await ingest_phase(rig, args)

        if "failover" in phases:
            steady = await start_reporters(rig.replicas, args.steady_reporters, "steady2", args)
            await asyncio.sleep(args.lrs_interval * 3)
            print("failovers", flush=True)
            out["failover"] = []
            for _ in range(args.failovers):
                for kind in ("kill", "term"):
                    out["failover"].append(await failover(rig, kind, args))
            await stop_all(steady)
    out["loadavg_after"] = os.getloadavg()[0]
    out["wall_s"] = time.monotonic() - begun
    return out


# --- the report --------------------------------------------------------------------------


def report(out: dict[str, Any]) -> str:
    s = out["settings"]
    m = out["machine"]
    lines = [
        f"replicas: {s['replicas']} x `xds-server serve --redis`, one redis-server {m['redis']}, "
        f"{s['clients']} ADS clients, {s['pools']} pools x {s['endpoints']} endpoints (orca)",
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['platform']}, Python {m['python']}, "
        f"grpcio {m['grpcio']}; load average {out['loadavg_before']:.2f} before, "
        f"{out['loadavg_after']:.2f} after; {out['wall_s']:.0f} s",
        f"command: {out['command']}",
        f"replica start (to /readyz): {', '.join(f'{t:.1f}' for t in out['replica_start_s'])} s; "
        f"all ADS clients' first EDS {out['ads_initial_sync_s']:.2f} s",
        "",
    ]
    if "drains" in out:
        lines += _drains(out)
    if "ingest" in out:
        lines += _ingest(out)
    if "failover" in out:
        lines += _failover(out)
    if "steady" in out:
        lines += _steady(out)
    return "\n".join(lines)


def _drains(out: dict[str, Any]) -> list[str]:
    s, d, lines = out["settings"], out["drains"], []
    lines.append(
        f"1. drain through replica {d['through']} -> every client (ms from the POST's start; "
        f"median of {s['drains']} runs each)"
    )
    lines.append(f"   {'':8} {'POST':>7} {'first':>7} {'median':>7} {'last':>7}  last per replica")
    for verb, row in d["summary"].items():
        per = ", ".join(f"{n} {v:.0f}" for n, v in row["per_replica_last_ms"].items())
        lines.append(
            f"   {verb:8} {row['post_ms']:7.1f} {row['first_ms']:7.1f} {row['median_ms']:7.1f} "
            f"{row['last_ms']:7.1f}  {per}"
        )
    for verb in ("drain", "undrain"):
        lasts = " ".join(f"{r['last_ms']:.0f}" for r in d["runs"] if r["verb"] == verb)
        posts = " ".join(f"{r['post_ms']:.0f}" for r in d["runs"] if r["verb"] == verb)
        lines.append(f"   {verb} per run: last {lasts} ms; POST {posts} ms")
    missing = sum(r["missing"] for r in d["runs"])
    cpu = d["cpu_share"]
    replicas = ", ".join(
        f"{r} {cpu[r]:.2f}" for r in sorted(d["summary"]["drain"]["per_replica_last_ms"])
    )
    lines.append(
        f"   clients that never saw it: {missing}; CPU meanwhile (cores): replicas {replicas}; "
        f"machine busy {cpu['machine']:.2f}, of which others {cpu['others']:.2f}"
    )
    lines.append("")
    return lines


def _ingest(out: dict[str, Any]) -> list[str]:
    s, ingest, lines = out["settings"], out["ingest"], []
    lines.append(
        f"2. LRS ingest: {s['reporters']} reporters ({out['report_bytes'] / KB:.0f} kB reports, "
        f"{s['pools'] * s['endpoints']} endpoint stats each, every {s['lrs_interval']:g} s: "
        f"{s['reporters'] / s['lrs_interval']:.0f} offered/s) spread over the first k replicas; "
        f"{s['ingest_seconds']:g} s windows, median of {s['ingest_rounds']} rounds; "
        f"--lrs-cpu-budget {s['lrs_cpu_budget']:g}"
    )
    lines.append(
        f"   {'k':>2} {'reports/s':>10} {'stats/s':>10} {'x k=1':>6} {'replicas':>9} "
        f"{'reporters':>9} {'ADS':>5} {'redis':>5} {'others':>6} {'machine':>7}  "
        "per replica: reports/s (CPU)"
    )
    for k, row in ingest["by_k"].items():
        per = ", ".join(
            f"{name} {rate:.0f} ({row['per_replica_cpu_share'][name]:.2f})"
            for name, rate in row["per_replica_reports_per_s"].items()
        )
        lines.append(
            f"   {k:>2} {row['reports_per_s']:10.1f} {row['endpoint_stats_per_s']:10.0f} "
            f"{row['scaling']:6.2f} {row['replicas_cpu_share']:9.2f} "
            f"{row['reporters_cpu_share']:9.2f} {row['ads_cpu_share']:5.2f} "
            f"{row['redis_cpu_share']:5.2f} {row['others_cpu_share']:6.2f} "
            f"{row['machine_busy_cores']:7.2f}  {per}"
        )
    lines.append(
        f"   (CPU in cores; machine: busy cores of all {out['machine']['cpus']}; others: busy "
        "cores not used by this bench's processes)"
    )
    for run in ingest["runs"]:
        rss = ", ".join(f"{n} {r['rss_mib']:.0f}" for n, r in run["per_replica"].items())
        lines.append(
            f"   k={run['replicas_reported_to']}: {run['reports_per_s']:.1f} reports/s, "
            f"reporters sent {run['reporters_sent_per_s']:.0f}/s, others' CPU "
            f"{run['others_cpu_share']:.2f}; replica RSS after (MiB): {rss}"
        )
    troubles = [
        f"k={p['replicas_reported_to']} {n}: {r['early']:.0f} early, {r['refused']:.0f} refused, "
        f"interval {r['interval_s']:g} s"
        for p in ingest["runs"]
        for n, r in p["per_replica"].items()
        if r["early"] or r["refused"] or r["interval_s"] != s["lrs_interval"]
    ]
    lines.append("   " + ("; ".join(troubles) if troubles else "no early or refused reports"))
    lines.append("")
    return lines


def _failover(out: dict[str, Any]) -> list[str]:
    lines = []
    lines.append("3. time to a new leader (polling the others' /healthz every 10 ms)")
    for f in out["failover"]:
        lines.append(
            f"   {'SIGKILL' if f['kind'] == 'kill' else 'SIGTERM'} {f['old']}: {f['new']} leads "
            f"after {f['to_new_leader_s']:.2f} s (old process gone at {f['old_exited_s']:.2f} s; "
            f"replacement {f['replacement']} ready in {f['replacement_ready_s']:.1f} s)"
        )
        if f["kind"] == "term" and f["old_stepped_down_s"] is not None:
            again = f["old_led_again_s"]
            lines.append(
                f"     {f['old']} stopped leading at {f['old_stepped_down_s']:.2f} s"
                + (f", then led again at {again:.2f} s, during its drain" if again else "")
            )
    lines.append("")
    return lines


def _steady(out: dict[str, Any]) -> list[str]:
    s, st, lines = out["settings"], out["steady"], []
    lines.append(
        f"4. Redis traffic, steady state: {st['seconds']:.0f} s, {st['replicas']} replicas, "
        f"{s['clients']} ADS clients, {s['steady_reporters']} reporters every "
        f"{s['lrs_interval']:g} s"
    )
    lines.append(
        f"   per replica: {st['net_input_bytes_per_s_per_replica'] / KB:.1f} kB/s into Redis, "
        f"{st['net_output_bytes_per_s_per_replica'] / KB:.1f} kB/s out of it, "
        f"{st['commands_per_s_per_replica']:.1f} commands/s"
    )
    lines.append(
        f"   all: {st['net_input_bytes_per_s'] / KB:.1f} kB/s in, "
        f"{st['net_output_bytes_per_s'] / KB:.1f} kB/s out, {st['commands_per_s']:.1f} commands/s "
        f"(instantaneous_ops_per_sec median {st['instantaneous_ops_median']:.0f}); Redis CPU "
        f"{st['redis_cpu_share']:.3f} cores; {st['connected_clients']} connections"
    )
    cpus = ", ".join(f"{k} {v:.2f}" for k, v in st["replica_cpu_share"].items())
    cpu = st["cpu_share"]
    lines.append(
        f"   CPU (cores): replicas {cpus}; ADS clients {cpu['ads']:.2f}, reporters "
        f"{cpu['reporters']:.2f}, Redis {st['redis_cpu_share']:.3f}; "
        f"machine busy {cpu['machine']:.2f}, of which others {cpu['others']:.2f}"
    )
    windows = ", ".join(
        f"{k} {v['written'] / KB:.0f}/{v['read'] / KB:.0f}"
        for k, v in st["load_window_bytes_per_s"].items()
    )
    lines.append(f"   load windows written/read per replica (kB/s, the replica's count): {windows}")
    lines.append(f"   {'command':14} {'per s':>8} {'per s/replica':>14} {'Redis us/s':>11}")
    for name, c in sorted(st["commands"].items(), key=lambda kv: -kv[1]["per_s"]):
        lines.append(
            f"   {name:14} {c['per_s']:8.2f} {c['per_s_per_replica']:14.2f} "
            f"{c['redis_usec_per_s']:11.0f}"
        )
    return lines


#: The copies of itself the benchmark starts: ADS clients and LRS reporters.
ROLES: dict[str, cli.Role] = {"ads": run_ads, "lrs": run_lrs}


def main() -> None:
    parser = cli.parser(__doc__, ROLES)
    parser.set_defaults(json=RESULTS / "replicas.json")
    add = parser.add_argument
    add("--replicas", type=int, default=3, help="serve processes (default 3)")
    add("--clients", type=int, default=900, help="ADS clients over all replicas (default 900)")
    add("--ads-processes", type=int, default=2, help="processes the ADS clients run in")
    add("--pools", type=int, default=100, help="pools, all load-weighted (default 100)")
    add("--endpoints", type=int, default=20, help="per pool (default 20)")
    add("--steady-reporters", type=int, default=30, help="LRS reporters in steady state")
    add("--warmup", type=float, default=10.0, help="seconds before the steady window")
    add("--steady-seconds", type=float, default=60.0, help="the Redis traffic window")
    add("--drains", type=int, default=5, help="drain + undrain runs (default 5)")
    add("--drain-pause", type=float, default=0.5, help="seconds between drain runs")
    add("--reporters", type=int, default=200, help="LRS reporters in the ingest phases")
    add("--ingest-rounds", type=int, default=2, help="rounds of k = 1, 2, 3 (median)")
    add("--ingest-seconds", type=float, default=10.0, help="per ingest phase")
    add("--ingest-warmup", type=float, default=4.0, help="before each ingest phase's window")
    add("--failovers", type=int, default=2, help="SIGKILL + SIGTERM failovers (default 2)")
    add("--drain-period", type=float, default=2.0, help="serve --drain-period (default 2)")
    add(
        "--lrs-cpu-budget",
        type=float,
        default=4.0,
        help="serve --lrs-cpu-budget (default 4: above any core count here, so ingest is not "
        "paced and its capacity shows; serve's own default is 0.5)",
    )
    add(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated, of {', '.join(PHASES)} (default all)",
    )
    # Roles' arguments.
    add("--ports", help=argparse.SUPPRESS)
    add("--port", type=int, help=argparse.SUPPRESS)
    add("--count", type=int, help=argparse.SUPPRESS)
    add("--first", type=int, default=0, help=argparse.SUPPRESS)
    add("--tag", default="r", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.lrs_interval = 1.0  # serve's default reporting interval, which the replicas use
    if not cli.played_role(args, ROLES):
        out = asyncio.run(run_bench(args))
        cli.publish(report(out), out, args.json)


if __name__ == "__main__":
    main()
