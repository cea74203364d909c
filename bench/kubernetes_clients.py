"""Which Kubernetes client for `serve --kubernetes` (issue 16): measured, not guessed.

Runs the same list+watch scenario with three clients against the local fake API server
(xds_lab.kube_api) and prints, per client, whether the state it ends with is the server's,
how many lists it needed, and its cost: import time and memory in a fresh interpreter,
and the lines of code its adapter takes here. The scenario: ADDED / MODIFIED / DELETED,
a BOOKMARK (does the client's resourceVersion advance?), a dropped connection (does it
resume from its resourceVersion without a re-list?), and twice a compaction while the
client is away (410 Gone as an ERROR event, then as the HTTP status; a slice deleted in
that gap must be gone afterwards), a slow answer, then a Pod and an InferencePool (a CRD).

    pip install -e '.[bench-kubernetes]'   # kubernetes_asyncio, lightkube: not the product's
    python bench/kubernetes_clients.py
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from xds_lab.kube_api import (
    ENDPOINT_SLICES,
    FakeKubernetes,
    endpoint_slice,
    inference_pool,
    pod,
)

NS = "serving"
SELECTOR = "kubernetes.io/service-name=vllm"
SLICES = f"{ENDPOINT_SLICES[0]}/namespaces/{NS}/endpointslices"


class Run:
    """What one client keeps: objects by name, its resourceVersion, how many lists."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.rv = ""
        self.lists = 0
        self.errors: list[str] = []

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"].get("name")
        if kind == "DELETED":
            self.state.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.state[name] = obj


# --------------------------------------------------------------------- own aiohttp client


async def own_client(url: str, run: Run, plural_path: str = SLICES, sel: str = SELECTOR) -> None:
    async with aiohttp.ClientSession(base_url=url) as session:
        while True:
            async with session.get(plural_path, params={"labelSelector": sel}) as resp:
                body = await resp.json()
            run.lists += 1
            run.state = {o["metadata"]["name"]: o for o in body["items"]}
            run.rv = body["metadata"]["resourceVersion"]
            while True:  # watch until 410, then re-list
                params = {
                    "labelSelector": sel,
                    "watch": "true",
                    "resourceVersion": run.rv,
                    "allowWatchBookmarks": "true",
                }
                try:
                    async with session.get(plural_path, params=params) as resp:
                        if resp.status == 410:
                            break
                        gone = False
                        async for line in resp.content:
                            event = json.loads(line)
                            obj = event["object"]
                            if event["type"] == "ERROR":
                                gone = obj.get("code") == 410
                                break
                            run.rv = obj["metadata"]["resourceVersion"]
                            run.apply(event["type"], obj)
                        if gone:
                            break
                except aiohttp.ClientError as err:
                    run.errors.append(repr(err))
                    await asyncio.sleep(0.05)


# --------------------------------------------------------------------- kubernetes_asyncio


async def kubernetes_asyncio_client(url: str, run: Run) -> None:
    from kubernetes_asyncio import client, watch
    from kubernetes_asyncio.client.exceptions import ApiException

    config = client.Configuration(host=url)
    async with client.ApiClient(config) as api_client:
        api = client.DiscoveryV1Api(api_client)
        while True:
            listed = await api.list_namespaced_endpoint_slice(NS, label_selector=SELECTOR)
            run.lists += 1
            run.state = {o.metadata.name: o for o in listed.items}
            run.rv = listed.metadata.resource_version
            gone = False
            while not gone:  # watch from run.rv until 410, then re-list
                w = watch.Watch()
                try:
                    async for event in w.stream(
                        api.list_namespaced_endpoint_slice,
                        NS,
                        label_selector=SELECTOR,
                        resource_version=run.rv,
                        allow_watch_bookmarks=True,
                    ):
                        run.rv = w.resource_version
                        if event["type"] != "BOOKMARK":
                            run.apply(event["type"], event["raw_object"])
                except ApiException as err:
                    gone = err.status == 410
                    if not gone:
                        run.errors.append(repr(err))
                        await asyncio.sleep(0.05)
                except aiohttp.ClientError as err:
                    run.errors.append(repr(err))
                    await asyncio.sleep(0.05)
                finally:
                    await w.close()


# --------------------------------------------------------------------- lightkube


def _lightkube_config(url: str) -> Any:
    from lightkube.config.kubeconfig import KubeConfig

    return KubeConfig.from_dict(
        {
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "fake", "user": "u"}}],
            "current-context": "c",
        }
    )


async def lightkube_client(url: str, run: Run) -> None:
    from lightkube import AsyncClient
    from lightkube.core.exceptions import ApiError
    from lightkube.resources.discovery_v1 import EndpointSlice

    client = AsyncClient(config=_lightkube_config(url))
    labels = {"kubernetes.io/service-name": "vllm"}
    while True:
        listed = client.list(EndpointSlice, namespace=NS, labels=labels)
        run.state = {o.metadata.name: o async for o in listed}
        run.lists += 1
        run.rv = listed.resourceVersion
        gone = False
        while not gone:  # lightkube sends no allowWatchBookmarks (no parameter for it)
            try:
                async for kind, obj in client.watch(
                    EndpointSlice, namespace=NS, labels=labels, resource_version=run.rv
                ):
                    run.rv = obj.metadata.resourceVersion
                    run.apply(kind, obj.to_dict())
            except ApiError as err:
                gone = err.status.code == 410
                if not gone:
                    run.errors.append(repr(err))
                    await asyncio.sleep(0.05)
            except Exception as err:  # httpx errors; an HTTP 410 is one of them, not ApiError
                gone = getattr(getattr(err, "response", None), "status_code", 0) == 410
                if not gone:
                    run.errors.append(repr(err))
                    await asyncio.sleep(0.05)


async def lightkube_retrying(url: str, run: Run) -> None:
    """lightkube's own recovery (`on_error_retry`): on 410 it watches again without a
    resourceVersion: synthetic ADDEDs for what exists, never a DELETED for the gap."""
    from lightkube import AsyncClient
    from lightkube.resources.discovery_v1 import EndpointSlice
    from lightkube.types import on_error_retry

    client = AsyncClient(config=_lightkube_config(url))
    labels = {"kubernetes.io/service-name": "vllm"}
    listed = client.list(EndpointSlice, namespace=NS, labels=labels)
    run.state = {o.metadata.name: o.to_dict() async for o in listed}
    run.lists += 1
    run.rv = listed.resourceVersion
    async for kind, obj in client.watch(
        EndpointSlice, namespace=NS, labels=labels, resource_version=run.rv, on_error=on_error_retry
    ):
        run.rv = obj.metadata.resourceVersion
        run.apply(kind, obj.to_dict())


# --------------------------------------------------------------------- the scenario


def slice_(name: str, ip: str) -> dict[str, Any]:
    return endpoint_slice(name, NS, "vllm", [{"ip": ip, "zone": "zone-a"}])


async def settle(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def scenario(name: str, client: Callable[[str, Run], Awaitable[None]]) -> dict[str, Any]:
    server = FakeKubernetes()
    await server.start()
    for i in (1, 2):
        server.put(slice_(f"vllm-{i}", f"10.0.0.{i}"))
    server.put(endpoint_slice("other-1", NS, "other", [{"ip": "10.9.9.9"}]))
    run = Run()
    task = asyncio.create_task(client(server.url, run))
    result: dict[str, Any] = {"client": name}

    def names() -> set[str]:
        return set(run.state)

    def truth() -> set[str]:
        return {n for (ns, n) in server.objects["endpointslices"] if n.startswith("vllm")}

    try:
        await settle(lambda: server.watches("endpointslices") == 1)
        server.put(slice_("vllm-3", "10.0.0.3"))
        server.put(slice_("vllm-1", "10.0.0.11"))
        server.delete("endpointslices", NS, "vllm-2")
        result["events"] = await settle(lambda: names() == truth())
        server.put(endpoint_slice("other-1", NS, "other", [{"ip": "10.9.9.8"}]))
        await asyncio.sleep(0.05)
        server.bookmark()
        result["bookmark"] = await settle(lambda: run.rv == str(server.revision))
        lists = run.lists
        server.drop_watches()
        await asyncio.sleep(0.05)
        server.put(slice_("vllm-4", "10.0.0.4"))
        result["drop: resumed"] = await settle(lambda: names() == truth()) and (run.lists == lists)
        if "-v" in sys.argv:
            print(name, names(), truth(), run.lists, lists, run.errors[-2:])
        for gone_as in ("event", "status"):
            server.gone_as = gone_as
            server.delay = 0.3  # the client comes back slowly: a gap
            server.drop_watches()
            await asyncio.sleep(0.1)
            server.delete("endpointslices", NS, "vllm-3" if gone_as == "event" else "vllm-4")
            server.compact()
            await asyncio.sleep(0.4)
            server.delay = 0
            ok = await settle(lambda: names() == truth() and server.watches() == 1)
            result[f"410 {gone_as}"] = ok and names() == truth()
        server.delay = 1.0
        server.drop_watches()
        server.put(slice_("vllm-5", "10.0.0.5"))
        result["slow"] = await settle(lambda: names() == truth(), 4.0)
        result["lists"] = run.lists
        result["final == server"] = names() == truth()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop()
    return result


async def kinds(name: str) -> bool:
    """A Pod and an InferencePool (a CRD) listed and then watched with the client."""
    server = FakeKubernetes()
    await server.start()
    server.put(pod("p-1", NS, {"app": "vllm"}, "10.1.0.1"))
    server.put(inference_pool("pool", NS, {"app": "vllm"}))
    seen: list[str] = []
    try:
        if name == "own aiohttp":
            for path in (f"/api/v1/namespaces/{NS}/pods", INFERENCE_PATH):
                run = Run()
                task = asyncio.create_task(own_client(server.url, run, path, ""))
                await settle(lambda run=run: bool(run.state) and server.watches() == 1)
                task.cancel()
                seen += list(run.state)
        elif name == "kubernetes_asyncio":
            from kubernetes_asyncio import client

            async with client.ApiClient(client.Configuration(host=server.url)) as api:
                pods = await client.CoreV1Api(api).list_namespaced_pod(NS)
                pools = await client.CustomObjectsApi(api).list_namespaced_custom_object(
                    "inference.networking.k8s.io", "v1", NS, "inferencepools"
                )
                seen = [p.metadata.name for p in pods.items] + [
                    p["metadata"]["name"] for p in pools["items"]
                ]
        else:
            from lightkube import AsyncClient
            from lightkube.generic_resource import create_namespaced_resource
            from lightkube.resources.core_v1 import Pod

            pool_kind = create_namespaced_resource(
                "inference.networking.k8s.io", "v1", "InferencePool", "inferencepools"
            )
            api = AsyncClient(config=_lightkube_config(server.url))
            seen = [p.metadata.name async for p in api.list(Pod, namespace=NS)]
            seen += [p.metadata.name async for p in api.list(pool_kind, namespace=NS)]
    finally:
        await server.stop()
    return sorted(seen) == ["p-1", "pool"]


INFERENCE_PATH = f"/apis/inference.networking.k8s.io/v1/namespaces/{NS}/inferencepools"

_IMPORTS = {
    "own aiohttp": "pass",
    "kubernetes_asyncio": "import kubernetes_asyncio.client, kubernetes_asyncio.watch",
    "lightkube": "import lightkube, lightkube.resources.discovery_v1, lightkube.resources.core_v1",
}


def import_cost(statement: str, repeat: int = 9) -> tuple[float, float]:
    """Median seconds to import, and the RSS it adds (MiB), in fresh interpreters that
    have aiohttp loaded already (the product imports it for the admin API)."""
    rss = "int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20"
    code = (
        f"import aiohttp, json, ssl; import time; r0 = {rss}; "
        f"t = time.perf_counter(); {statement}; dt = time.perf_counter() - t; "
        f"print(dt, {rss} - r0)"
    )
    runs = [
        tuple(map(float, subprocess.check_output([sys.executable, "-c", code]).split()))
        for _ in range(repeat)
    ]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


async def _held_state(name: str, slices: int = 1000) -> None:
    """Print the RSS (MiB) that the client's listed state of `slices` slices (8 endpoints
    each) adds, and the seconds the list took."""
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20  # noqa: E731
    server = FakeKubernetes()
    await server.start()
    for i in range(slices):
        ips = [{"ip": f"10.{i // 250}.{i % 250}.{j}", "zone": "zone-a"} for j in range(8)]
        server.put(endpoint_slice(f"vllm-{i}", NS, "vllm", ips))
    exec(_IMPORTS[name])
    server._list("endpointslices", NS, SELECTOR)  # the server's own cost of a list, once
    gc.collect()
    before = rss()
    run = Run()
    started = asyncio.get_running_loop().time()
    task = asyncio.create_task(_ADAPTERS[name](server.url, run))
    await settle(lambda: len(run.state) == slices, 60.0)
    took = asyncio.get_running_loop().time() - started
    gc.collect()
    print(rss() - before, took)
    task.cancel()
    await server.stop()


def held_cost(name: str) -> tuple[float, float]:
    out = subprocess.check_output([sys.executable, __file__, "--held", name])
    mib, seconds = map(float, out.split()[-2:])
    return mib, seconds


_ADAPTERS = {
    "own aiohttp": own_client,
    "kubernetes_asyncio": kubernetes_asyncio_client,
    "lightkube": lightkube_client,
}


def adapter_lines(function: Callable[..., Any]) -> int:
    import inspect

    return len([line for line in inspect.getsource(function).splitlines() if line.strip()])


async def main() -> None:
    rows = []
    for name, client in [*_ADAPTERS.items(), ("lightkube on_error_retry", lightkube_retrying)]:
        try:
            result = await scenario(name, client)
        except ModuleNotFoundError as err:
            print(f"{name}: not installed ({err})")
            continue
        base = name.split(" on_")[0]
        if base == name:
            result["pod + CRD"] = await kinds(name)
            result["import s"], result["import MiB"] = import_cost(_IMPORTS[name])
            result["adapter lines"] = adapter_lines(client)
            result["1000 slices MiB"], result["1000 slices list s"] = held_cost(name)
        rows.append(result)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--held"]:
        asyncio.run(_held_state(sys.argv[2]))
    else:
        asyncio.run(main())
