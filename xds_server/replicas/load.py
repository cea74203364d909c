"""Fleet-wide load: each replica publishes its merged LRS windows, and reads the others'.

A replica only hears the Envoys connected to it. At every report interval it writes what
its store merged (per load-weighted pool and endpoint: rates, in-flight level, metric
means, reporters; never raw reports) under its own key with a TTL of three intervals,
and reads the other live replicas' windows. `loads(pool, now)` is then the fleet's:
its own windows merged with the others' (`EndpointLoad.merge`). A replica that stops
publishing drops out when its key expires; while Redis is unreachable the others'
windows age out the same way and each replica falls back to what it hears itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict

from lrs.weights.signals import EndpointLoad
from xds_server.replicas.link import RedisLink, SharedStoreError

__all__ = ["SharedLoad"]

log = logging.getLogger(__name__)

Windows = dict[str, dict[str, EndpointLoad]]


class SharedLoad:
    """`loads(pool, now)`: the fleet's load; `run()` publishes and reads every interval."""

    def __init__(
        self,
        link: RedisLink,
        local: Callable[[str, float], Mapping[str, EndpointLoad]],
        pools: Callable[[], Iterable[str]],
        interval: float,
    ) -> None:
        self.link = link
        self.local = local
        self.pools = pools
        self.interval = interval
        self.others: Windows = {}  # pool -> endpoint -> the other replicas' load, merged
        self.others_at = 0.0  # monotonic time they were read
        self.replicas = 1  # live replicas publishing load, this one included
        self.bytes_written = 0
        self.bytes_read = 0

    def loads(self, pool: str, now: float) -> dict[str, EndpointLoad]:
        mine = dict(self.local(pool, now))
        if now - self.others_at > 3 * self.interval:
            return mine  # the others' windows are too old to stand for the fleet
        for key, theirs in self.others.get(pool, {}).items():
            own = mine.get(key)
            mine[key] = theirs if own is None else EndpointLoad.merge((own, theirs))
        return mine

    async def run(self) -> None:
        while True:
            try:
                await self.exchange()
            except SharedStoreError:
                pass  # logged by the link; the own windows keep serving
            await asyncio.sleep(self.interval)

    async def exchange(self) -> None:
        """Publish this replica's windows and read the other live replicas'."""
        now = time.monotonic()
        windows = {pool: self.local(pool, now) for pool in self.pools()}
        # Encoding and decoding thousands of windows takes tens of milliseconds: in a
        # thread, the loop that serves xDS and LRS gets the interpreter every few ms.
        data = await asyncio.to_thread(_encode, windows)
        client, link = self.link.client, self.link
        live = link.key("replicas")
        ttl_ms = int(3 * self.interval * 1000)
        wall = time.time()

        async def write() -> list[bytes]:
            pipe = client.pipeline(transaction=False)
            pipe.set(link.key("load", link.replica_id), data, px=ttl_ms)
            pipe.zadd(live, {link.replica_id: wall})
            pipe.zremrangebyscore(live, "-inf", wall - 3 * self.interval)
            pipe.zrange(live, 0, -1)
            *_, members = await pipe.execute()
            return list(members)

        members = await link.call("publish load", write)
        self.bytes_written += len(data)
        others = [m.decode() for m in members if m.decode() != link.replica_id]
        self.replicas = len(others) + 1
        blobs = await link.call(
            "read load",
            lambda: client.mget([link.key("load", r) for r in others]) if others else _nothing(),
        )
        present = [blob for blob in blobs if blob is not None]
        self.bytes_read += sum(map(len, present))
        self.others = await asyncio.to_thread(_decode, present)
        self.others_at = time.monotonic()


async def _nothing() -> list[bytes | None]:
    return []


def _encode(windows: Mapping[str, Mapping[str, EndpointLoad]]) -> str:
    mine = {
        pool: {key: asdict(load) for key, load in loads.items()} for pool, loads in windows.items()
    }
    return json.dumps(mine, separators=(",", ":"))


def _decode(blobs: list[bytes]) -> Windows:
    """The other replicas' windows, merged per endpoint; an unreadable one is skipped."""
    merged: dict[str, dict[str, list[EndpointLoad]]] = {}
    for blob in blobs:
        try:
            for pool, endpoints in json.loads(blob).items():
                for key, load in endpoints.items():
                    merged.setdefault(pool, {}).setdefault(key, []).append(EndpointLoad(**load))
        except (ValueError, TypeError) as err:
            log.error("unreadable load window of another replica: %s", err)
    return {
        pool: {key: EndpointLoad.merge(parts) for key, parts in endpoints.items()}
        for pool, endpoints in merged.items()
    }
