"""Per-client limits on the gRPC port: who may open a stream, how many, how fast, how big.

One misbehaving or compromised client (or a reconnect storm of the whole fleet) must not
take the control plane from everyone else. Every stream, xDS or LRS, passes `admit`:
concurrent streams are bounded in total and per peer (the certificate identity with mTLS,
else the client's IP address), and new streams are admitted at a steady rate from a token
bucket, waiting their turn up to `admission_wait` seconds; a reconnect storm's streams
are spread out instead of all being served at once. (TLS handshakes happen per connection,
before any stream exists, so they are not paced: measured, ~0.5 ms of server CPU each,
bench/reconnect.py.) A client over a limit gets RESOURCE_EXHAUSTED
with what to do, the refusal is logged and counted by reason, and nobody else notices.

Message sizes are bounded per service by the services themselves (`max_xds_request_bytes`,
`max_lrs_request_bytes`; xDS requests are small, LRS reports carry a whole node), and
connections are recycled after `max_connection_age` (gRPC adds ±10 % jitter itself) so
that Envoys spread over replicas as they come and go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import unquote

import grpc

from lrs.load_reporting_service import MAX_REPORT_BYTES
from xds_server.tls import peer_identities

__all__ = ["Admission", "ClientLimits", "Peer", "Refused", "peer_address"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Every limit has a default that a fleet of thousands of Envoys stays well inside."""

    #: Open streams of all clients together (xDS and LRS).
    max_streams: int = 20_000
    #: Open streams of one peer (an Envoy opens one ADS and one LRS stream).
    max_streams_per_peer: int = 100
    #: Resource names one subscription may name (an Envoy names its clusters for EDS).
    max_names_per_subscription: int = 10_000
    #: New streams admitted per second in steady state, and the burst admitted at once.
    admission_rate: float = 500.0
    admission_burst: int = 100
    #: Seconds a new stream may wait for admission before it is refused.
    admission_wait: float = 20.0
    #: Largest xDS request (DiscoveryRequest / DeltaDiscoveryRequest) accepted.
    max_xds_request_bytes: int = 1024 * 1024
    #: Largest LRS report accepted (the load reporting service's own default).
    max_lrs_request_bytes: int = MAX_REPORT_BYTES
    #: Seconds before a connection is asked to reconnect (±10 % jitter), and the grace its
    #: open streams get to finish; 0 disables.
    max_connection_age: float = 1800.0
    max_connection_age_grace: float = 60.0

    def grpc_options(self) -> tuple[tuple[str, int], ...]:
        """Server options for the connection age (applied by gRPC with jitter)."""
        if self.max_connection_age <= 0:
            return ()
        return (
            ("grpc.max_connection_age_ms", round(self.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", round(self.max_connection_age_grace * 1000)),
        )


class Refused(Exception):
    """A stream refused by a limit; `reason` labels the metric, the message tells the client."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def peer_address(peer: str) -> str:
    """The IP of a gRPC peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`; gRPC
    percent-encodes the brackets: `ipv6:%5B::1%5D:5000`)."""
    kind, _, rest = peer.partition(":")
    rest = unquote(rest)
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].partition("]")[0]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


@dataclass(frozen=True, slots=True)
class Peer:
    """A client as admitted: `key` is its first certificate identity with mTLS, else its IP."""

    key: str
    identities: tuple[str, ...] | None


class Admission:
    """Counts open streams per peer and paces new ones; shared by every service on the port.

    `mutual`: the port requires client certificates, so peers are keyed by identity."""

    def __init__(self, limits: ClientLimits | None = None, mutual: bool = False) -> None:
        self.limits = limits or ClientLimits()
        self.mutual = mutual
        #: Set when the replica shuts down: new streams are sent to another replica.
        self.closed = False
        self.open: Counter[str] = Counter()
        self.refused: Counter[tuple[str, str]] = Counter()  # (service, reason) -> count
        self.admitted = 0
        self.waited = 0.0  # seconds new streams spent waiting for admission, summed
        self._tokens = float(self.limits.admission_burst)
        self._refilled = time.monotonic()

    @property
    def open_streams(self) -> int:
        return sum(self.open.values())

    def refuse(self, service: str, reason: str, message: str, peer: str) -> Refused:
        """Count and log a refusal; the caller aborts the call with the returned error."""
        self.refused[(service, reason)] += 1
        log.warning("refused a %s stream from %s (%s): %s", service, peer, reason, message)
        return Refused(reason, message)

    @asynccontextmanager
    async def stream(self, service: str, peer: str) -> AsyncIterator[None]:
        """Hold a stream slot for `peer` while the body runs; raises Refused when over a limit."""
        limits = self.limits
        if self.open_streams >= limits.max_streams:
            raise self.refuse(
                service,
                "streams_total",
                f"the server holds its maximum of {limits.max_streams} streams; retry later "
                "or connect to another replica",
                peer,
            )
        if self.open[peer] >= limits.max_streams_per_peer:
            raise self.refuse(
                service,
                "streams_per_peer",
                f"{peer} already holds {limits.max_streams_per_peer} streams, the most one "
                "client may hold; close unused streams",
                peer,
            )
        self.open[peer] += 1
        try:
            await self._pace(service, peer)
            self.admitted += 1
            yield
        finally:
            self.open[peer] -= 1
            if self.open[peer] <= 0:
                del self.open[peer]

    async def _pace(self, service: str, peer: str) -> None:
        """Reserve the next admission slot (first come, first served) and wait for it."""
        delay = self._reserve()
        if delay is None:
            raise self.refuse(
                service,
                "admission_wait",
                f"not admitted within {self.limits.admission_wait:g} s: too many clients are "
                "connecting at once; retry with back-off",
                peer,
            )
        self.waited += delay
        if delay > 0:
            await asyncio.sleep(delay)

    def _reserve(self) -> float | None:
        """Take a token from the bucket, going into debt: the seconds until the debt is paid
        are this stream's wait. None (nothing taken) when that is over `admission_wait`."""
        now = time.monotonic()
        limits = self.limits
        self._tokens = min(
            float(limits.admission_burst),
            self._tokens + (now - self._refilled) * limits.admission_rate,
        )
        self._refilled = now
        delay = max(0.0, (1.0 - self._tokens) / limits.admission_rate)
        if delay > limits.admission_wait:
            return None
        self._tokens -= 1.0
        return delay

    @asynccontextmanager
    async def gate(self, service: str, context: grpc.aio.ServicerContext) -> AsyncIterator[Peer]:
        """Admit a call or end it with RESOURCE_EXHAUSTED; yields who the client is."""
        if self.closed:
            self.refused[(service, "shutting_down")] += 1
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "this control plane is shutting down; reconnect to another replica",
            )
        identities = peer_identities(context) if self.mutual else None
        address = peer_address(context.peer())
        key = identities[0] if identities else address
        try:
            async with self.stream(service, key):
                yield Peer(key, identities)
                return
        except Refused as refused:
            error = refused
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
