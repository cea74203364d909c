"""The Kubernetes endpoint source: the file's config, with its Kubernetes pools filled in.

The snapshot file stays the source of listeners, routes, policies and weighting; a pool
with `kubernetes:` takes its endpoints from the cluster. `follow(config)` starts the
watches that config needs (a Service's EndpointSlices; a namespace's InferencePools and,
per InferencePool, the Pods its selector picks) and stops those it no longer needs;
`fill(config)` returns the config with each such pool's endpoints (and HTTP/2 for an
h2c InferencePool). The control plane publishes `overlay(fill(file))`, so admin drains
apply on top exactly as for file endpoints. A change in Kubernetes publishes again after
`debounce` (50 ms: a rollout's burst of events makes one push), then the InferencePool
statuses are brought up to date.

A pool whose watches have not listed yet (at start, or after its InferencePool's selector
changed) keeps the endpoints it was last served with; a watch that fails keeps its last
objects: the API server going away never empties a pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xds_server.config.types import Config, KubernetesRef, Pool
from xds_server.kubernetes.client import Access, ApiClient, Resource, discover
from xds_server.kubernetes.status import DEFAULT_CONTROLLER_NAME, Condition, StatusWriter
from xds_server.kubernetes.translate import (
    APP_PROTOCOLS,
    ENDPOINT_SLICES,
    INFERENCE_POOLS,
    PODS,
    Endpoints,
    pod_endpoints,
    pool_spec,
    service_selector,
    slice_endpoints,
)
from xds_server.kubernetes.watch import Collection, WatchTiming

__all__ = ["KubernetesOptions", "KubernetesSource"]

log = logging.getLogger(__name__)

_Key = tuple[str, str, str]  # (plural, namespace, selector)
_RESOURCES = {r.plural: r for r in (ENDPOINT_SLICES, PODS, INFERENCE_POOLS)}


@dataclass(frozen=True, slots=True)
class KubernetesOptions:
    """`serve --kubernetes`: where the cluster is (None: as kubectl finds it), the name the
    InferencePool statuses carry, and timings."""

    kubeconfig: Path | None = None
    controller_name: str = DEFAULT_CONTROLLER_NAME
    debounce: float = 0.05
    sync_timeout: float = 10.0  # at start: longest wait for the first lists
    timing: WatchTiming = field(default_factory=WatchTiming)
    write_status: bool = True


@dataclass(slots=True)
class _Served:
    """What a Kubernetes pool was last filled with, and why."""

    endpoints: Endpoints = ()
    http2: bool = False
    note: str = "waiting for the first list"


class KubernetesSource:
    """Owns the watches and the status writer; `start()`, then `follow`/`fill` per config."""

    def __init__(
        self,
        options: KubernetesOptions,
        publish: Callable[[], Awaitable[None]],
        access: Access | None = None,
    ) -> None:
        self.options = options
        self._publish = publish
        self.access = access
        self.client: ApiClient | None = None
        self.status: StatusWriter | None = None
        self._refs: dict[str, KubernetesRef] = {}
        self._watches: dict[_Key, tuple[Collection, asyncio.Task[None]]] = {}
        self._served: dict[str, _Served] = {}
        self._statused: set[tuple[str, str]] = set()  # InferencePools with our entry
        self._retired: Counter[tuple[str, str]] = Counter()  # counts of stopped watches
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self.publishes = 0
        self.publish_errors = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Find the cluster (KubernetesConfigError if there is none) and connect."""
        if self.access is None:
            self.access = await asyncio.to_thread(discover, self.options.kubeconfig)
        self.client = ApiClient(self.access)
        await self.client.start()
        if self.options.write_status:
            self.status = StatusWriter(self.client, INFERENCE_POOLS, self.options.controller_name)
        log.info("kubernetes: %s at %s", self.access.source, self.access.server)

    async def stop(self) -> None:
        tasks = [task for _, task in self._watches.values()]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()
        if self.client is not None:
            await self.client.close()

    async def settle(self, timeout: float) -> bool:
        """Wait until every watch has listed and what they found is published (start-up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.synced and (self._task is None or self._task.done()) and not self._dirty:
                return True
            await asyncio.sleep(0.01)
        return False

    # ------------------------------------------------------------------ config in, config out

    def follow(self, config: Config) -> None:
        """Watch what `config`'s Kubernetes pools need (idempotent; called on each publish)."""
        refs = {p.name: p.kubernetes for p in config.pools if p.kubernetes is not None}
        if refs != self._refs:
            self._refs = refs
            self._served = {name: self._served.get(name, _Served()) for name in refs}
            self._reconcile()
            self._schedule()  # statuses of pools no longer served, or newly served

    def fill(self, config: Config) -> Config:
        """`config` with each Kubernetes pool's endpoints as the cluster has them."""
        if not any(p.kubernetes is not None for p in config.pools):
            return config
        return replace(config, pools=tuple(self._fill_pool(p) for p in config.pools))

    def _fill_pool(self, pool: Pool) -> Pool:
        if pool.kubernetes is None:
            return pool
        found = self._lookup(pool.kubernetes)
        served = self._served.setdefault(pool.name, _Served())
        if found is not None:
            served.endpoints, served.http2, served.note = found
        return replace(pool, endpoints=served.endpoints, http2=served.http2)

    def _lookup(self, ref: KubernetesRef) -> tuple[Endpoints, bool, str] | None:
        """The ref's endpoints now, or None while a watch it needs has not listed yet."""
        if ref.service is not None:
            watch = self._watch_of(ENDPOINT_SLICES, ref.namespace, service_selector(ref.service))
            if watch is None:
                return None
            assert ref.port is not None
            endpoints, notes = slice_endpoints(watch.objects.values(), ref.port)
            note = "; ".join(notes) or f"{len(watch.objects)} EndpointSlices"
            return endpoints, False, note
        pools = self._watch_of(INFERENCE_POOLS, ref.namespace, "")
        if pools is None:
            return None
        obj = pools.objects.get(str(ref.inference_pool))
        if obj is None:
            return (), False, f"no InferencePool {ref.inference_pool} in {ref.namespace}"
        spec = pool_spec(obj)
        if spec.problems:
            return (), False, "; ".join(spec.problems)
        pods = self._watch_of(PODS, ref.namespace, spec.selector)
        if pods is None:
            return None
        endpoints, counts = pod_endpoints(pods.objects.values(), spec)
        note = ", ".join(f"{n} {what}" for what, n in counts.items())
        return endpoints, spec.http2, note

    def _watch_of(self, resource: Resource, namespace: str, selector: str) -> Collection | None:
        entry = self._watches.get((resource.plural, namespace, selector))
        return entry[0] if entry is not None and entry[0].synced else None

    # ------------------------------------------------------------------ watches

    def _wanted(self) -> set[_Key]:
        wanted: set[_Key] = set()
        for ref in self._refs.values():
            if ref.service is not None:
                wanted.add((ENDPOINT_SLICES.plural, ref.namespace, service_selector(ref.service)))
                continue
            wanted.add((INFERENCE_POOLS.plural, ref.namespace, ""))
            pools = self._watches.get((INFERENCE_POOLS.plural, ref.namespace, ""))
            obj = pools[0].objects.get(str(ref.inference_pool)) if pools else None
            if obj is not None and pool_spec(obj).selector:
                wanted.add((PODS.plural, ref.namespace, pool_spec(obj).selector))
        # Keep reading InferencePools whose status still carries our entry, to remove it.
        wanted.update((INFERENCE_POOLS.plural, ns, "") for ns, _ in self._statused)
        return wanted

    def _reconcile(self) -> None:
        if self.client is None:
            return
        wanted = self._wanted()
        for key in set(self._watches) - wanted:
            watch, task = self._watches.pop(key)
            task.cancel()
            self._retire(watch)
        for key in sorted(wanted - set(self._watches)):
            plural, namespace, selector = key
            watch = Collection(
                self.client,
                _RESOURCES[plural],
                namespace,
                selector,
                self._on_change,
                self.options.timing,
            )
            self._watches[key] = (watch, asyncio.create_task(watch.run()))

    def _retire(self, watch: Collection) -> None:
        plural = watch.resource.plural
        self._retired[(plural, "errors")] += watch.errors
        self._retired[(plural, "relists")] += watch.relists
        for kind, count in watch.events.items():
            self._retired[(plural, f"event:{kind}")] += count

    def _on_change(self, watch: Collection) -> None:
        if watch.resource is INFERENCE_POOLS:
            self._reconcile()  # a selector may have changed: watch other Pods
        self._schedule()

    def _schedule(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._publish_soon())

    async def _publish_soon(self) -> None:
        while self._dirty:
            await asyncio.sleep(self.options.debounce)
            self._dirty = False
            try:
                await self._publish()
                self.publishes += 1
            except Exception:
                self.publish_errors += 1
                log.exception("publishing the endpoints from Kubernetes failed")
            await self._write_statuses()

    # ------------------------------------------------------------------ InferencePool status

    async def _write_statuses(self) -> None:
        if self.status is None:
            return
        serving: dict[tuple[str, str], list[str]] = {}
        for pool, ref in sorted(self._refs.items()):
            if ref.inference_pool is not None:
                serving.setdefault((ref.namespace, ref.inference_pool), []).append(pool)
        for key in sorted(set(serving) | self._statused):
            watch = self._watch_of(INFERENCE_POOLS, key[0], "")
            obj = watch.objects.get(key[1]) if watch is not None else None
            if obj is None:
                self._statused.discard(key)
                continue
            if key in serving and any(self._lookup(self._refs[p]) is None for p in serving[key]):
                continue  # its Pods not listed yet: nothing true to say
            conditions = self._conditions(obj, serving[key]) if key in serving else None
            try:
                await self.status.write(obj, conditions)
            except Exception as err:  # logged by the writer; retried on the next change
                log.debug("status write failed: %s", err)
                continue
            if conditions is None:
                self._statused.discard(key)
            else:
                self._statused.add(key)

    def _conditions(self, obj: dict[str, Any], pools: list[str]) -> list[Condition]:
        spec = pool_spec(obj)
        names = ", ".join(pools)
        if spec.app_protocol not in APP_PROTOCOLS:
            accepted = Condition(
                "Accepted",
                False,
                "NotSupportedByParent",
                f"appProtocol {spec.app_protocol!r} is not supported (supported: "
                f"{', '.join(APP_PROTOCOLS)})",
            )
        else:
            protocol = "HTTP/2 (h2c)" if spec.http2 else "HTTP/1.1"
            accepted = Condition(
                "Accepted", True, "Accepted", f"served as Envoy cluster {names} over {protocol}"
            )
        served = [self._served[p] for p in pools if p in self._served]
        endpoints = len(served[0].endpoints) if served else 0
        note = served[0].note if served else ""
        problems = spec.problems
        if problems:
            resolved = Condition("ResolvedRefs", False, "InvalidSelector", "; ".join(problems))
        elif not endpoints:
            resolved = Condition("ResolvedRefs", False, "NoReadyPods", f"{note}: no endpoint")
        else:
            message = f"{note}: {endpoints} endpoints"
            if spec.endpoint_picker:
                message += (
                    f"; endpointPickerRef {spec.endpoint_picker} is not called: this "
                    "control plane weighs endpoints by their load reports itself"
                )
            resolved = Condition("ResolvedRefs", True, "ResolvedRefs", message)
        return [accepted, resolved]

    # ------------------------------------------------------------------ what operators see

    @property
    def watches(self) -> list[Collection]:
        return [watch for watch, _ in self._watches.values()]

    @property
    def synced(self) -> bool:
        return all(watch.synced for watch in self.watches)

    @property
    def connected(self) -> bool:
        return all(watch.connected for watch in self.watches)

    def counts(self, what: str) -> Counter[str]:
        """Per resource: `errors`, `relists` or `event:TYPE`, stopped watches included."""
        out: Counter[str] = Counter()
        for (plural, name), count in self._retired.items():
            if name == what:
                out[plural] += count
        for watch in self.watches:
            value = watch.events[what[6:]] if what.startswith("event:") else getattr(watch, what)
            out[watch.resource.plural] += value
        return out

    def health(self) -> dict[str, Any]:
        status = self.status
        return {
            "server": self.access.server if self.access else None,
            "config": self.access.source if self.access else None,
            "connected": self.connected,
            "synced": self.synced,
            "watches": [watch.describe() for watch in self.watches],
            "pools": {
                name: {"endpoints": len(s.endpoints), "http2": s.http2, "note": s.note}
                for name, s in sorted(self._served.items())
            },
            "status_writes": None
            if status is None
            else {
                "controller_name": status.controller_name,
                "written": status.written,
                "conflicts": status.conflicts,
                "errors": status.errors,
                "last_error": status.last_error,
            },
        }
