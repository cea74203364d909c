"""Body routing across a control-plane restart: what fails with the router in the control plane,
and what fails with the router in a process of its own beside Envoy.

One real Envoy 1.40 stays up throughout; its one listener routes by body (ext_proc) to a pool
of simulated model servers (a child process). An open-loop stream of OpenAI completions, each
naming its model in the JSON body, half of them streamed (150 output tokens at the median),
runs through Envoy while the control plane restarts: SIGTERM (a drain of --drain seconds, then
stop) and a new one on the same xDS, admin and router ports with the same snapshot. Around the
restart, probes (one short routed request every 5 ms) time the failure window. Two cases, each
with a fresh Envoy and plane:

  in-process  the router is the control plane's own (`serve --router-port`): it goes down
              and comes back with the plane;
  standalone  the snapshot says `body_router: {address: 127.0.0.1, port: P}` and
              `xds-server body-router` runs as its own process on P; only the plane restarts.

Figures per case: the requests in flight when the stop began (sent before, answered after)
and how many of them failed; the requests and probes sent from then on, how many failed, why,
and the failure window (first to last failed request, by when each was sent); the restart's
timeline (old plane gone, new one ready, Envoy's ADS stream back and in sync).

`--plane process` (default) restarts a real `xds-server serve` child process, so the router's
downtime includes the old process's exit and the new one's start. `--plane objects` restarts
`ControlPlane` objects in this process (`shutdown()`, then a new one; what the test does): the
router is down for milliseconds, and the probes, on the same event loop, hardly see it.

The figures go to bench/results/router_restart.json too (--json: elsewhere).

    .venv/bin/python bench/router_restart.py                  # ~25 s on 2 cores
    .venv/bin/python bench/router_restart.py --repeats 3      # each case three times, ~75 s
    .venv/bin/python bench/router_restart.py --plane objects
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cli
from xds_lab.envoy_process import EnvoyProcess
from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings, node_in_sync
from xds_lab.loadgen import ERROR, OK, Mix, OpenLoopLoad, Outcome, Request, RequestMix, body
from xds_lab.simulator.options import SimulatorConfig
from xds_lab.simulator.process import SimulatorProcess
from xds_server.app import ControlPlane, Settings
from xds_server.bootstrap import envoy_bootstrap

MODEL = "llama-3-8b"
POOL = "llama"
NODE = "bench-router-restart"
CASES = ("in-process", "standalone")
RESULTS = Path(__file__).resolve().parent / "results"
#: Bound on waiting for a process, Envoy or a reconnect, so a broken run fails, not hangs.
START_TIMEOUT = 30.0
POLL = 0.005
#: Probes run from this many seconds before the stop until as long after Envoy is in sync.
PROBE_LEAD = 0.5
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Load:
    """The traffic: `rate` requests/s for `seconds`, the restart `restart_at` seconds in."""

    rate: float = 20.0
    seconds: float = 8.0
    restart_at: float = 3.0
    stream_share: float = 0.5
    output_tokens: int = 150  # median; at ~10 ms a token, 1.5 s a generation
    drain: float = 1.0  # the old plane's drain period (`serve --drain-period`; default 8 s)
    probe_interval: float = 0.005  # s between probes, from PROBE_LEAD before the restart
    seed: int = 1

    def mix(self) -> Mix:
        lengths = RequestMix(
            prompt_tokens=100, output_tokens=self.output_tokens, spread=0.4, max_output_tokens=400
        )
        return Mix(lengths=lengths, stream_share=self.stream_share)


#: The defaults, for the command line.
DEFAULT = Load()


def snapshot(listener_port: int, servers: list[int], router_port: int | None) -> dict[str, Any]:
    """One body-routing listener to one pool; `router_port`: a standalone router's."""
    doc: dict[str, Any] = {
        "listeners": [
            {
                "name": "inference",
                "address": "127.0.0.1",
                "port": listener_port,
                "routes": [{"model": MODEL, "pool": POOL}],
            }
        ],
        "pools": [
            {"name": POOL, "endpoints": [{"address": "127.0.0.1", "port": p} for p in servers]}
        ],
    }
    if router_port is not None:
        doc["body_router"] = {"address": "127.0.0.1", "port": router_port}
    return doc


@dataclass(slots=True)
class Timeline:
    """`time.monotonic()` of each step of a restart."""

    began: float = math.nan  # stop asked (SIGTERM)
    stopped: float = math.nan  # the old plane is gone (its router's port closed)
    serving: float = math.nan  # the new plane answers (its router's port open)
    envoy_back: float = math.nan  # Envoy's ADS stream connected again
    in_sync: float = math.nan  # ... and Envoy has ACKed the new plane's config (objects only)


class ObjectPlane:
    """`ControlPlane` objects in this process, with the Envoy (`PlaneWithEnvoy`)."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.rig = PlaneWithEnvoy(settings, workdir, NODE, lrs=False)

    @property
    def envoy(self) -> EnvoyProcess:
        assert self.rig.envoy is not None
        return self.rig.envoy

    async def start(self) -> None:
        await self.rig.start()

    async def stop(self) -> None:
        await self.rig.stop()

    async def restart(self, timeline: Timeline, drain: float) -> None:
        timeline.began = time.monotonic()
        await self.rig.plane.shutdown(drain)  # what SIGTERM does: drain, then stop()
        timeline.stopped = time.monotonic()
        self.rig.plane = ControlPlane(self.settings)
        await self.rig.plane.start()
        timeline.serving = time.monotonic()

    def in_sync(self) -> bool:
        return node_in_sync(self.rig.plane, NODE)


class ProcessPlane:
    """`xds-server serve` as a child process, and the Envoy as another (a child of this
    process, which outlives every plane: Envoy exits with its parent)."""

    def __init__(self, settings: Settings, workdir: Path, drain: float) -> None:
        self.settings = settings
        self.workdir = workdir
        self.drain = drain
        self.process: asyncio.subprocess.Process | None = None
        self.envoy = EnvoyProcess(
            envoy_bootstrap(NODE, xds_port=settings.xds_port, envoy_admin_port=0, lrs=False),
            workdir / "envoy",
        )

    async def _spawn(self) -> None:
        s = self.settings
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds_server.cli", "--log-level", "warning", "serve",
            "--snapshot", str(s.snapshot), "--xds-port", str(s.xds_port),
            "--admin-port", str(s.admin_port), "--router-port", str(s.router_port),
            "--drain-period", str(self.drain),
        )  # fmt: skip
        url = f"http://127.0.0.1:{s.admin_port}/readyz"
        async with aiohttp.ClientSession() as session:
            await until(lambda: _answers(session, url), "xds-server serve", self.process)

    async def _terminate(self) -> None:
        process, self.process = self.process, None
        await terminate(process, self.drain + 10.0)

    async def start(self) -> None:
        await self._spawn()
        await self.envoy.start()
        await self.envoy.wait_ready(START_TIMEOUT)

    async def stop(self) -> None:
        await self.envoy.stop()
        await self._terminate()

    async def restart(self, timeline: Timeline, drain: float) -> None:
        timeline.began = time.monotonic()
        await self._terminate()  # SIGTERM: drain, then stop
        timeline.stopped = time.monotonic()
        await self._spawn()
        timeline.serving = time.monotonic()

    def in_sync(self) -> bool:
        return True  # from outside, connected is all there is to see


async def terminate(process: asyncio.subprocess.Process | None, timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds."""
    if process is not None and process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def until(
    check: Callable[[], Awaitable[bool]],
    what: str,
    process: asyncio.subprocess.Process | None = None,
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not await check():
        if process is not None and process.returncode is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL)


class StandaloneProcess:
    """`xds-server body-router` as a child process, on `port`."""

    def __init__(self, snapshot: Path, port: int) -> None:
        self.snapshot = snapshot
        self.port = port
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds_server.cli", "--log-level", "warning", "body-router",
            "--snapshot", str(self.snapshot), "--port", str(self.port),
        )  # fmt: skip

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await until(listening, "xds-server body-router", self.process)

    async def stop(self) -> None:
        await terminate(self.process, 10.0)


async def envoy_connected(envoy: EnvoyProcess) -> bool:
    name = "control_plane.connected_state"
    return (await envoy.stats(filter=f"^{name}$")).get(name, 0) == 1


async def routed(url: str) -> bool:
    """One non-streaming request through Envoy answered 200 (body routing works)."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=body) as resp:
                await resp.read()
                return resp.status == 200
    except aiohttp.ClientError:
        return False


async def probe(
    url: str, interval: float, outcomes: list[Outcome], reasons: Counter[str], done: asyncio.Event
) -> None:
    """One short body-routed request (1 output token, not streaming) every `interval` s,
    whatever became of the last, until `done`: the failure window to within `interval`.
    Why each failed goes to `reasons` (status and Envoy's details)."""
    request = Request(0.0, prompt_tokens=10, max_tokens=1, stream=False)
    payload = body(request, MODEL)
    tasks: set[asyncio.Task[None]] = set()

    async def one(session: aiohttp.ClientSession) -> None:
        outcome = Outcome(request, sent=time.monotonic(), lag=0.0)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                async with session.post(url, json=payload) as resp:
                    text = await resp.text()
            outcome.finished = time.monotonic()
            outcome.status = OK if resp.status == 200 else ERROR
            if resp.status != 200:
                reasons[f"{resp.status} {text[:60]}"] += 1
        except TimeoutError:
            reasons["timeout"] += 1
        except aiohttp.ClientError as err:
            outcome.status, outcome.finished = ERROR, time.monotonic()
            reasons[type(err).__name__] += 1
        outcomes.append(outcome)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        next_at = time.monotonic()
        while not done.is_set():
            task = asyncio.create_task(one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.wait(tasks, timeout=PROBE_TIMEOUT + 1)


@dataclass(slots=True)
class Failures:
    """Requests sent after the stop began: how many, how many failed and when (seconds
    after the stop began, by when each was sent)."""

    sent: int
    failed: int
    first: float | None
    last: float | None
    window: float | None  # first to last failure
    after_serving: int  # failed although sent once the new plane was serving

    @classmethod
    def of(cls, outcomes: list[Outcome], t: Timeline) -> Failures:
        new = [o for o in outcomes if o.sent >= t.began]
        failed = sorted(o.sent - t.began for o in new if o.status != OK)
        first, last = (failed[0], failed[-1]) if failed else (None, None)
        window = last - first if first is not None and last is not None else None
        late = sum(f >= t.serving - t.began for f in failed)
        return cls(len(new), len(failed), first, last, window, late)


@dataclass(slots=True)
class CaseResult:
    case: str
    plane: str
    timeline: dict[str, float]  # seconds after the stop began
    sent: int  # by the load (probes apart)
    in_flight: int  # sent before the stop began, answered after it
    in_flight_failed: int
    spanning: int  # of those, answered after the new plane was serving
    spanning_streams: int
    failed_before: int  # sent and failed before the stop: a broken setup, not the restart
    new: Failures  # the load's requests sent after the stop began
    probes: Failures  # the probes sent after the stop began
    all_new: Failures  # both
    probe_failures: dict[str, int]  # why probes failed: status and the start of the answer


def classify(
    case: str,
    plane: str,
    load: list[Outcome],
    probes: list[Outcome],
    t: Timeline,
    reasons: Counter[str] | None = None,
) -> CaseResult:
    before = [o for o in load if o.sent < t.began]
    in_flight = [o for o in before if o.finished >= t.began]
    spanning = [o for o in in_flight if o.finished >= t.serving]
    timeline = {
        name: value - t.began
        for name, value in asdict(t).items()
        if name != "began" and not math.isnan(value)
    }
    return CaseResult(
        case=case,
        plane=plane,
        timeline=timeline,
        sent=len(load),
        in_flight=len(in_flight),
        in_flight_failed=sum(o.status != OK for o in in_flight),
        spanning=len(spanning),
        spanning_streams=sum(o.request.stream for o in spanning),
        failed_before=sum(o.status != OK for o in [*before, *probes] if o.sent < t.began),
        new=Failures.of(load, t),
        probes=Failures.of(probes, t),
        all_new=Failures.of([*load, *probes], t),
        probe_failures=dict(reasons or {}),
    )


async def measure(
    case: str, servers: list[int], load: Load, workdir: Path, plane_kind: str = "objects"
) -> CaseResult:
    """One case: a fresh plane (+ standalone router) and Envoy, the load, one restart."""
    listener, router = free_port(), free_port()
    standalone_port = free_port() if case == "standalone" else None
    path = workdir / f"{case}.yaml"
    path.write_text(yaml.safe_dump(snapshot(listener, servers, standalone_port), sort_keys=False))
    settings = local_settings(
        path, xds_port=free_port(), admin_port=free_port(), router_port=router
    )
    standalone = StandaloneProcess(path, standalone_port) if standalone_port else None
    plane: ObjectPlane | ProcessPlane = (
        ObjectPlane(settings, workdir / case)
        if plane_kind == "objects"
        else ProcessPlane(settings, workdir / case, load.drain)
    )
    url = f"http://127.0.0.1:{listener}/v1/completions"
    outcomes: list[Outcome] = []
    probes: list[Outcome] = []
    probes_done = asyncio.Event()
    reasons: Counter[str] = Counter()
    timeline = Timeline()
    tasks: list[asyncio.Task[None]] = []
    try:
        if standalone is not None:
            await standalone.start()
        await plane.start()
        await until(lambda: routed(url), "the first routed request")
        traffic = OpenLoopLoad(
            url, load.rate, outcomes.append, load.mix(), MODEL, timeout=30.0, seed=load.seed
        )
        running = asyncio.create_task(traffic.run(load.seconds))
        tasks.append(running)
        await asyncio.sleep(max(0.0, load.restart_at - PROBE_LEAD))
        probing = asyncio.create_task(probe(url, load.probe_interval, probes, reasons, probes_done))
        tasks.append(probing)
        await asyncio.sleep(min(PROBE_LEAD, load.restart_at))
        await plane.restart(timeline, load.drain)
        await until(lambda: envoy_connected(plane.envoy), "Envoy's ADS stream")
        timeline.envoy_back = time.monotonic()

        async def synced() -> bool:
            return plane.in_sync()

        await until(synced, "Envoy in sync with the new plane")
        timeline.in_sync = time.monotonic()
        await asyncio.sleep(PROBE_LEAD)
        probes_done.set()
        await probing
        await running
    finally:
        for task in tasks:  # left running only when something failed
            task.cancel()
        await plane.stop()
        if standalone is not None:
            await standalone.stop()
    return classify(case, plane_kind, outcomes, probes, timeline, reasons)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(
        rate=args.rate,
        seconds=args.seconds,
        restart_at=args.restart_at,
        stream_share=args.stream_share,
        output_tokens=args.output_tokens,
        drain=args.drain,
        probe_interval=args.probe_interval,
    )
    config = SimulatorConfig(model=MODEL)
    results: list[CaseResult] = []
    loadavg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-router-restart-") as tmp:
        async with SimulatorProcess(config, count=args.servers) as fleet:
            servers = [s.port for s in fleet.servers]
            for repeat in range(args.repeats):
                order = CASES if repeat % 2 == 0 else tuple(reversed(CASES))
                for case in order:
                    workdir = Path(tmp) / f"{repeat}"
                    workdir.mkdir(exist_ok=True)
                    results.append(await measure(case, servers, load, workdir, args.plane))
    return {
        "load": asdict(load),
        "plane": args.plane,
        "servers": args.servers,
        "load_average_before": loadavg,
        "runs": [asdict(r) for r in results],
        "summary": summary(results),
    }


def summary(results: list[CaseResult]) -> dict[str, Any]:
    """Per case, over its runs: totals, and the median and largest failure window."""
    out: dict[str, Any] = {}
    for case in CASES:
        runs = [r for r in results if r.case == case]
        if not runs:
            continue
        windows = [r.all_new.window or 0.0 for r in runs]
        out[case] = {
            "runs": len(runs),
            "in_flight": sum(r.in_flight for r in runs),
            "in_flight_failed": sum(r.in_flight_failed for r in runs),
            "new": sum(r.all_new.sent for r in runs),
            "new_failed": sum(r.all_new.failed for r in runs),
            "failed_after_serving": sum(r.all_new.after_serving for r in runs),
            "failure_window_median": statistics.median(windows),
            "failure_window_max": max(windows),
            "envoy_back_median": statistics.median(r.timeline["envoy_back"] for r in runs),
        }
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:,.0f}"


def report(out: dict[str, Any]) -> str:
    load = out["load"]
    lines = [
        f"load: {load['rate']:g} requests/s for {load['seconds']:g} s, "
        f"{load['stream_share']:.0%} streaming, median {load['output_tokens']} output tokens; "
        f"probes: one every {load['probe_interval'] * 1e3:g} ms around the restart; "
        f"restart {load['restart_at']:g} s in (plane: {out['plane']}, drain period "
        f"{load['drain']:g} s); load average before: {out['load_average_before']:.2f}",
        "",
        "| router | in flight at the stop: failed / all (of them streams across the restart) "
        "| new requests: failed / all | probes: failed / all | failure window ms "
        "(first, last) | old plane gone ms | new serving | Envoy's ADS back | in sync |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["runs"]:
        t, new, probes, both = r["timeline"], r["new"], r["probes"], r["all_new"]
        lines.append(
            f"| {r['case']} | {r['in_flight_failed']} / {r['in_flight']} "
            f"({r['spanning_streams']}) | {new['failed']} / {new['sent']} | "
            f"{probes['failed']} / {probes['sent']} | {_ms(both['window'])} "
            f"({_ms(both['first'])}, {_ms(both['last'])}) | {_ms(t['stopped'])} | "
            f"{_ms(t['serving'])} | {_ms(t['envoy_back'])} | {_ms(t['in_sync'])} |"
        )
    lines += [
        "",
        "Times in ms after the stop began; a failure's time is when it was sent. In flight: "
        "sent before the stop began, answered after it.",
    ]
    for case, row in out["summary"].items():
        lines.append(
            f"{case}: {row['runs']} run(s): in flight failed {row['in_flight_failed']} of "
            f"{row['in_flight']}; new failed {row['new_failed']} of {row['new']} "
            f"({row['failed_after_serving']} sent after the new plane served); failure window "
            f"median {_ms(row['failure_window_median'])} ms, max {_ms(row['failure_window_max'])}"
            f" ms; Envoy's ADS back after {_ms(row['envoy_back_median'])} ms (median)"
        )
    for r in out["runs"]:
        for reason, count in sorted(r["probe_failures"].items(), key=lambda x: -x[1]):
            lines.append(f"{r['case']}: {count} probe(s) failed with: {reason}")
        if r["failed_before"]:
            lines.append(f"WARNING: {r['case']}: {r['failed_before']} failed before the restart")
    return "\n".join(lines)


def main() -> None:
    parser = cli.parser(__doc__)
    parser.set_defaults(json=RESULTS / "router_restart.json")
    parser.add_argument("--plane", choices=("process", "objects"), default="process")
    parser.add_argument("--rate", type=float, default=DEFAULT.rate, help="requests/s")
    parser.add_argument("--seconds", type=float, default=DEFAULT.seconds, help="of load per case")
    parser.add_argument("--restart-at", type=float, default=DEFAULT.restart_at, help="s into it")
    parser.add_argument("--stream-share", type=float, default=DEFAULT.stream_share)
    parser.add_argument("--output-tokens", type=int, default=DEFAULT.output_tokens, help="median")
    parser.add_argument(
        "--drain", type=float, default=DEFAULT.drain, help="the old plane's drain period, s"
    )
    parser.add_argument(
        "--probe-interval", type=float, default=DEFAULT.probe_interval, help="seconds"
    )
    parser.add_argument("--servers", type=int, default=2, help="simulated model servers")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each case, alternating")
    args = parser.parse_args()
    out = asyncio.run(run(args))
    cli.publish(report(out), out, args.json)


if __name__ == "__main__":
    main()
