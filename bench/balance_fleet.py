"""The balancing benchmark's fleet: simulated vLLM servers of three GPU classes in this process,
each logging what it was like when a request reached it, and the checks between strategies
(idle, or restarted) and the capacity measurement the loads are fractions of.

Three classes, so that no one signal ranks the servers:
  fast   the simulator's `fast` profile
  slow   its `slow` profile: half the speed and half the KV cache
  small  its `small` profile: 80 % of fast's speed and a quarter of its KV cache (raised to hold
         the mix's largest request): it runs out of KV cache, and preempts, long before its
         batch is full
KV caches are scaled down by one factor (`kv_fast` for a fast server) so the fleet saturates
at request rates this 2-core machine generates.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.balance_load import LengthMix
from xds_lab.loadgen import OK, Outcome, Request, send
from xds_lab.simulator.model_server import ModelServer
from xds_lab.simulator.options import BLOCK_TOKENS, PROFILES, SimulatorConfig
from xds_lab.simulator.sequence import blocks_for

__all__ = [
    "MODEL",
    "SATURATED_KV",
    "Admission",
    "CountingServer",
    "ServerClass",
    "ensure_idle",
    "fleet_configs",
    "measure_capacity",
    "parse_fleet",
]

MODEL = "llama-3-8b"
#: KV-cache use above which a server counts as saturated when a request reaches it.
SATURATED_KV = 0.95


@dataclass(frozen=True, slots=True)
class ServerClass:
    name: str  # fast, slow, small
    count: int


@dataclass(frozen=True, slots=True)
class Admission:
    at: float  # time.monotonic()
    server: str
    saturated: bool  # KV cache above SATURATED_KV
    queued: bool  # no free batch slot: it waits behind others


class CountingServer(ModelServer):
    """A simulated server that logs each request's arrival with its own state at that moment:
    what the server knew when the balancer's choice reached it."""

    def __init__(self, config: SimulatorConfig, name: str, log: list[Admission]) -> None:
        super().__init__(config, name=name)
        self._log = log

    async def _generate(self, request: Any, api: Any) -> Any:
        state = self.state
        busy = state.waiting > 0 or state.running >= self.config.max_num_seqs
        self._log.append(
            Admission(time.monotonic(), self.name, state.kv_cache_usage > SATURATED_KV, busy)
        )
        return await super()._generate(request, api)


def parse_fleet(text: str) -> tuple[ServerClass, ...]:
    """`fast:3,slow:3,small:2` -> server classes (ValueError on anything else)."""
    classes = []
    for item in text.split(","):
        name, _, count = item.partition(":")
        if name not in ("fast", "slow", "small") or not count.isdigit() or int(count) < 1:
            raise ValueError(f"expected CLASS:COUNT with CLASS fast, slow or small, not {item!r}")
        classes.append(ServerClass(name, int(count)))
    return tuple(classes)


def _class_config(name: str, kv_fast: int, **overrides: Any) -> SimulatorConfig:
    """A class's config: its profile's speeds, its KV cache scaled down like the fast one's,
    and the cost per KV token scaled up by as much, so a full cache costs a step what it
    does at full size (the simulator's rule for a scaled cache)."""
    values = PROFILES[name]
    scale = PROFILES["fast"]["kv_cache_tokens"] / kv_fast
    return SimulatorConfig.profile(
        name,
        kv_cache_tokens=round(values["kv_cache_tokens"] / scale),
        decode_step_per_kv_token_s=values["decode_step_per_kv_token_s"] * scale,
        **overrides,
    )


def fleet_configs(
    classes: tuple[ServerClass, ...],
    kv_fast: int,
    batch: int,
    mix: LengthMix,
    max_waiting: int = 0,
) -> list[tuple[str, SimulatorConfig]]:
    """(name, config) per server, e.g. fast-0, fast-1, slow-0 ...; `max_waiting` bounds each
    queue (503 beyond it), 0 leaves it unbounded as vLLM's is. Every server must hold the
    mix's largest request (prompt + answer + one block), or the class's KV cache is raised."""
    prompt, output = mix.largest
    needed = (blocks_for(prompt + output - 1) + 1) * BLOCK_TOKENS
    bound = {"max_waiting": max_waiting} if max_waiting else {}
    configs = []
    for server_class in classes:
        config = _class_config(server_class.name, kv_fast, model=MODEL, max_num_seqs=batch, **bound)
        if config.kv_cache_tokens < needed:
            config = config.with_overrides({"kv_cache_tokens": needed})
        for index in range(server_class.count):
            configs.append((f"{server_class.name}-{index}", config))
    return configs


def _busy(servers: list[CountingServer]) -> list[CountingServer]:
    return [s for s in servers if s.state.running or s.state.waiting or s.state.used_blocks]


async def ensure_idle(servers: list[CountingServer], timeout: float = 15.0) -> dict[str, Any]:
    """Wait until no server runs, queues or holds KV cache; a server still busy after
    `timeout` s is restarted on its port (its requests end with 503). What happened is
    returned for the record: a strategy must not start on a fleet still working off the
    last one's queue."""
    started = time.monotonic()
    for _ in range(round(timeout / 0.1)):
        if not _busy(servers):
            break
        await asyncio.sleep(0.1)
    busy = _busy(servers)
    record: dict[str, Any] = {
        "idle": not busy,
        "waited_s": round(time.monotonic() - started, 2),
        "restarted": {
            s.name: {"running": s.state.running, "waiting": s.state.waiting} for s in busy
        },
    }
    for server in busy:
        port = server.port
        await server.stop()
        await server.start("127.0.0.1", port)
    if busy:
        record["idle_after_restart"] = not _busy(servers)
    return record


async def measure_capacity(
    servers: list[CountingServer], mix: LengthMix, seconds: float, seed: int
) -> dict[str, Any]:
    """Each server's full-batch throughput, all at once and straight (no Envoy): a closed loop
    of twice its batch size per server; completed requests/s over `seconds` after a warm-up."""
    rng = random.Random(seed)
    counts = {s.name: 0 for s in servers}
    tokens = {s.name: 0 for s in servers}
    warm = 2.0
    start = time.monotonic()
    stop_at = start + warm + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(server: CountingServer) -> None:
            url = f"{server.url}/v1/completions"
            while time.monotonic() < stop_at:
                request = Request(0.0, *mix.draw(rng))
                outcome = Outcome(request, sent=time.monotonic(), lag=0.0)
                await send(session, url, outcome, MODEL, stop_at - time.monotonic() + 5)
                if outcome.status == OK and start + warm <= outcome.finished < stop_at:
                    counts[server.name] += 1
                    tokens[server.name] += outcome.output_tokens

        workers = [client(s) for s in servers for _ in range(2 * s.config.max_num_seqs)]
        await asyncio.gather(*workers)
    per_server = {name: round(count / seconds, 2) for name, count in counts.items()}
    return {
        "rps": sum(per_server.values()),
        "output_tps": sum(tokens.values()) / seconds,
        "per_server_rps": per_server,
    }
