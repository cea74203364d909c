"""A local Kubernetes API server for tests: the real list/watch JSON protocol over aiohttp.

No API server can run here, so the tests bring one that speaks the protocol the real one
speaks, for the three collections the control plane reads (EndpointSlices, Pods,
InferencePools) and the InferencePool `/status` subresource:

* `GET .../namespaces/NS/PLURAL?labelSelector=...`: a `...List` with
  `metadata.resourceVersion` (one counter for every object, as etcd's revision);
* `...?watch=true&resourceVersion=RV&allowWatchBookmarks=true`: newline-delimited
  `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}`, replaying the
  events after RV first; an object that stops (starts) matching the selector is sent as
  DELETED (ADDED), as the real server does;
* a resourceVersion older than the compacted history: `410 Gone` as an ERROR event in a
  200 stream (what the watch cache answers) or as the HTTP status (`gone_as="status"`);
* `PATCH .../inferencepools/NAME/status` with `application/merge-patch+json`, refused
  with 409 when the patch's `metadata.resourceVersion` is not the current one.

The test drives failures: `bookmark()`, `compact()`, `drop_watches()` (connections cut),
`delay` (slow answers), `fail_next()` (5xx answers), `concurrent_writes` (another writer
moves an object just before a status patch: 409), `stop()`/`start()` (the server goes
away and comes back on the same port). Objects are shaped as the real ones:
`endpoint_slice()`, `pod()` and `inference_pool()` build them. The InferencePool shape
follows the published CRD `inferencepools.inference.networking.k8s.io` v1
(kubernetes-sigs/gateway-api-inference-extension, config/crd/bases, v1.6.0).
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from xds_lab.lifecycle import StartStop

__all__ = [
    "ENDPOINT_SLICES",
    "INFERENCE_POOLS",
    "PODS",
    "FakeKubernetes",
    "endpoint_slice",
    "inference_pool",
    "pod",
]

#: (API path prefix, plural, kind) of the collections served.
ENDPOINT_SLICES = ("/apis/discovery.k8s.io/v1", "endpointslices", "EndpointSlice")
PODS = ("/api/v1", "pods", "Pod")
INFERENCE_POOLS = ("/apis/inference.networking.k8s.io/v1", "inferencepools", "InferencePool")
_COLLECTIONS = {c[1]: c for c in (ENDPOINT_SLICES, PODS, INFERENCE_POOLS)}
_API_VERSIONS = {
    "endpointslices": "discovery.k8s.io/v1",
    "pods": "v1",
    "inferencepools": "inference.networking.k8s.io/v1",
}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _flag(query: Mapping[str, str], name: str) -> bool:
    """A boolean query parameter as the API server reads one: present and not 0/f/false."""
    value = query.get(name)
    return value is not None and value.lower() not in ("0", "f", "false")


def _selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Equality-based selectors (`a=b,c!=d`, `a==b`) and existence (`a`, `!a`)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass(eq=False)
class _Watch:
    plural: str
    namespace: str
    selector: str
    bookmarks: bool
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


class FakeKubernetes(StartStop):
    """An aiohttp Kubernetes API server on 127.0.0.1; `url` once started.

    `token`: requests must carry `Authorization: Bearer TOKEN` (401 otherwise).
    `ssl`: an ssl.SSLContext to serve HTTPS (the in-cluster configuration's case).
    """

    def __init__(self, token: str | None = None, port: int = 0, ssl: Any = None) -> None:
        self.token = token
        self.port = port
        self.ssl = ssl
        self.revision = 100
        #: plural -> (namespace, name) -> object
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            plural: {} for plural in _COLLECTIONS
        }
        #: every change: (revision, plural, type, object), oldest first, from `compacted` on.
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []
        self.compacted = 0
        self.gone_as = "event"  # "event": 200 + ERROR 410; "status": HTTP 410
        self.delay = 0.0  # seconds before answering a list or a watch (a slow server)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query)
        self.patches: list[tuple[str, dict[str, Any]]] = []  # (path, body) of status patches
        self._failures: list[int] = []
        #: Status patches before which another writer changes the object (their answer: 409).
        self.concurrent_writes = 0
        self._watches: set[_Watch] = set()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Go away: open watches are cut, new connections refused (same port on start())."""
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ the test's levers

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED); returns it as stored."""
        stored = copy.deepcopy(dict(obj))
        plural = _plural_of(stored)
        meta = stored.setdefault("metadata", {})
        key = (meta.get("namespace", "default"), meta["name"])
        old = self.objects[plural].get(key)
        meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        meta["generation"] = (old["metadata"].get("generation", 1) + 1) if old else 1
        if old is not None and "status" not in stored and "status" in old:
            stored["status"] = old["status"]  # a spec update leaves the status subresource
        self._record(plural, key, "MODIFIED" if old else "ADDED", stored)
        return stored

    def delete(self, plural: str, namespace: str, name: str) -> None:
        obj = self.objects[plural][(namespace, name)]
        self._record(plural, (namespace, name), "DELETED", copy.deepcopy(obj))

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        return self.objects[plural][(namespace, name)]

    def bookmark(self) -> None:
        """Send every watch that asked for them a BOOKMARK at the current revision."""
        for watch in self._watches:
            if watch.bookmarks:
                _prefix, plural, kind = _COLLECTIONS[watch.plural]
                meta = {"resourceVersion": str(self.revision)}
                obj = {"kind": kind, "apiVersion": _API_VERSIONS[plural], "metadata": meta}
                watch.queue.put_nowait({"type": "BOOKMARK", "object": obj})

    def compact(self) -> None:
        """Forget the history: any older resourceVersion is now 410 Gone (etcd compaction)."""
        self.revision += 1
        self.compacted = self.revision
        self.history.clear()

    def expire_watches(self) -> None:
        """Send every open watch the 410 ERROR event the real server sends when its window
        moved past a watcher (after compact(), the watcher must re-list)."""
        for watch in self._watches:
            message = f"too old resource version: {self.compacted - 1} ({self.compacted})"
            watch.queue.put_nowait({"type": "ERROR", "object": _status(410, "Expired", message)})

    def drop_watches(self) -> None:
        """Cut every open watch connection (a load balancer or an API server restart)."""
        for watch in list(self._watches):
            watch.queue.put_nowait(None)

    def fail_next(self, *codes: int) -> None:
        """Answer the next requests with these HTTP statuses (a Status body)."""
        self._failures.extend(codes)

    def watches(self, plural: str | None = None) -> int:
        return sum(1 for w in self._watches if plural is None or w.plural == plural)

    # ------------------------------------------------------------------ protocol

    def _record(self, plural: str, key: tuple[str, str], kind: str, obj: dict[str, Any]) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        old = self.objects[plural].get(key)
        if kind == "DELETED":
            del self.objects[plural][key]
        else:
            self.objects[plural][key] = obj
        self.history.append((self.revision, plural, kind, obj))
        for watch in self._watches:
            if watch.plural == plural and watch.namespace == key[0]:
                event = _filtered(kind, obj, old, watch.selector)
                if event is not None:
                    watch.queue.put_nowait(event)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.method, request.path, query))
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if self._failures:
            code = self._failures.pop(0)
            return web.json_response(_status(code, "InternalError", "injected"), status=code)
        parts = _route(request.path)
        if parts is None:
            return web.json_response(_status(404, "NotFound", request.path), status=404)
        namespace, plural, name, sub = parts
        if request.method == "PATCH" and name and sub == "status":
            return await self._patch_status(request, plural, namespace, name)
        if request.method != "GET":
            return web.json_response(_status(405, "MethodNotAllowed", "no"), status=405)
        if self.delay:
            await asyncio.sleep(self.delay)
        if name:
            obj = self.objects[plural].get((namespace, name))
            if obj is None:
                return web.json_response(_status(404, "NotFound", name), status=404)
            return web.json_response(obj)
        if _flag(query, "watch"):
            return await self._watch(request, plural, namespace, query)
        return self._list(plural, namespace, query.get("labelSelector", ""))

    def _list(self, plural: str, namespace: str, selector: str) -> web.Response:
        _prefix, _, kind = _COLLECTIONS[plural]
        items = [
            obj
            for (ns, _name), obj in sorted(self.objects[plural].items())
            if ns == namespace and _selector_matches(selector, _labels(obj))
        ]
        return web.json_response(
            {
                "kind": f"{kind}List",
                "apiVersion": _API_VERSIONS[plural],
                "metadata": {"resourceVersion": str(self.revision)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, plural: str, namespace: str, query: dict[str, str]
    ) -> web.StreamResponse:
        # Without a resourceVersion (or "0") the real server starts with a synthetic ADDED
        # for every object that exists, then the changes: no DELETED for what went before.
        synthetic = query.get("resourceVersion") in (None, "", "0")
        since = self.revision if synthetic else int(query["resourceVersion"])
        if since < self.compacted:
            status = _status(
                410, "Expired", f"too old resource version: {since} ({self.compacted})"
            )
            if self.gone_as == "status":
                return web.json_response(status, status=410)
        watch = _Watch(
            plural,
            namespace,
            query.get("labelSelector", ""),
            _flag(query, "allowWatchBookmarks"),
        )
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if since < self.compacted:
            await _send(response, {"type": "ERROR", "object": status})
            return response
        if synthetic:
            for (ns, _name), obj in sorted(self.objects[plural].items()):
                if ns == namespace and _selector_matches(watch.selector, _labels(obj)):
                    await _send(response, {"type": "ADDED", "object": copy.deepcopy(obj)})
        for revision, kind_plural, kind, obj in self.history:
            if revision > since and kind_plural == plural:
                if obj["metadata"].get("namespace", "default") == namespace:
                    event = _filtered(kind, obj, None, watch.selector, replay=True)
                    if event is not None:
                        await _send(response, event)
        timeout = float(query.get("timeoutSeconds") or 0) or None
        self._watches.add(watch)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await watch.queue.get()
                    if event is None:  # cut the connection, no clean end of stream
                        if request.transport is not None:
                            request.transport.abort()
                        return response
                    await _send(response, event)
        except TimeoutError:
            return response  # the server's timeoutSeconds: a clean end of the stream
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        finally:
            self._watches.discard(watch)

    async def _patch_status(
        self, request: web.Request, plural: str, namespace: str, name: str
    ) -> web.Response:
        if request.content_type != "application/merge-patch+json":
            return web.json_response(
                _status(415, "UnsupportedMediaType", request.content_type), status=415
            )
        body = await request.json()
        self.patches.append((request.path, body))
        current = self.objects[plural].get((namespace, name))
        if current is None:
            return web.json_response(_status(404, "NotFound", name), status=404)
        if self.concurrent_writes:
            self.concurrent_writes -= 1
            labels = current["metadata"].setdefault("labels", {})
            labels["touched"] = str(int(labels.get("touched", "0")) + 1)
            current = self.put(current)
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            message = "the object has been modified; please apply your changes to the latest"
            return web.json_response(_status(409, "Conflict", message), status=409)
        updated = copy.deepcopy(current)
        if "status" in body:  # the status subresource takes only the status
            updated["status"] = _merge(updated.get("status") or {}, body["status"])
        self._record(plural, (namespace, name), "MODIFIED", updated)
        return web.json_response(updated)


async def _send(response: web.StreamResponse, event: Mapping[str, Any]) -> None:
    await response.write(json.dumps(event).encode() + b"\n")


def _filtered(
    kind: str,
    obj: dict[str, Any],
    old: dict[str, Any] | None,
    selector: str,
    replay: bool = False,
) -> dict[str, Any] | None:
    """The event a watch with this selector sees, if any."""
    now = _selector_matches(selector, _labels(obj))
    before = old is not None and _selector_matches(selector, _labels(old))
    if kind == "MODIFIED" and not replay:
        if now and not before:
            kind = "ADDED"
        elif before and not now:
            return {"type": "DELETED", "object": copy.deepcopy(obj)}
    if not now:
        return None
    return {"type": kind, "object": copy.deepcopy(obj)}


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch: lists are replaced whole, null deletes."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _plural_of(obj: Mapping[str, Any]) -> str:
    for plural, (_prefix, _p, kind) in _COLLECTIONS.items():
        if obj.get("kind") == kind:
            return plural
    raise ValueError(f"no collection for kind {obj.get('kind')!r}")


def _route(path: str) -> tuple[str, str, str, str] | None:
    """(namespace, plural, name, subresource) of a namespaced path we serve."""
    for prefix, plural, _kind in _COLLECTIONS.values():
        head = f"{prefix}/namespaces/"
        if not path.startswith(head):
            continue
        parts = path[len(head) :].split("/")
        if len(parts) >= 2 and parts[1] == plural and len(parts) <= 4:
            return parts[0], plural, parts[2] if len(parts) > 2 else "", ([*parts, "", ""])[3]
    return None


# ---------------------------------------------------------------------- objects


def endpoint_slice(
    name: str,
    namespace: str,
    service: str,
    endpoints: Sequence[Mapping[str, Any]],
    ports: Sequence[Mapping[str, Any]] = ({"name": "http", "port": 8000},),
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """An EndpointSlice as the endpointslice controller writes it.

    `endpoints`: `{"ip": ..., "ready": bool, "serving": bool, "terminating": bool,
    "zone": ..., "pod": name}` (serving defaults to ready, terminating to False).
    """
    out = []
    for e in endpoints:
        ready = e.get("ready", True)
        entry: dict[str, Any] = {
            "addresses": [e["ip"]],
            "conditions": {
                "ready": ready,
                "serving": e.get("serving", ready),
                "terminating": e.get("terminating", False),
            },
            "nodeName": e.get("node", "node-1"),
            "targetRef": {
                "kind": "Pod",
                "namespace": namespace,
                "name": e.get("pod", f"{service}-{e['ip'].replace('.', '-')}"),
                "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, e["ip"])),
            },
        }
        if e.get("zone"):
            entry["zone"] = e["zone"]
        out.append(entry)
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service,
                    "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, service)),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": address_type,
        "endpoints": out,
        "ports": [{"protocol": "TCP", **p} for p in ports],
    }


def pod(
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    ip: str | None,
    ready: bool = True,
    terminating: bool = False,
) -> dict[str, Any]:
    """A v1 Pod as the kubelet reports it: status.podIP(s), phase and conditions."""
    conditions = [
        {
            "type": t,
            "status": "True" if ok else "False",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
        for t, ok in (
            ("PodScheduled", True),
            ("Initialized", True),
            ("ContainersReady", ready),
            ("Ready", ready),
        )
    ]
    status: dict[str, Any] = {"phase": "Running" if ip else "Pending", "conditions": conditions}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        meta["deletionGracePeriodSeconds"] = 30
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": status,
    }


def inference_pool(
    name: str,
    namespace: str,
    match_labels: Mapping[str, str],
    ports: Sequence[int] = (8000,),
    app_protocol: str | None = None,
    endpoint_picker: str | None = None,
) -> dict[str, Any]:
    """An InferencePool `inference.networking.k8s.io/v1` (spec.selector.matchLabels,
    spec.targetPorts[].number, spec.appProtocol, spec.endpointPickerRef)."""
    spec: dict[str, Any] = {
        "selector": {"matchLabels": dict(match_labels)},
        "targetPorts": [{"number": p} for p in ports],
    }
    if app_protocol is not None:
        spec["appProtocol"] = app_protocol
    if endpoint_picker is not None:
        spec["endpointPickerRef"] = {
            "group": "",
            "kind": "Service",
            "name": endpoint_picker,
            "port": {"number": 9002},
            "failureMode": "FailClose",
        }
    return {
        "kind": "InferencePool",
        "apiVersion": "inference.networking.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
