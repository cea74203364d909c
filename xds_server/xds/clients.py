"""Who is connected, and where each client stands per resource type.

Operators need to see which clients are in sync, which version each ACKed and
which config each rejected (with the client's own error text): the protocol
code records those facts here, the admin API and metrics read them.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from xds_server.xds import typeurls
from xds_server.xds.cache import GroupResources

__all__ = ["Client", "ClientObserver", "ClientRegistry", "Nack", "TypeStatus", "sync_state"]


@dataclass(slots=True)
class Nack:
    """A rejected response: which version, the client's error, and when."""

    version: str
    nonce: str
    message: str
    at: float


class ClientObserver(Protocol):
    """Hears each protocol event as it is recorded (metrics); runs on the loop: be quick.

    event is "response" (one sent), "ack" or "nack"; type_url says of which type.
    """

    def __call__(self, event: str, client: Client, type_url: str) -> None: ...


def _unobserved(_event: str) -> None:
    pass


@dataclass(slots=True)
class TypeStatus:
    """One client's state for one resource type.

    The protocol code records by assigning: `responses += 1` for a response sent,
    `acked_version = ...` for an ACK, `last_nack = Nack(...)` for a NACK. Those three
    are properties that also report the event, so observers (metrics) hear of it
    while sotw.py and delta.py know nothing of them.
    """

    sent_version: str = ""
    sent_at: float = 0.0
    acked_at: float = 0.0
    synced_version: str = ""  # cache version at which nothing was pending for this client
    subscribed: list[str] | None = None  # None: wildcard
    _responses: int = 0
    _acked_version: str = ""
    _last_nack: Nack | None = None
    _report: Callable[[str], None] = _unobserved

    @property
    def responses(self) -> int:
        return self._responses

    @responses.setter
    def responses(self, count: int) -> None:
        self._responses = count
        self._report("response")

    @property
    def acked_version(self) -> str:
        return self._acked_version

    @acked_version.setter
    def acked_version(self, version: str) -> None:
        self._acked_version = version
        self._report("ack")

    @property
    def last_nack(self) -> Nack | None:
        return self._last_nack

    @last_nack.setter
    def last_nack(self, nack: Nack | None) -> None:
        self._last_nack = nack
        self._report("nack")


@dataclass(slots=True)
class Client:
    """One xDS stream from one node."""

    stream_id: int
    protocol: str  # "sotw" | "delta"
    service: str  # "ads" or the type's short name for per-type streams
    node_id: str = ""
    node_cluster: str = ""
    group: str = ""
    peer: str = ""
    user_agent: str = ""
    #: The verified certificate identities with mTLS (SPIFFE ID first); None without.
    identities: tuple[str, ...] | None = None
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeStatus] = field(default_factory=dict)
    observers: Sequence[ClientObserver] = ()

    def status(self, type_url: str) -> TypeStatus:
        found = self.types.get(type_url)
        if found is None:
            found = self.types[type_url] = TypeStatus(_report=self._reporter(type_url))
        return found

    def _reporter(self, type_url: str) -> Callable[[str], None]:
        if not self.observers:
            return _unobserved

        def report(event: str) -> None:
            for observer in self.observers:
                observer(event, self, type_url)

        return report

    def in_sync(self, group: GroupResources) -> bool:
        """Every type it asked for has been answered at the group's current version.

        Answered means ACKed, or NACKed and held back until the config changes, or
        nothing to send (an EDS change to clusters this client does not watch).
        """
        return all(
            status.synced_version == group.of_type(url).version
            for url, status in self.types.items()
        )

    def to_json(self, group: GroupResources) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id,
            "id": self.node_id,
            "cluster": self.node_cluster,
            "group": self.group,
            "protocol": self.protocol,
            "service": self.service,
            "peer": self.peer,
            "user_agent": self.user_agent,
            "identities": None if self.identities is None else list(self.identities),
            "connected_at": self.connected_at,
            "in_sync": self.in_sync(group),
            "types": {
                typeurls.SHORT_NAMES.get(url, url): _status_json(status, group.of_type(url).version)
                for url, status in self.types.items()
            },
        }


def sync_state(status: TypeStatus, current: str) -> str:
    """in_sync: answered at the current version; rejected: the latest answer was a NACK (the
    client keeps its previous config); pending: a newer version is not ACKed yet."""
    nack = status.last_nack
    if nack is not None and nack.at >= status.acked_at:
        return "rejected"
    return "in_sync" if status.synced_version == current else "pending"


def _status_json(status: TypeStatus, current: str) -> dict[str, Any]:
    nack = status.last_nack
    return {
        "current_version": current,
        "sent_version": status.sent_version,
        "acked_version": status.acked_version,
        "in_sync": status.synced_version == current,
        "state": sync_state(status, current),
        "responses": status.responses,
        "subscribed": status.subscribed,
        "last_nack": None
        if nack is None
        else {"version": nack.version, "nonce": nack.nonce, "error": nack.message, "at": nack.at},
    }


class ClientRegistry:
    """The connected clients, keyed by stream."""

    def __init__(self) -> None:
        self._clients: dict[int, Client] = {}
        self._ids = itertools.count(1)
        #: Told of every response, ACK and NACK of every client opened after they were added.
        self.observers: list[ClientObserver] = []
        #: Streams refused after they opened (a certificate claiming another group, a
        #: limit), by reason; the latest ones in full for the admin API.
        self.refused: Counter[str] = Counter()
        self.recent_refusals: deque[dict[str, Any]] = deque(maxlen=100)

    def open(
        self,
        protocol: str,
        service: str,
        peer: str = "",
        identities: tuple[str, ...] | None = None,
    ) -> Client:
        client = Client(
            stream_id=next(self._ids),
            protocol=protocol,
            service=service,
            peer=peer,
            identities=identities,
            observers=tuple(self.observers),
        )
        self._clients[client.stream_id] = client
        return client

    def close(self, client: Client) -> None:
        self._clients.pop(client.stream_id, None)

    def refuse(self, client: Client, reason: str, message: str) -> None:
        """Record why a client's stream is ended (the stream aborts it)."""
        self.refused[reason] += 1
        self.recent_refusals.append(
            {
                "at": time.time(),
                "reason": reason,
                "message": message,
                "node_id": client.node_id,
                "node_cluster": client.node_cluster,
                "peer": client.peer,
                "identities": list(client.identities or ()),
            }
        )

    def __iter__(self) -> Iterator[Client]:
        return iter(list(self._clients.values()))

    def __len__(self) -> int:
        return len(self._clients)

    def by_node(self, node_id: str) -> list[Client]:
        return [c for c in self._clients.values() if c.node_id == node_id]
