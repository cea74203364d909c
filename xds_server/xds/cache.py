"""Versioned resource cache: the only thing the protocol side and the config side share.

Each resource is serialized once per content version, and the bytes that go on
the wire for it (a one-resource SotW ``DiscoveryResponse`` and a one-resource
``DeltaDiscoveryResponse``) are built once too. Protobuf merges concatenated
messages, so a response to any client is the join of those pre-encoded chunks
plus a small per-stream header (version, nonce); no stream re-encodes a resource.

Versions are content hashes, so a restarted server agrees with what clients
already have, and an edit that leaves a resource alone does not re-send it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from xds_server.xds import typeurls

__all__ = [
    "EMPTY_GROUP",
    "EMPTY_TYPE",
    "GroupMessages",
    "GroupResources",
    "Resource",
    "ResourceCache",
    "Subscriber",
    "TypeResources",
    "content_version",
    "join_chunks",
]

#: group name -> type URL -> resource name -> message
GroupMessages = Mapping[str, Mapping[str, Mapping[str, Message]]]


def content_version(data: bytes) -> str:
    """A short, stable content hash used as resource and type versions."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Resource:
    """One serialized resource and its pre-encoded wire chunks."""

    type_url: str
    name: str
    version: str
    body: bytes
    sotw_chunk: bytes
    delta_chunk: bytes

    @classmethod
    def encode(cls, type_url: str, name: str, body: bytes) -> Resource:
        version = content_version(body)
        packed = any_pb2.Any(type_url=type_url, value=body)
        sotw = discovery_pb2.DiscoveryResponse(resources=[packed])
        delta = discovery_pb2.DeltaDiscoveryResponse(
            resources=[discovery_pb2.Resource(name=name, version=version, resource=packed)]
        )
        return cls(
            type_url=type_url,
            name=name,
            version=version,
            body=body,
            sotw_chunk=sotw.SerializeToString(),
            delta_chunk=delta.SerializeToString(),
        )


@dataclass(frozen=True, slots=True)
class TypeResources:
    """All resources of one type for one node group, with a version over all of them.

    `versions` (name -> version of each) is what a SotW client of the whole set holds
    once it has ACKed it: one dict that every such stream shares instead of a copy each.
    """

    resources: Mapping[str, Resource]
    version: str
    versions: Mapping[str, str]

    @classmethod
    def of(cls, resources: Mapping[str, Resource]) -> TypeResources:
        digest = hashlib.blake2b(digest_size=8)
        for name in sorted(resources):
            digest.update(name.encode())
            digest.update(b"\0")
            digest.update(resources[name].version.encode())
            digest.update(b"\0")
        versions = {name: resource.version for name, resource in resources.items()}
        return cls(resources=dict(resources), version=digest.hexdigest(), versions=versions)


EMPTY_TYPE = TypeResources.of({})


@dataclass(frozen=True, slots=True)
class GroupResources:
    """The four resource types served to one node group."""

    name: str
    types: Mapping[str, TypeResources]
    #: With mTLS, the certificate identities that may be served this group (globs; empty: any).
    identities: tuple[str, ...] = ()

    def of_type(self, type_url: str) -> TypeResources:
        return self.types.get(type_url, EMPTY_TYPE)


EMPTY_GROUP = GroupResources(name="", types={})


class Subscriber:
    """What a stream gives the cache so it can be woken up on a change."""

    def notify(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(slots=True)
class ResourceCache:
    """Current resources per node group, and the streams to wake when they change.

    Streams pull: on a change the cache only wakes them, and each works out what
    its own client lacks. A wake-up that finds nothing new costs a version
    comparison per type, so waking every stream on every change is cheap and
    keeps the cache free of per-client state.
    """

    resolver: Callable[[str], str] = lambda _node_cluster: "default"
    groups: dict[str, GroupResources] = field(default_factory=dict)
    generation: int = 0
    updated_at: float = 0.0
    _subscribers: set[Subscriber] = field(default_factory=set)

    def group_for(self, node_cluster: str) -> GroupResources:
        return self.groups.get(self.resolver(node_cluster), EMPTY_GROUP)

    def set_all(
        self,
        messages: GroupMessages,
        resolver: Callable[[str], str],
        identities: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        """Replace every group at once; unchanged resources keep their encoded bytes.
        `identities`: group -> the certificate identities it may be served to (mTLS)."""
        bound = identities or {}
        self.groups = {
            group: self._encode_group(group, types, bound.get(group, ()))
            for group, types in messages.items()
        }
        self.resolver = resolver
        self._changed()

    def update_resources(self, group: str, type_url: str, changes: Mapping[str, Message]) -> None:
        """Replace some resources of one type in one group (the weight path)."""
        current = self.groups.get(group, GroupResources(name=group, types={}))
        resources = dict(current.of_type(type_url).resources)
        resources.update(self._encode(type_url, changes, resources))
        types = dict(current.types)
        types[type_url] = TypeResources.of(resources)
        self.groups = {
            **self.groups,
            group: GroupResources(name=group, types=types, identities=current.identities),
        }
        self._changed()

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.add(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def subscribers(self) -> list[Subscriber]:
        """The streams subscribed now (a copy)."""
        return list(self._subscribers)

    def _changed(self) -> None:
        self.generation += 1
        self.updated_at = time.monotonic()
        for subscriber in self._subscribers:
            subscriber.notify()

    def _encode_group(
        self, group: str, types: Mapping[str, Mapping[str, Message]], identities: tuple[str, ...]
    ) -> GroupResources:
        previous = self.groups.get(group, EMPTY_GROUP)
        encoded = {}
        for type_url in typeurls.ORDER:
            known = previous.of_type(type_url).resources
            encoded[type_url] = TypeResources.of(
                self._encode(type_url, types.get(type_url, {}), known)
            )
        return GroupResources(name=group, types=encoded, identities=identities)

    @staticmethod
    def _encode(
        type_url: str, messages: Mapping[str, Message], known: Mapping[str, Resource]
    ) -> dict[str, Resource]:
        """Encode messages, reusing the already-encoded resource when the bytes are the same."""
        out: dict[str, Resource] = {}
        for name, message in messages.items():
            body = message.SerializeToString(deterministic=True)
            old = known.get(name)
            out[name] = (
                old
                if old is not None and old.body == body
                else Resource.encode(type_url, name, body)
            )
        return out


def join_chunks(chunks: Iterable[bytes], header: Message) -> bytes:
    """A whole response: pre-encoded resource chunks merged with a per-stream header."""
    return b"".join((*chunks, header.SerializeToString()))
