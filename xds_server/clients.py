"""Who is connected, and where each client stands per resource type.

Operators need to see which clients are in sync, which version each ACKed and
which config each rejected (with the client's own error text): the protocol
code records those facts here, the admin API and metrics read them.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from xds_server import typeurls
from xds_server.cache import GroupSnapshot


@dataclass(slots=True)
class Nack:
    """A rejected response: which version, the client's error, and when."""

    version: str
    nonce: str
    message: str
    at: float


@dataclass(slots=True)
class TypeStatus:
    """One client's state for one resource type."""

    sent_version: str = ""
    sent_at: float = 0.0
    acked_version: str = ""
    acked_at: float = 0.0
    synced_version: str = ""  # snapshot version at which nothing was pending for this client
    last_nack: Nack | None = None
    responses: int = 0
    subscribed: list[str] | None = None  # None: wildcard


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
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeStatus] = field(default_factory=dict)

    def status(self, type_url: str) -> TypeStatus:
        found = self.types.get(type_url)
        if found is None:
            found = self.types[type_url] = TypeStatus()
        return found

    def in_sync(self, group: GroupSnapshot) -> bool:
        """Every type it asked for has been answered at the group's current version.

        Answered means ACKed, or NACKed and held back until the config changes, or
        nothing to send (an EDS change to clusters this client does not watch).
        """
        return all(
            status.synced_version == group.of_type(url).version
            for url, status in self.types.items()
        )

    def to_json(self, group: GroupSnapshot) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id,
            "id": self.node_id,
            "cluster": self.node_cluster,
            "group": self.group,
            "protocol": self.protocol,
            "service": self.service,
            "peer": self.peer,
            "user_agent": self.user_agent,
            "connected_at": self.connected_at,
            "in_sync": self.in_sync(group),
            "types": {
                typeurls.SHORT_NAMES.get(url, url): _status_json(status, group.of_type(url).version)
                for url, status in self.types.items()
            },
        }


def _status_json(status: TypeStatus, current: str) -> dict[str, Any]:
    nack = status.last_nack
    return {
        "current_version": current,
        "sent_version": status.sent_version,
        "acked_version": status.acked_version,
        "in_sync": status.synced_version == current,
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

    def open(self, protocol: str, service: str, peer: str = "") -> Client:
        client = Client(stream_id=next(self._ids), protocol=protocol, service=service, peer=peer)
        self._clients[client.stream_id] = client
        return client

    def close(self, client: Client) -> None:
        self._clients.pop(client.stream_id, None)

    def __iter__(self):
        return iter(list(self._clients.values()))

    def __len__(self) -> int:
        return len(self._clients)

    def by_node(self, node_id: str) -> list[Client]:
        return [c for c in self._clients.values() if c.node_id == node_id]
