"""Edit to Envoy: how long a snapshot file edit and an admin API change take to reach a real
Envoy, at 100 pools x 20 endpoints (2,000 endpoints; issue 14, target 100 ms).

One real Envoy 1.40 (xds_lab.envoy_rig.PlaneWithEnvoy: the control plane in this process,
SotW ADS) follows a snapshot file with one listener routing by model to 100 pools of 20
endpoints each (the endpoints need not exist: no traffic is sent). Then, one at a time and
with a random 0.25-0.45 s pause between them (so the edits fall at random points of any
periodic work):

  rename    one endpoint's weight changes in the file, written to a temporary file in the same
            folder and renamed over the snapshot (what kubectl, Ansible and most editors do);
  in-place  the same, the file truncated and written again in place (open 'w', one write);
  drain     POST /api/v1/pools/{pool}/endpoints/{endpoint}/drain on the admin API, then an
            undrain of it the next time (both counted): the API's debounce (admin_debounce,
            50 ms by default) is part of the figure, and what the plane adds on top of it is
            shown too.

For each change the clock starts right before the write (or the POST) and the figures are:

  published  the resource cache holds the change (the EDS resource of that pool, new version);
  ACKed      the Envoy's ADS stream has ACKed it (the plane's client registry, checked every
             millisecond on the event loop): Envoy applies a config before it ACKs it;
  in Envoy   Envoy's own admin says so: /config_dump (dynamic_endpoint_configs of that cluster,
             include_eds) shows the new weight, or the host no longer (or again) healthy;
             polled from the ACK on, so this one includes an admin round trip.

Medians and p90 per kind, against the 100 ms target; the JSON (default
bench/results/edit_latency.json) has every sample.

    .venv/bin/python bench/edit_latency.py                    # 20 of each, ~25 s
    .venv/bin/python bench/edit_latency.py --edits 5 --json /tmp/quick.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cli
from xds_lab.envoy_rig import PlaneWithEnvoy, free_port, local_settings, node_in_sync
from xds_server.app import ControlPlane
from xds_server.xds import typeurls

NODE = "edit-latency"
TOKEN = "edit-latency-bench-token-" + "x" * 16
TARGET_MS = 100.0
#: How Envoy's EDS dump shows a host it balances to (a drained one shows as UNHEALTHY: the
#: dump gives the host's computed health, not the DRAINING it was sent).
SERVING = (None, "UNKNOWN", "HEALTHY")
RESULTS = Path(__file__).resolve().parent / "results" / "edit_latency.json"


def pool_name(pool: int) -> str:
    return f"pool-{pool:03d}"


def address(pool: int, endpoint: int) -> str:
    return f"10.{pool // 250}.{pool % 250}.{endpoint + 1}"


@dataclass
class Fleet:
    """The snapshot as a user keeps it: one weight per endpoint, written out whole."""

    pools: int
    endpoints: int
    listener_port: int
    weights: dict[tuple[int, int], int] = field(default_factory=dict)

    def text(self) -> str:
        lines = [
            "listeners:",
            "  - name: inference",
            "    address: 127.0.0.1",
            f"    port: {self.listener_port}",
            "    body_routing: false",
            "    routes:",
        ]
        for p in range(self.pools):
            lines += [f"      - model: {pool_name(p)}", f"        pool: {pool_name(p)}"]
        lines.append("pools:")
        for p in range(self.pools):
            lines += [f"  - name: {pool_name(p)}", "    lb_policy: least_request", "    endpoints:"]
            for e in range(self.endpoints):
                weight = self.weights.get((p, e), 1)
                zone = f"zone-{'ab'[e % 2]}"
                lines.append(
                    f"      - {{address: {address(p, e)}, port: 8000, zone: {zone}, "
                    f"weight: {weight}}}"
                )
        return "\n".join(lines) + "\n"


def write_renamed(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_in_place(path: Path, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


@dataclass
class Sample:
    published: float | None = None
    acked: float | None = None
    in_envoy: float | None = None


def eds_version(plane: ControlPlane, pool: str) -> str | None:
    resource = plane.cache.groups["default"].of_type(typeurls.ENDPOINT).resources.get(pool)
    return resource.version if resource is not None else None


async def wait_acked(plane: ControlPlane, pool: str, before: str | None, t0: float) -> Sample:
    """Times (ms from t0) when the pool's EDS version moved, and when the Envoy ACKed it."""
    sample = Sample()
    deadline = t0 + 10.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if sample.published is None and eds_version(plane, pool) != before:
            sample.published = (now - t0) * 1000
        if sample.published is not None and node_in_sync(plane, NODE):
            sample.acked = (now - t0) * 1000
            return sample
        await asyncio.sleep(0.001)
    raise TimeoutError(f"{pool}: not ACKed within 10 s")


async def envoy_endpoint(
    session: aiohttp.ClientSession, admin_url: str, pool: str, host: str
) -> dict[str, Any] | None:
    """The endpoint as Envoy holds it: its lb_endpoint in the cluster's EDS config."""
    params = {
        "resource": "dynamic_endpoint_configs",
        "include_eds": "",
        "name_regex": f"^{pool}$",
    }
    async with session.get(f"{admin_url}/config_dump", params=params) as resp:
        dump = await resp.json(content_type=None)
    for config in dump.get("configs", []):
        assignment = config.get("endpoint_config", {})
        if assignment.get("cluster_name") != pool:
            continue
        for locality in assignment.get("endpoints", []):
            for entry in locality.get("lb_endpoints", []):
                socket = entry["endpoint"]["address"]["socket_address"]
                if socket["address"] == host:
                    found: dict[str, Any] = entry
                    return found
    return None


async def wait_envoy(
    session: aiohttp.ClientSession,
    admin_url: str,
    pool: str,
    host: str,
    holds: Any,
    t0: float,
) -> float:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        entry = await envoy_endpoint(session, admin_url, pool, host)
        if entry is not None and holds(entry):
            return (time.monotonic() - t0) * 1000
        await asyncio.sleep(0.002)
    raise TimeoutError(f"{pool} {host}: Envoy does not hold the change within 10 s")


def summary(samples: list[Sample]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(samples)}
    for what in ("published", "acked", "in_envoy"):
        values = sorted(v for s in samples if (v := getattr(s, what)) is not None)
        if not values:
            continue
        p90 = values[min(len(values) - 1, max(0, round(0.9 * len(values)) - 1))]
        out[what] = {
            "median_ms": round(statistics.median(values), 1),
            "p90_ms": round(p90, 1),
            "max_ms": round(values[-1], 1),
            "samples_ms": [round(v, 2) for v in values],
        }
    return out


async def file_edits(
    pair: PlaneWithEnvoy,
    session: aiohttp.ClientSession,
    fleet: Fleet,
    path: Path,
    write: Any,
    edits: int,
    rng: random.Random,
) -> list[Sample]:
    assert pair.envoy is not None
    samples = []
    for _ in range(edits):
        await asyncio.sleep(rng.uniform(0.25, 0.45))
        p, e = rng.randrange(fleet.pools), rng.randrange(fleet.endpoints)
        weight = rng.choice([w for w in range(2, 100) if w != fleet.weights.get((p, e), 1)])
        fleet.weights[(p, e)] = weight
        text = fleet.text()
        pool = pool_name(p)
        before = eds_version(pair.plane, pool)
        t0 = time.monotonic()
        write(path, text)
        sample = await wait_acked(pair.plane, pool, before, t0)
        sample.in_envoy = await wait_envoy(
            session,
            pair.envoy.admin_url,
            pool,
            address(p, e),
            lambda entry, w=weight: entry.get("load_balancing_weight") == w,
            t0,
        )
        samples.append(sample)
    return samples


async def api_changes(
    pair: PlaneWithEnvoy,
    session: aiohttp.ClientSession,
    fleet: Fleet,
    changes: int,
    rng: random.Random,
) -> list[Sample]:
    assert pair.envoy is not None
    samples = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    base = f"http://127.0.0.1:{pair.plane.admin_port}/api/v1/pools"
    drained: tuple[int, int] | None = None
    for _ in range(changes):
        await asyncio.sleep(rng.uniform(0.25, 0.45))
        if drained is None:
            p, e = rng.randrange(fleet.pools), rng.randrange(fleet.endpoints)
            action, serving = "drain", False
        else:
            (p, e), action, serving = drained, "undrain", True
        pool = pool_name(p)
        before = eds_version(pair.plane, pool)
        t0 = time.monotonic()
        url = f"{base}/{pool}/endpoints/{address(p, e)}:8000/{action}"
        async with session.post(url, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        sample = await wait_acked(pair.plane, pool, before, t0)
        sample.in_envoy = await wait_envoy(
            session,
            pair.envoy.admin_url,
            pool,
            address(p, e),
            lambda entry, x=serving: (entry.get("health_status") in SERVING) == x,
            t0,
        )
        samples.append(sample)
        drained = (p, e) if drained is None else None
    return samples


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edit-latency-") as tmp:
        folder = Path(tmp)
        fleet = Fleet(args.pools, args.endpoints, free_port())
        path = folder / "snapshot.yaml"
        path.write_text(fleet.text())
        token = folder / "token"
        token.write_text(TOKEN)
        settings = local_settings(path, admin_token_file=token)
        started = time.monotonic()
        async with PlaneWithEnvoy(settings, folder / "envoy", NODE) as pair:
            print(
                f"plane and Envoy in sync in {time.monotonic() - started:.1f} s; "
                f"{args.edits} changes of each kind",
                file=sys.stderr,
            )
            async with aiohttp.ClientSession() as session:
                kinds = {
                    "rename": await file_edits(
                        pair, session, fleet, path, write_renamed, args.edits, rng
                    ),
                    "in-place": await file_edits(
                        pair, session, fleet, path, write_in_place, args.edits, rng
                    ),
                    "drain": await api_changes(pair, session, fleet, args.edits, rng),
                }
            rejected = pair.rejections()
            reloads = pair.plane.source.reloads
            failures = pair.plane.source.failures
    return {
        "pools": args.pools,
        "endpoints_per_pool": args.endpoints,
        "target_ms": TARGET_MS,
        "admin_debounce_ms": settings.admin_debounce * 1000,
        "kinds": {kind: summary(samples) for kind, samples in kinds.items()},
        "reloads": reloads,
        "refused_reloads": failures,
        "envoy_rejections": rejected,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def report(figures: dict[str, Any]) -> str:
    lines = [
        f"{figures['pools']} pools x {figures['endpoints_per_pool']} endpoints, one Envoy; "
        f"ms from the write (or POST), median / p90 / max",
        f"{'change':<10}{'published':>22}{'ACKed by Envoy':>24}{'in Envoy admin':>24}  target",
    ]
    for kind, figure in figures["kinds"].items():
        cells = []
        for what in ("published", "acked", "in_envoy"):
            f = figure.get(what)
            cells.append(
                f"{f['median_ms']:>7.1f} {f['p90_ms']:>7.1f} {f['max_ms']:>7.1f}" if f else "-"
            )
        acked = figure["acked"]["p90_ms"]
        budget = TARGET_MS + (figures["admin_debounce_ms"] if kind == "drain" else 0)
        verdict = "MET" if acked <= budget else "MISSED"
        lines.append(
            f"{kind:<10}{cells[0]:>22}{cells[1]:>24}{cells[2]:>24}  "
            f"p90 ACK <= {budget:.0f} ms: {verdict}"
        )
    drain = figures["kinds"]["drain"]["acked"]["median_ms"]
    lines.append(
        f"drain: median {drain - figures['admin_debounce_ms']:.1f} ms over the "
        f"{figures['admin_debounce_ms']:.0f} ms debounce"
    )
    lines.append(
        f"reloads {figures['reloads']}, refused {figures['refused_reloads']}, Envoy rejections "
        f"{figures['envoy_rejections'] or 'none'}; load average "
        f"{figures['load_average_before']} before, {figures['load_average_after']} after"
    )
    return "\n".join(lines)


def main() -> None:
    parser = cli.parser(__doc__)
    parser.set_defaults(json=RESULTS)
    parser.add_argument("--edits", type=int, default=20, help="changes of each kind")
    parser.add_argument("--pools", type=int, default=100)
    parser.add_argument("--endpoints", type=int, default=20, help="endpoints per pool")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    cli.publish(report(figures), figures, args.json)


if __name__ == "__main__":
    main()
