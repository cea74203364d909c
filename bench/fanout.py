"""Fan-out benchmark: how fast one config edit reaches N ADS clients, against raw grpc.aio.

Prints, for our server and, in the same run, for a bare grpc.aio server that writes
the very same bytes: initial sync time, edit -> first client, first -> last client,
and server memory per stream, over SotW and over Delta ADS in turn. Targets (issue
14): first -> last within 1.3x the raw fan-out, at most 50 KB of server memory per
stream (the RSS the streams add, over the streams); edit -> first under 200 ms.

Each server runs in its own subprocess, and so does every share of its clients
(``--processes`` client processes per server, each holding a share of the streams),
so the server's CPU and memory figures are its own. The parent drives them all with
one JSON line per command; both servers stay connected while their edits alternate,
so other load on the machine falls on both alike. Edit times are ``time.monotonic()``
(CLOCK_MONOTONIC, the same clock in every process on Linux) taken in the server right
before it changes the cache, arrival times are taken by the clients as each response
arrives. The raw server answers with bytes captured from our server, so both put the
same payloads on the wire. Each client is Envoy-like: its own connection
(``--per-connection`` puts several streams on one), one ADS stream that asks for every
cluster and then their endpoints, and ACKs each response.

With ``--tls`` the same run also measures both servers over mTLS (certificates
made at run time by the lab's CA; ours with the product's `ServerTls` and peers
keyed by certificate identity, raw with grpc's static credentials), with the same
clients and edits, and prints TLS / plaintext for each figure, ours and raw. Target
(issue 12): ours over mTLS within 1.3x of ours in plaintext, for the initial sync
and for first -> last of each edit.

    .venv/bin/python bench/fanout.py                 # 1000 clients, SotW and Delta, ~1 min
    .venv/bin/python bench/fanout.py --clients 50    # ~15 s
    .venv/bin/python bench/fanout.py --clients 10000 --syncs 1   # 10,000 streams, ~4 min
    .venv/bin/python bench/fanout.py --tls --protocols sotw --per-connection 50  # mTLS
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import cli
import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from lrs.contract import raw_bytes
from xds_lab.certs import Authority
from xds_lab.envoy_rig import BENCH_LIMITS
from xds_server.admission import Admission, ClientLimits
from xds_server.config.reader import parse_config
from xds_server.config.types import Pool
from xds_server.grpc_server import SERVER_OPTIONS, start_grpc_server
from xds_server.resources.build import build_all, cluster_load_assignment
from xds_server.tls import ServerTls, TlsFiles
from xds_server.xds import typeurls
from xds_server.xds.cache import ResourceCache
from xds_server.xds.clients import ClientRegistry
from xds_server.xds.services import DiscoveryServices

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
ADS_METHOD = f"/{ADS_SERVICE}/StreamAggregatedResources"
DELTA_ADS_METHOD = f"/{ADS_SERVICE}/DeltaAggregatedResources"
#: Streams per client channel: each channel is its own TCP connection, as with Envoys.
STREAMS_PER_CHANNEL = 50
EDITS = ("edit-one", "edit-all")
#: The four responses the raw server replays, as captured from our server.
CAPTURED = ("cds", "eds", *EDITS)
#: Issue 14: first -> last within 1.3x the raw fan-out, and at most 50 KB of server memory
#: per stream (the RSS the streams add, over the streams); issue 2: edit -> first < 200 ms.
TARGET_SPREAD_RATIO = 1.3
TARGET_RSS_PER_STREAM = 50_000
TARGET_EDIT_TO_FIRST_MS = 200.0
#: With --tls: our figures over mTLS at most this many times our plaintext ones (issue 12).
TARGET_TLS_RATIO = 1.3
#: The subjects of a --tls run, in the order their edits alternate.
TLS_SUBJECTS = ("ours", "raw", "ours-tls", "raw-tls")
#: Bound on every wait for clients or servers, so a stuck run fails instead of hanging.
PHASE_TIMEOUT = 120.0
#: Between two looks at the server's stats while waiting for its streams.
POLL_INTERVAL = 0.05
#: Lead time the client processes get, so that they all open their streams at one instant.
START_LEAD = 0.2
KIB, MIB = 1024, 1024 * 1024
#: Longest answer line from a child: a client process's arrival times for thousands of streams.
ANSWER_LIMIT = 64 * MIB
SCRIPT = str(Path(__file__).resolve())


# --- the fleet: a snapshot file, through the real model -> resources path -------------


def pool_name(pool: int) -> str:
    return f"pool-{pool:03d}"


def snapshot_yaml(pools: int, endpoints: int) -> str:
    """A snapshot file as a user writes it: one listener routing by model to every pool."""
    lines = ["listeners:", "  - name: inference", "    port: 10000", "    routes:"]
    for p in range(pools):
        lines += [f"      - model: {pool_name(p)}", f"        pool: {pool_name(p)}"]
    lines.append("pools:")
    for p in range(pools):
        lines += [f"  - name: {pool_name(p)}", "    lb_policy: least_request", "    endpoints:"]
        for e in range(endpoints):
            address = f"10.{p // 250}.{p % 250}.{e + 1}"
            lines.append(f"      - {{address: {address}, port: 8000, zone: zone-{'ab'[e % 2]}}}")
    return "\n".join(lines) + "\n"


def reweighted(pool: Pool, weight: int) -> Pool:
    """The pool with every endpoint at ``weight``: what the weight engine publishes."""
    endpoints = tuple(replace(e, weight=weight) for e in pool.endpoints)
    return replace(pool, endpoints=endpoints)


# --- certificates for --tls: made at run time by the lab's CA ------------------------


@dataclass(frozen=True, slots=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 and one client certificate, as PEM files.

    Made once per run in a temporary directory; the server roles get the directory
    (``--tls-dir``) and find the files by name. Every client presents the same
    certificate, so with mTLS they are one peer (the bench limits do not bound peers).
    """

    directory: Path
    CA = "bench-ca"
    SERVER = "xds-server"
    CLIENT = "bench-client"
    CLIENT_ID = "spiffe://bench.example/ns/bench/sa/envoy"

    @classmethod
    def make(cls, directory: Path) -> Pki:
        ca = Authority(directory, cls.CA)
        ca.server(cls.SERVER)
        ca.issue(cls.CLIENT, uris=(cls.CLIENT_ID,))
        return cls(directory)

    def pem(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}-key.pem"

    def server_files(self) -> TlsFiles:
        """What the product's --tls-cert/--tls-key/--tls-client-ca name: mTLS required."""
        return TlsFiles(self.pem(self.SERVER), self.key(self.SERVER), self.pem(self.CA))

    def raw_credentials(self) -> grpc.ServerCredentials:
        """The same mTLS for the raw baseline, with grpc's static credentials."""
        files = self.server_files()
        assert files.client_ca is not None
        return grpc.ssl_server_credentials(
            [(files.key.read_bytes(), files.cert.read_bytes())],
            root_certificates=files.client_ca.read_bytes(),
            require_client_auth=True,
        )

    def client_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.pem(self.CA).read_bytes(),
            self.key(self.CLIENT).read_bytes(),
            self.pem(self.CLIENT).read_bytes(),
        )


def client_channel(
    port: int, credentials: grpc.ChannelCredentials | None, *options: tuple[str, Any]
) -> grpc.aio.Channel:
    """A channel of its own (its own TCP connection) to 127.0.0.1:port, over mTLS or not."""
    # A local subchannel pool: otherwise channels to one target share one connection.
    opts = [("grpc.use_local_subchannel_pool", 1), *options]
    target = f"127.0.0.1:{port}"
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)


# --- the servers: ours and the raw baseline, each driven over stdin/stdout -----------


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def stats(ready: int, streams: int) -> dict[str, Any]:
    return {"ready": ready, "streams": streams, "rss": rss_bytes(), "cpu": time.process_time()}


async def command_loop(handle: Callable[[str], Any]) -> None:
    """Answer one JSON line per stdin command until ``quit`` or the parent goes away.

    ``handle`` returns the answer, or a coroutine for it (a client process waits for its
    streams). Commands run on the event loop itself, so an edit is timed exactly where a
    real config change would happen.
    """
    while True:
        line = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if line in ("", "quit"):
            return
        answer = handle(line)
        if asyncio.iscoroutine(answer):
            answer = await answer
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard one; returns it.

    10,000 streams on loopback hold 10,000 sockets in the server and as many in the
    client processes, more than the usual soft limit of 1024.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def exit_without_goaway() -> NoReturn:
    """End a server role at once, once its clients have gone.

    A graceful stop sends GOAWAY on client connections that are still closing
    (grpc.aio closes them in the background), and the clients log every one.
    """
    sys.stdout.flush()
    os._exit(0)


class ServerUnderTest:
    """Our ResourceCache + DiscoveryServices, with edits the way the config side makes them.

    ``edit-one`` is the weight path (update_resources, one pool), ``edit-all`` a
    snapshot reload in which every pool's weights changed (set_all).
    Messages are built before the clock starts: building them is the config
    side's job, serving them is what is measured.
    """

    def __init__(self, pools: int, endpoints: int) -> None:
        self.config = parse_config(snapshot_yaml(pools, endpoints), "bench")
        self.group = self.config.group_for("bench").name
        self.cache = ResourceCache()
        self.registry = ClientRegistry()
        self.edits = 0
        self.cache.set_all(build_all(self.config), self.resolve)

    def resolve(self, node_cluster: str) -> str:
        return self.config.group_for(node_cluster).name

    def handle(self, command: str) -> dict[str, Any]:
        if command == "stats":
            return stats(self.in_sync(), len(self.registry))
        self.edits += 1
        weight = self.edits + 1  # every edit is new content, so every client gets it
        if command == "edit-one":
            pool = reweighted(self.config.pools[self.edits % len(self.config.pools)], weight)
            change = {pool.name: cluster_load_assignment(pool)}
            at = time.monotonic()
            self.cache.update_resources(self.group, typeurls.ENDPOINT, change)
        elif command == "edit-all":
            pools = tuple(reweighted(pool, weight) for pool in self.config.pools)
            self.config = replace(self.config, pools=pools)
            messages = build_all(self.config)
            at = time.monotonic()
            self.cache.set_all(messages, self.resolve)
        else:
            raise ValueError(f"unknown command {command!r}")
        return {"at": at}

    def in_sync(self) -> int:
        """Streams that have ACKed the endpoints sent last: they take the next edit at once."""
        count = 0
        for client in self.registry:
            status = client.types.get(typeurls.ENDPOINT)
            if status is not None and status.sent_version == status.acked_version != "":
                count += 1
        return count


async def start_ours(
    under_test: ServerUnderTest, tls_dir: Path | None, limits: ClientLimits
) -> tuple[grpc.aio.Server, Admission]:
    """Our services on 127.0.0.1 as `serve` starts them: with TLS, mTLS from the files and
    peers keyed by certificate identity."""
    tls = None if tls_dir is None else ServerTls(Pki(tls_dir).server_files())
    admission = Admission(limits, mutual=tls is not None)
    services = DiscoveryServices(under_test.cache, under_test.registry, admission.gate)
    server, port = await start_grpc_server(
        services.handlers(), "127.0.0.1", 0, tls, limits.grpc_options()
    )
    print(json.dumps({"port": port}), flush=True)
    return server, admission


async def run_server(pools: int, endpoints: int, tls_dir: Path | None) -> NoReturn:
    raise_fd_limit()
    under_test = ServerUnderTest(pools, endpoints)
    _server, _admission = await start_ours(under_test, tls_dir, BENCH_LIMITS)  # keep a ref
    await command_loop(under_test.handle)
    exit_without_goaway()


class RawFanout:
    """The baseline: grpc.aio with nothing in between the event and the write.

    Each stream gets the captured CDS and EDS bytes for its first request of
    each type; an edit queues the captured edit response on every open stream.
    Requests are parsed as ours are (SotW or Delta, as captured), and the server
    options are ours.
    """

    def __init__(self, captured: dict[str, bytes], protocol: str = "sotw") -> None:
        self.captured = captured
        self.protocol = protocol
        self.initial = {typeurls.CLUSTER: captured["cds"], typeurls.ENDPOINT: captured["eds"]}
        self.streams: set[asyncio.Queue[bytes | None]] = set()

    def handler(self) -> grpc.GenericRpcHandler:
        request = CALLS[self.protocol].request
        method = grpc.stream_stream_rpc_method_handler(
            self.serve,
            request_deserializer=request.FromString,
            response_serializer=raw_bytes,
        )
        return grpc.method_handlers_generic_handler(ADS_SERVICE, {METHODS[self.protocol]: method})

    async def serve(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def read() -> None:
            answered: set[str] = set()
            try:
                async for request in requests:
                    payload = self.initial.get(request.type_url)
                    if payload is not None and request.type_url not in answered:
                        answered.add(request.type_url)
                        queue.put_nowait(payload)
            finally:
                queue.put_nowait(None)

        self.streams.add(queue)
        reader = asyncio.create_task(read())
        try:
            while (payload := await queue.get()) is not None:
                await context.write(payload)
        finally:
            reader.cancel()
            self.streams.discard(queue)

    def handle(self, command: str) -> dict[str, Any]:
        if command == "stats":
            return stats(len(self.streams), len(self.streams))
        payload = self.captured[command]
        at = time.monotonic()
        for queue in self.streams:
            queue.put_nowait(payload)
        return {"at": at}


async def run_raw(capture_dir: Path, tls_dir: Path | None, protocol: str = "sotw") -> NoReturn:
    raise_fd_limit()
    captured = {name: (capture_dir / f"{name}.bin").read_bytes() for name in CAPTURED}
    raw = RawFanout(captured, protocol)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers([raw.handler()])
    if tls_dir is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", Pki(tls_dir).raw_credentials())
    await server.start()
    print(json.dumps({"port": port}), flush=True)
    await command_loop(raw.handle)
    exit_without_goaway()


class ServerProcess:
    """A server role in a subprocess, driven one command at a time."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    @classmethod
    async def start(cls, role: str, *extra: str, script: str = SCRIPT) -> ServerProcess:
        """Start ``script --role role *extra``; it prints ``{"port": ...}`` once listening."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            "--role",
            role,
            *extra,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=ANSWER_LIMIT,
        )
        line = await asyncio.wait_for(proc.stdout.readline(), 60)  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"{role} server exited before listening")
        return cls(proc, json.loads(line)["port"])

    async def command(self, command: str, timeout: float = 30) -> dict[str, Any]:
        self.proc.stdin.write(f"{command}\n".encode())  # type: ignore[union-attr]
        await self.proc.stdin.drain()  # type: ignore[union-attr]
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"server exited on {command!r}")
        return json.loads(line)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# --- the clients ---------------------------------------------------------------------


def response_header_class() -> type[Message]:
    """A DiscoveryResponse with only version_info, type_url and nonce: enough to ACK.

    Parsing whole 100 KB responses would measure the client, not the server;
    this class leaves the resources as unknown bytes.
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name="bench_fanout.proto", package="bench", syntax="proto3"
    )
    message = proto.message_type.add(name="ResponseHeader")
    for name, number in (("version_info", 1), ("type_url", 4), ("nonce", 5)):
        message.field.add(
            name=name,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.ResponseHeader"))


ResponseHeader = response_header_class()


class AdsCall:
    """One SotW ADS stream that subscribes to every cluster and its endpoints, and ACKs.

    Requests are pre-encoded chunks joined with a small header, as the server
    does with responses, so the client's CPU goes to receiving. The response header
    class reads SotW and Delta responses alike (type_url and nonce have the same
    field numbers in both), and so does `eds_names` (resource_names and
    resource_names_subscribe are both field 3).
    """

    method = ADS_METHOD
    request: type[Message] = discovery_pb2.DiscoveryRequest

    def __init__(self, channel: grpc.aio.Channel, node_id: str, eds_names: bytes) -> None:
        self.call = channel.stream_stream(
            self.method, request_serializer=raw_bytes, response_deserializer=raw_bytes
        )()
        self.node_id = node_id
        self.eds_names = eds_names
        self.cds_at = 0.0  # when the CDS response arrived

    async def subscribe(self) -> bytes:
        """Ask for all clusters, ACK them, then ask for the endpoints of each; returns the CDS."""
        first = self.request(type_url=typeurls.CLUSTER)
        first.node.id, first.node.cluster = self.node_id, "bench"  # type: ignore[attr-defined]
        await self.call.write(first.SerializeToString())
        payload, cds = await self.read(typeurls.CLUSTER)
        self.cds_at = time.monotonic()
        await self.call.write(self.reply(cds, b""))
        eds = self.request(type_url=typeurls.ENDPOINT)
        await self.call.write(self.eds_names + eds.SerializeToString())
        return payload

    async def read(self, type_url: str) -> tuple[bytes, Any]:
        payload = await self.call.read()
        if payload is grpc.aio.EOF:
            raise RuntimeError(f"{self.node_id}: the server closed the stream")
        header = ResponseHeader.FromString(payload)
        if header.type_url != type_url:
            raise RuntimeError(f"{self.node_id}: expected {type_url}, got {header.type_url}")
        return payload, header

    async def ack_endpoints(self, header: Any) -> None:
        await self.call.write(self.reply(header, self.eds_names))

    def reply(self, header: Any, names: bytes) -> bytes:
        """An ACK; SotW repeats the names it subscribes to in every request, as Envoy does."""
        ack = discovery_pb2.DiscoveryRequest(
            type_url=header.type_url, version_info=header.version_info, response_nonce=header.nonce
        )
        return names + ack.SerializeToString()


class DeltaAdsCall(AdsCall):
    """The same client over Delta ADS: a wildcard CDS subscription, EDS by name, and ACKs
    that carry only the nonce (a Delta subscription persists, so no names are repeated)."""

    method = DELTA_ADS_METHOD
    request = discovery_pb2.DeltaDiscoveryRequest

    async def ack_endpoints(self, header: Any) -> None:
        await self.call.write(self.reply(header, b""))

    def reply(self, header: Any, names: bytes) -> bytes:
        ack = discovery_pb2.DeltaDiscoveryRequest(
            type_url=header.type_url, response_nonce=header.nonce
        )
        return names + ack.SerializeToString()


#: The client stream for each protocol the fan-out is measured with.
CALLS: dict[str, type[AdsCall]] = {"sotw": AdsCall, "delta": DeltaAdsCall}
PROTOCOLS = tuple(CALLS)
#: The ADS method of each protocol, as the raw baseline registers it.
METHODS = {"sotw": "StreamAggregatedResources", "delta": "DeltaAggregatedResources"}


def eds_names_chunk(pools: int) -> bytes:
    names = [pool_name(p) for p in range(pools)]
    return discovery_pb2.DiscoveryRequest(resource_names=names).SerializeToString()


@dataclass(slots=True)
class Arrivals:
    """When each client got the response a phase waits for."""

    expected: int
    times: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, at: float, size: int) -> None:
        self.times.append(at)
        self.sizes.append(size)
        if len(self.times) >= self.expected:
            self.complete.set()


class AdsClients:
    """N ADS streams of one protocol, ``per_connection`` streams on each connection."""

    def __init__(
        self,
        port: int,
        ids: range,
        pools: int,
        credentials: grpc.ChannelCredentials | None,
        protocol: str = "sotw",
        per_connection: int = STREAMS_PER_CHANNEL,
    ) -> None:
        self.port = port
        self.credentials = credentials
        self.ids = ids
        self.count = len(ids)
        self.call_class = CALLS[protocol]
        self.per_connection = per_connection
        self.eds_names = eds_names_chunk(pools)
        self.channels: list[grpc.aio.Channel] = []
        self.calls: list[AdsCall] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.arrivals = Arrivals(self.count)

    async def connect(self) -> None:
        """Open the connections first, so the initial sync measures xDS, not TCP."""
        for _ in range(-(-self.count // self.per_connection)):
            self.channels.append(client_channel(self.port, self.credentials))
        await asyncio.wait_for(
            asyncio.gather(*(c.channel_ready() for c in self.channels)), PHASE_TIMEOUT
        )

    def start(self) -> Arrivals:
        """Open every stream; the returned Arrivals completes when all have their endpoints."""
        arrivals = self.expect_next()
        for n, i in enumerate(self.ids):
            channel = self.channels[n // self.per_connection]
            call = self.call_class(channel, f"bench-{i}", self.eds_names)
            self.calls.append(call)
            self.tasks.append(asyncio.create_task(self.run(call)))
        return arrivals

    async def stop_streams(self) -> None:
        """End every stream, keeping the connections (for another initial sync)."""
        for call in self.calls:
            call.call.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.calls.clear()
        self.tasks.clear()

    async def run(self, call: AdsCall) -> None:
        """Subscribe, then take every EDS response as it comes: record its arrival, ACK it."""
        await call.subscribe()
        while True:
            payload, header = await call.read(typeurls.ENDPOINT)
            self.arrivals.add(time.monotonic(), len(payload))
            await call.ack_endpoints(header)

    def expect_next(self) -> Arrivals:
        self.arrivals = Arrivals(self.count)
        return self.arrivals

    async def wait(self, arrivals: Arrivals) -> None:
        """Until every client has the response, or a stream fails, or PHASE_TIMEOUT."""
        complete = asyncio.create_task(arrivals.complete.wait())
        done, _ = await asyncio.wait(
            [complete, *self.tasks], timeout=PHASE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        complete.cancel()
        for task in done:
            if task is not complete:
                task.result()  # raises the stream's error
                raise RuntimeError("a client stream ended early")
        if not done:
            raise TimeoutError(f"{len(arrivals.times)}/{arrivals.expected} clients in time")

    async def close(self) -> None:
        await self.stop_streams()
        await asyncio.gather(*(c.close() for c in self.channels))
        self.channels.clear()


class ClientRole:
    """A client process: its share of a subject's streams, driven by the parent.

    Commands: ``connect``; ``start AT`` opens every stream at monotonic time AT (the
    same instant in every client process) and answers once all have their endpoints;
    ``expect`` then ``wait`` bracket an edit made meanwhile in the server; ``stop``
    ends the streams (the connections stay). Arrival times are ``time.monotonic()``,
    comparable with the server's and the other client processes' on Linux.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        credentials = None if args.tls_dir is None else Pki(args.tls_dir).client_credentials()
        ids = range(args.first, args.first + args.count)
        self.clients = AdsClients(
            args.port, ids, args.pools, credentials, args.protocol, args.per_connection
        )

    async def handle(self, command: str) -> dict[str, Any]:
        verb, *rest = command.split()
        cpu = time.process_time()
        clients = self.clients
        if verb == "connect":
            await clients.connect()
            return {}
        if verb == "start":
            await asyncio.sleep(max(0.0, float(rest[0]) - time.monotonic()))
            cpu = time.process_time()
            await clients.wait(clients.start())
        elif verb == "expect":
            clients.expect_next()
            return {}
        elif verb == "wait":
            await clients.wait(clients.arrivals)
        elif verb == "stop":
            await clients.stop_streams()
            return {}
        else:
            raise ValueError(f"unknown command {command!r}")
        arrivals = clients.arrivals
        return {"times": arrivals.times, "sizes": arrivals.sizes, "cpu": time.process_time() - cpu}


async def run_clients(args: argparse.Namespace) -> NoReturn:
    raise_fd_limit()
    role = ClientRole(args)
    print(json.dumps({"port": 0}), flush=True)
    await command_loop(role.handle)
    exit_without_goaway()


@dataclass(slots=True)
class Fleet:
    """A subject's clients, spread over client processes; what the parent sees of them."""

    workers: list[ServerProcess]
    count: int
    connected: bool = False

    @classmethod
    async def start(
        cls, stack: contextlib.AsyncExitStack, port: int, args: argparse.Namespace, *extra: str
    ) -> Fleet:
        """``args.processes`` client processes, streams shared out evenly."""
        workers = []
        share = -(-args.clients // args.processes)
        for first in range(0, args.clients, share):
            count = min(share, args.clients - first)
            worker = await ServerProcess.start(
                "clients",
                *("--port", str(port), "--first", str(first), "--count", str(count)),
                *("--pools", str(args.pools), "--protocol", args.protocol),
                *("--per-connection", str(args.per_connection), *extra),
            )
            stack.push_async_callback(worker.stop)
            workers.append(worker)
        return cls(workers, args.clients)

    async def everyone(self, command: str) -> dict[str, Any]:
        """The command in every client process at once; their answers merged."""
        answers = await asyncio.gather(
            *(worker.command(command, 2 * PHASE_TIMEOUT) for worker in self.workers)
        )
        return {
            "times": [t for a in answers for t in a.get("times", ())],
            "sizes": [n for a in answers for n in a.get("sizes", ())],
            "cpu": sum(a.get("cpu", 0.0) for a in answers),
        }


async def capture(
    server: ServerProcess, pools: int, into: Path, protocol: str = "sotw"
) -> dict[str, int]:
    """Record what our server sends one client: initial CDS and EDS, and one of each edit.

    The raw server replays exactly these bytes, so both fan out the same
    payloads. Returns their sizes.
    """
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = CALLS[protocol](channel, "bench-capture", eds_names_chunk(pools))
        captured = {"cds": await call.subscribe()}
        captured["eds"], header = await call.read(typeurls.ENDPOINT)
        for edit in EDITS:
            await call.ack_endpoints(header)
            await server.command(edit)
            captured[edit], header = await call.read(typeurls.ENDPOINT)
        call.call.cancel()
    for name, payload in captured.items():
        (into / f"{name}.bin").write_bytes(payload)
    return {name: len(payload) for name, payload in captured.items()}


# --- phases and report ---------------------------------------------------------------


def ms(seconds: float) -> float:
    return seconds * 1000.0


async def poll(
    server: ServerProcess, done: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The server's stats, polled until ``done(stats)`` or PHASE_TIMEOUT. Counting the
    streams in sync walks every stream, so the server is not asked too often."""
    deadline = time.monotonic() + PHASE_TIMEOUT
    while not done(answer := await server.command("stats")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {answer}")
        await asyncio.sleep(POLL_INTERVAL)
    return answer


async def wait_streams(server: ServerProcess, count: int) -> dict[str, Any]:
    """Stats once the server holds exactly ``count`` streams (the ended ones are gone)."""
    return await poll(server, lambda s: s["streams"] == count, f"waiting for {count} streams")


async def wait_ready(server: ServerProcess, count: int) -> dict[str, Any]:
    """Stats once ``count`` streams have ACKed: an edit sent before the ACK would wait for it."""
    return await poll(server, lambda s: s["ready"] >= count, f"waiting for {count} ACKs")


class Subject:
    """One server and its client fleet (in client processes of their own).

    Both subjects stay connected for the whole run and their edits alternate,
    so load from anything else on the machine falls on both alike.
    """

    def __init__(self, server: ServerProcess, fleet: Fleet) -> None:
        self.server = server
        self.fleet = fleet
        self.summary: dict[str, Any] = {}
        self.connect_ms = math.nan
        self.runs: dict[str, list[dict[str, float]]] = {phase: [] for phase in ("initial", *EDITS)}

    async def sync(self) -> None:
        """Initial sync of every client: the first one opens the connections and measures
        the server's memory before and after it; later ones end every stream first and
        open them all again on the same connections."""
        if self.fleet.connected:
            await self.fleet.everyone("stop")
            await wait_streams(self.server, 0)
        else:
            idle = await self.server.command("stats")
            connecting = time.monotonic()
            await self.fleet.everyone("connect")
            self.connect_ms = ms(time.monotonic() - connecting)
            self.fleet.connected = True
        before = await self.server.command("stats")
        start = time.monotonic() + START_LEAD
        arrivals = await self.fleet.everyone(f"start {start!r}")
        wall = max(arrivals["times"]) - start
        loaded = await wait_ready(self.server, self.fleet.count)
        self.runs["initial"].append(
            {
                "first_ms": ms(min(arrivals["times"]) - start),
                "last_ms": ms(wall),
                "server_cpu_ms": ms(loaded["cpu"] - before["cpu"]),
                "client_cpu_share": arrivals["cpu"] / wall,
            }
        )
        if not self.summary:
            self.summary = {
                "rss_idle_bytes": idle["rss"],
                "rss_loaded_bytes": loaded["rss"],
                "rss_per_stream_bytes": (loaded["rss"] - idle["rss"]) / self.fleet.count,
            }

    async def edit(self, edit: str) -> None:
        """One edit, timed from the server's clock reading to each client's arrival."""
        before = await self.server.command("stats")
        await self.fleet.everyone("expect")
        at = (await self.server.command(edit))["at"]
        arrivals = await self.fleet.everyone("wait")
        after = await wait_ready(self.server, self.fleet.count)
        first, last = min(arrivals["times"]), max(arrivals["times"])
        self.runs[edit].append(
            {
                "edit_to_first_ms": ms(first - at),
                "first_to_last_ms": ms(last - first),
                "edit_to_last_ms": ms(last - at),
                "bytes_per_client": statistics.median(arrivals["sizes"]),
                "server_cpu_ms": ms(after["cpu"] - before["cpu"]),
                "client_cpu_share": arrivals["cpu"] / (last - at),
            }
        )

    def result(self) -> dict[str, Any]:
        medians = {
            edit: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            for edit, runs in self.runs.items()
        }
        medians["initial"]["connect_ms"] = self.connect_ms
        return {**self.summary, **medians, "runs": self.runs}


async def run_protocol(args: argparse.Namespace, protocol: str) -> dict[str, Any]:
    """One protocol's run: capture our server's bytes, then measure it and the raw server side
    by side (with ``--tls`` both again over mTLS, all four connected at once, their edits
    alternating); every subject with client processes of its own."""
    out: dict[str, Any] = {}
    args = argparse.Namespace(**{**vars(args), "protocol": protocol})
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fanout-")))
        sizes = ("--pools", str(args.pools), "--endpoints", str(args.endpoints))

        async def start(role: str, *extra: str) -> ServerProcess:
            server = await ServerProcess.start(role, *extra)
            stack.push_async_callback(server.stop)
            return server

        async def subject(server: ServerProcess, *tls: str) -> Subject:
            return Subject(server, await Fleet.start(stack, server.port, args, *tls))

        ours = await start("server", *sizes)
        out["captured_bytes"] = await capture(ours, args.pools, tmp, protocol)
        raw = await start("raw", "--capture", str(tmp), "--protocol", protocol)
        subjects = {"ours": await subject(ours), "raw": await subject(raw)}
        if args.tls:
            pki = Pki.make(tmp / "pki")
            tls = ("--tls-dir", str(pki.directory))
            ours_tls = await start("server", *sizes, *tls)
            raw_tls = await start("raw", "--capture", str(tmp), "--protocol", protocol, *tls)
            subjects["ours-tls"] = await subject(ours_tls, *tls)
            subjects["raw-tls"] = await subject(raw_tls, *tls)
        for each in subjects.values():
            await each.sync()
        for _ in range((args.syncs or args.repeat) - 1):
            for each in subjects.values():
                await each.sync()
        for edit in EDITS:
            for _ in range(args.repeat):
                for each in subjects.values():
                    await each.edit(edit)
        out.update({name: each.result() for name, each in subjects.items()})
    out["targets"] = targets(out["ours"], out["raw"])
    if args.tls:
        out["tls_ratios"] = tls_ratios(out)
        out["targets"] += tls_targets(out["tls_ratios"])
    return out


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Each protocol in turn, with servers and client processes of its own."""
    out: dict[str, Any] = {
        "clients": args.clients,
        "client_processes": args.processes,
        "streams_per_connection": args.per_connection,
        "pools": args.pools,
        "endpoints": args.endpoints,
        "repeat": args.repeat,
        "syncs": args.syncs or args.repeat,
        "tls": args.tls,
        "cpus": os.cpu_count(),
        "fd_limit": raise_fd_limit(),
        "loadavg_before": os.getloadavg(),
    }
    for protocol in args.protocols:
        out[protocol] = await run_protocol(args, protocol)
        out[protocol]["loadavg_after"] = os.getloadavg()
    out["loadavg_after"] = os.getloadavg()
    return out


def targets(ours: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    checks = [
        check(
            f"server memory per stream <= {TARGET_RSS_PER_STREAM / 1000:g} KB",
            ours["rss_per_stream_bytes"] / 1000,
            TARGET_RSS_PER_STREAM / 1000,
            "KB",
        )
    ]
    for edit in EDITS:
        checks.append(
            check(
                f"{edit} first->last <= {TARGET_SPREAD_RATIO:g}x raw",
                ours[edit]["first_to_last_ms"],
                TARGET_SPREAD_RATIO * raw[edit]["first_to_last_ms"],
                "ms",
            )
        )
        checks.append(
            check(
                f"{edit} edit->first < {TARGET_EDIT_TO_FIRST_MS:g} ms",
                ours[edit]["edit_to_first_ms"],
                TARGET_EDIT_TO_FIRST_MS,
                "ms",
            )
        )
    return checks


def check(target: str, value: float, limit: float, unit: str) -> dict[str, Any]:
    return {"target": target, "value": value, "limit": limit, "unit": unit, "pass": value <= limit}


#: (phase, figure, label) compared TLS against plaintext; TLS_TARGETED are held to 1.3x.
TLS_FIGURES = (
    ("initial", "connect_ms", "connect (all channels ready)"),
    ("initial", "first_ms", "initial sync, first client"),
    ("initial", "last_ms", "initial sync, all clients"),
    ("initial", "server_cpu_ms", "initial sync, server CPU"),
    *(
        (edit, key, f"{edit}: {label}")
        for edit in EDITS
        for key, label in (
            ("edit_to_first_ms", "edit -> first client"),
            ("first_to_last_ms", "first -> last client"),
            ("edit_to_last_ms", "edit -> last client"),
            ("server_cpu_ms", "server CPU incl. ACKs"),
        )
    ),
)
TLS_TARGETED = (
    ("initial", "last_ms"),
    *((edit, "first_to_last_ms") for edit in EDITS),
)


def tls_ratios(out: dict[str, Any]) -> list[dict[str, Any]]:
    """TLS over plaintext for each figure, ours and raw, and ours' ratio over raw's: above 1
    when TLS costs us more (relatively) than it costs bare grpc.aio."""
    rows = []
    for phase, key, label in TLS_FIGURES:
        ours = _ratio(out["ours-tls"][phase][key], out["ours"][phase][key])
        raw = _ratio(out["raw-tls"][phase][key], out["raw"][phase][key])
        rows.append(
            {
                "phase": phase,
                "figure": key,
                "label": label,
                "ours": ours,
                "raw": raw,
                "ours_over_raw": _ratio(ours, raw),
            }
        )
    return rows


def tls_targets(ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        check(
            f"{row['label']}: TLS <= {TARGET_TLS_RATIO:g}x plaintext (ours)",
            row["ours"],
            TARGET_TLS_RATIO,
            "x",
        )
        for row in ratios
        if (row["phase"], row["figure"]) in TLS_TARGETED
    ]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(out: dict[str, Any]) -> str:
    lines = [
        f"fan-out: {out['clients']} ADS clients in {out['client_processes']} client processes "
        f"per server, {out['streams_per_connection']} stream(s) per connection, "
        f"{out['pools']} pools x {out['endpoints']} endpoints, median of {out['repeat']} runs "
        f"per edit and of initial syncs; {out['cpus']} CPUs, load average (1/5/15 min) "
        f"{_load(out['loadavg_before'])} before, {_load(out['loadavg_after'])} after",
    ]
    for protocol in PROTOCOLS:
        if protocol in out:
            lines += [f"--- {protocol} ---", *protocol_report(out[protocol], out["tls"])]
    return "\n".join(lines)


def _load(loadavg: list[float]) -> str:
    return "/".join(f"{load:.2f}" for load in loadavg)


def protocol_report(out: dict[str, Any], tls: bool) -> list[str]:
    lines = _table(out, "ours", "raw")
    if tls:
        lines += [
            "over mTLS (same run, same clients and edits):",
            *_table(out, "ours-tls", "raw-tls"),
        ]
        lines.append(f"{'TLS / plaintext':40} {'ours':>10} {'raw':>10} {'ours/raw':>9}")
        for row in out["tls_ratios"]:
            lines.append(
                f"{row['label']:40} {row['ours']:10.2f} {row['raw']:10.2f} "
                f"{row['ours_over_raw']:9.2f}"
            )
    names = TLS_SUBJECTS if tls else ("ours", "raw")
    for name in names:
        lasts = " ".join(f"{run['last_ms']:.0f}" for run in out[name]["runs"]["initial"])
        lines.append(f"initial sync, all clients, per run, {name} (ms): {lasts}")
    for edit in EDITS:
        for name in names:
            runs = out[name]["runs"][edit]
            spreads = " ".join(f"{run['first_to_last_ms']:.0f}" for run in runs)
            lines.append(f"{edit} first -> last per run, {name} (ms): {spreads}")
    lines.append(f"targets (load average after: {_load(out['loadavg_after'])}):")
    for each in out["targets"]:
        verdict = "PASS" if each["pass"] else "FAIL"
        unit = each["unit"] if each["unit"] == "x" else f" {each['unit']}"
        lines.append(
            f"  {verdict}  {each['target']}: {each['value']:.2f}{unit} "
            f"(limit {each['limit']:.2f}{unit})"
        )
    return lines


def _table(out: dict[str, Any], a: str, b: str) -> list[str]:
    """One server against another (ours against raw), figure by figure."""
    first, second = out[a], out[b]
    rows: list[tuple[str, float, float]] = [
        ("connect, all channels ready (ms)", *_pair(first, second, "initial", "connect_ms")),
        ("initial sync, first client (ms)", *_pair(first, second, "initial", "first_ms")),
        ("initial sync, all clients (ms)", *_pair(first, second, "initial", "last_ms")),
        ("initial sync, server CPU (ms)", *_pair(first, second, "initial", "server_cpu_ms")),
        ("initial sync, client CPU share", *_pair(first, second, "initial", "client_cpu_share")),
    ]
    for edit in EDITS:
        rows += [
            (f"{edit}: bytes per client", *_pair(first, second, edit, "bytes_per_client")),
            (f"{edit}: edit -> first client (ms)", *_pair(first, second, edit, "edit_to_first_ms")),
            (f"{edit}: first -> last client (ms)", *_pair(first, second, edit, "first_to_last_ms")),
            (f"{edit}: edit -> last client (ms)", *_pair(first, second, edit, "edit_to_last_ms")),
            (f"{edit}: server CPU incl. ACKs (ms)", *_pair(first, second, edit, "server_cpu_ms")),
            (f"{edit}: client CPU share", *_pair(first, second, edit, "client_cpu_share")),
        ]
    rows += [
        (
            "server RSS before streams (MiB)",
            first["rss_idle_bytes"] / MIB,
            second["rss_idle_bytes"] / MIB,
        ),
        (
            "server RSS with every stream (MiB)",
            first["rss_loaded_bytes"] / MIB,
            second["rss_loaded_bytes"] / MIB,
        ),
        (
            "server RSS per stream (KiB)",
            first["rss_per_stream_bytes"] / KIB,
            second["rss_per_stream_bytes"] / KIB,
        ),
    ]
    lines = [f"{'':40} {a:>10} {b:>10} {'ratio' if len(a) > 4 else f'{a}/{b}':>9}"]
    for label, mine, theirs in rows:
        ratio = f"{mine / theirs:9.2f}" if theirs else f"{'-':>9}"
        lines.append(f"{label:40} {mine:10.2f} {theirs:10.2f} {ratio}")
    return lines


def _pair(ours: dict[str, Any], raw: dict[str, Any], phase: str, key: str) -> tuple[float, float]:
    return ours[phase][key], raw[phase][key]


#: The copies of itself the benchmark starts: the control plane under test, the raw
#: baseline, and the client processes of each.
ROLES: dict[str, cli.Role] = {
    "server": lambda args: run_server(args.pools, args.endpoints, args.tls_dir),
    "raw": lambda args: run_raw(args.capture, args.tls_dir, args.protocol),
    "clients": run_clients,
}


def main() -> None:
    parser = cli.parser(__doc__, ROLES)
    parser.add_argument("--clients", type=int, default=1000, help="ADS streams (default 1000)")
    parser.add_argument(
        "--processes", type=int, default=4, help="client processes per server (default 4)"
    )
    parser.add_argument(
        "--per-connection",
        type=int,
        default=1,
        help="streams per client connection (default 1: one Envoy, one connection)",
    )
    parser.add_argument(
        "--protocols",
        nargs="+",
        choices=PROTOCOLS,
        default=list(PROTOCOLS),
        help="SotW, Delta or both, one after the other (default both)",
    )
    parser.add_argument("--pools", type=int, default=100, help="clusters (default 100)")
    parser.add_argument("--endpoints", type=int, default=20, help="per pool (default 20)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per edit (median)")
    parser.add_argument(
        "--syncs", type=int, help="initial syncs (median; default: as many as --repeat)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also measure both servers over mTLS in the same run, and the TLS/plaintext ratios",
    )
    parser.add_argument("--capture", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="sotw", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not cli.played_role(args, ROLES):
        out = asyncio.run(run_bench(args))
        cli.publish(report(out), out, args.json)


if __name__ == "__main__":
    main()
