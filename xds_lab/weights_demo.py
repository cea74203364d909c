"""`xds-lab demo`: watch the weights follow the load on a simulated GPU fleet.

Two fast and two slow simulated vLLM servers sit behind a real Envoy fed by the
control plane. Envoy asks them for ORCA, reports it over LRS, and the weight engine
pushes endpoint weights back over EDS. Open-loop traffic runs throughout; a third of
the way in one fast server is slowed down (a noisy neighbour on its GPU), two thirds
in it recovers. The live view shows, per server, its weight, the engine's state for
it, KV cache, queue and the share of requests it answered. `weighting="static"` runs the
same minute over plain round robin, for comparison.
"""

from __future__ import annotations

import asyncio
import collections
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings, one_pool_snapshot
from xds_lab.loadgen import OK, OpenLoopLoad, Outcome, percentile
from xds_lab.simulator.options import SimulatorConfig
from xds_lab.simulator.process import RemoteSimulator, SimulatorProcess

NODE_ID = "demo-envoy"
POOL = "llama"
#: Small KV caches, so that four servers saturate at a load one Python client can offer:
#: at saturation a fast one answers ~11 requests/s of this traffic, a slow one ~5
#: (closed loop, measured on the 2-core dev machine), ~32 for the fleet.
FAST = SimulatorConfig.profile("fast", max_num_seqs=64, kv_cache_tokens=4096)
SLOW = SimulatorConfig.profile("slow", max_num_seqs=64, kv_cache_tokens=2048)
FLEET_CAPACITY_RPS = 30.0
#: Responsive settings for a one-minute demo (the defaults suit production: 1 s, 10 s ...).
ORCA = {"blackout": 2.0, "push_interval": 0.5, "expiry": 10.0}
WINDOW_S = 5.0  # the share and latency columns cover this many seconds
NOISY_SLOWDOWN = 3.0
#: The pool's `weighting`: load-aware weights (the demo) or equal ones under round robin.
WEIGHTINGS = {"orca": "weights from ORCA", "static": "round robin (weighting: static)"}


@dataclass(slots=True)
class Server:
    label: str
    sim: RemoteSimulator

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.sim.port}"


@dataclass(slots=True)
class Phase:
    """A stretch of the run with one fleet condition, and what the clients saw in it."""

    title: str
    outcomes: list[Outcome] = field(default_factory=list)


class Tally:
    """Outcomes in the last WINDOW_S seconds (for the live view) and per phase (the summary)."""

    def __init__(self) -> None:
        self.recent: collections.deque[tuple[float, Outcome]] = collections.deque()
        self.phases: list[Phase] = []

    def add(self, outcome: Outcome) -> None:
        now = time.monotonic()
        self.recent.append((now, outcome))
        if self.phases:
            self.phases[-1].outcomes.append(outcome)

    def window(self) -> list[Outcome]:
        horizon = time.monotonic() - WINDOW_S
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        return [outcome for _, outcome in self.recent]


def shares(outcomes: list[Outcome], servers: list[Server]) -> dict[str, float]:
    answered = collections.Counter(o.upstream for o in outcomes if o.status == OK)
    total = sum(answered.values()) or 1
    return {s.label: answered[s.sim.name] / total for s in servers}


def _seconds(value: float) -> str:
    return f"{value:.2f}s" if math.isfinite(value) else "-"


def p50_p95(latencies: list[float]) -> tuple[str, str]:
    ordered = sorted(latencies)
    return _seconds(percentile(ordered, 50)), _seconds(percentile(ordered, 95))


class WeightsDemo:
    """One run: owns its temp dir, simulators, control plane, Envoy and load."""

    def __init__(
        self, workdir: Path, duration: float, load: float, out: TextIO, weighting: str = "orca"
    ) -> None:
        self.duration = duration
        self.weighting = weighting
        self.rate = load * FLEET_CAPACITY_RPS
        self.out = out
        self.live = out.isatty()
        self.servers: list[Server] = []
        # Each profile in its own process: simulated time must not queue behind our loop.
        self.fleets = [SimulatorProcess(FAST, count=2), SimulatorProcess(SLOW, count=2)]
        snapshot = workdir / "snapshot.yaml"
        self.rig = PlaneWithEnvoy(local_settings(snapshot, lrs_interval=0.5), workdir, NODE_ID)
        self.plane = self.rig.plane
        self.tally = Tally()
        self.listener_port = free_port()

    async def start(self) -> None:
        for fleet, kind in zip(self.fleets, ("fast", "slow"), strict=True):
            await fleet.start()
            for index, sim in enumerate(fleet.servers, 1):
                self.servers.append(Server(f"{kind}-{index}", sim))
        self.rig.settings.snapshot.write_text(yaml.safe_dump(self._snapshot(), sort_keys=False))
        await self.rig.start()

    def _snapshot(self) -> dict[str, Any]:
        endpoints = [
            {"address": "127.0.0.1", "port": s.sim.port, "zone": f"zone-{i % 2}"}
            for i, s in enumerate(self.servers)
        ]
        pool = {"name": POOL, "weighting": self.weighting, "orca": ORCA, "endpoints": endpoints}
        return one_pool_snapshot(self.listener_port, pool)

    async def stop(self) -> None:
        await self.rig.stop()
        for fleet in self.fleets:
            await fleet.stop()

    async def run(self) -> list[Phase]:
        """The scenario: steady, a fast server slowed, recovered; the view redrawn meanwhile."""
        noisy = self.servers[0]
        third = self.duration / 3
        steps: list[tuple[str, float]] = [  # title, slowdown of the noisy server
            ("steady load: fast and slow servers", 1.0),
            (
                f"{noisy.label} slowed {NOISY_SLOWDOWN:g}x (a noisy neighbour on its GPU)",
                NOISY_SLOWDOWN,
            ),
            (f"{noisy.label} recovered", 1.0),
        ]
        load = OpenLoopLoad(
            f"http://127.0.0.1:{self.listener_port}/v1/completions", self.rate, self.tally.add
        )
        traffic = asyncio.create_task(load.run(self.duration))
        started = time.monotonic()
        try:
            for title, slowdown in steps:
                await noisy.sim.update(slowdown=slowdown)
                self.tally.phases.append(Phase(title))
                phase_end = started + third * len(self.tally.phases)
                while time.monotonic() < phase_end:
                    await self.draw(time.monotonic() - started, title, load.in_flight)
                    await asyncio.sleep(
                        min(1.0 if self.live else 5.0, phase_end - time.monotonic())
                    )
            await self.draw(time.monotonic() - started, "load stopped, waiting for answers", 0)
            await traffic
        finally:
            traffic.cancel()
        return self.tally.phases

    async def draw(self, elapsed: float, phase: str, in_flight: int) -> None:
        """One frame: the fleet as the weight engine and the clients see it."""
        state = self.plane.engine.pools.get(POOL)
        published = self.plane.publisher.weights.get(POOL)
        explain = state.latest.explain if state is not None and state.latest else {}
        sims = await asyncio.gather(*(server.sim.state() for server in self.servers))
        window = self.tally.window()
        share = shares(window, self.servers)
        latencies = [o.latency for o in window if o.status == OK]
        errors = sum(1 for o in window if o.status != OK)
        p50, p95 = p50_p95(latencies)
        lines = [
            f"t={elapsed:5.1f}s  {phase}",
            f"offered {self.rate:.1f} req/s (~{self.rate / FLEET_CAPACITY_RPS:.0%} of the fleet)"
            f"  answered {len(latencies) / WINDOW_S:.1f}/s  in flight {in_flight}"
            f"  p50 {p50}  p95 {p95}"
            f"  errors {errors}",
            "",
            f"  {'server':<7} {'endpoint':<16} {'weight':>6} {'state':<9} {'KV':>5} {'queue':>5}"
            f" {'running':>7}  share of the last {WINDOW_S:g} s",
        ]
        for server, sim in zip(self.servers, sims, strict=True):
            why = explain.get(server.key, {})
            weight = published.endpoints.get(server.key, "-") if published else "-"
            bar = "#" * round(30 * share[server.label])
            lines.append(
                f"  {server.label:<7} {server.key:<16} {weight:>6} {why.get('state', '-')!s:<9}"
                f" {sim.kv_cache_usage:>5.0%} {sim.waiting:>5} {sim.running:>7}"
                f"  {share[server.label]:>4.0%} {bar}"
            )
        frame = "\n".join(lines)
        if self.live:
            self.out.write("\x1b[H\x1b[J" + frame + "\n")
        else:
            self.out.write(frame + "\n\n")
        self.out.flush()


def summary(phases: list[Phase], servers: list[Server], weighting: str = "orca") -> str:
    """Per phase: where the requests went and how long they took."""
    labels = [s.label for s in servers]
    head = (
        f"{'phase':<52} " + " ".join(f"{label:>7}" for label in labels) + "     p50     p95  errors"
    )
    title = f"{WEIGHTINGS[weighting]}: share of answered requests per server, latency per phase:"
    lines = [title, head]
    for phase in phases:
        share = shares(phase.outcomes, servers)
        latencies = [o.latency for o in phase.outcomes if o.status == OK]
        errors = sum(1 for o in phase.outcomes if o.status != OK)
        p50, p95 = p50_p95(latencies)
        lines.append(
            f"{phase.title[:52]:<52} "
            + " ".join(f"{share[label]:>7.0%}" for label in labels)
            + f" {p50:>7} {p95:>7}"
            + f" {errors:>7}"
        )
    return "\n".join(lines)


async def run_weights_demo(
    duration: float = 60.0, load: float = 0.5, out: TextIO = sys.stdout, weighting: str = "orca"
) -> int:
    """Raises EnvoyNotFound when the envoy binary is missing; ValueError on an unknown
    `weighting` (WEIGHTINGS)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    with tempfile.TemporaryDirectory(prefix="xds-demo-") as workdir:
        demo = WeightsDemo(Path(workdir), duration, load, out, weighting)
        try:
            out.write("starting 4 simulated model servers, the control plane and a real Envoy\n")
            await demo.start()
            phases = await demo.run()
            out.write("\n" + summary(phases, demo.servers, weighting) + "\n")
            return 0
        finally:
            await demo.stop()
