"""Kubernetes objects to the control plane's endpoints: pure functions over their JSON.

EndpointSlices (`discovery.k8s.io/v1`, label `kubernetes.io/service-name`): each
endpoint's first address (the addresses of one endpoint are fungible) at the slice port
chosen by name (the Service port's name) or number (the Pods' port). Its conditions:

* terminating: served as draining (`health_status: DRAINING`) while `serving` (in-flight
  requests finish, new ones go elsewhere), not at all once it stops serving;
* ready (true, or unset: "interpret as ready", the API says): active;
* otherwise not served.

The endpoint's `zone` becomes its zone (the Envoy locality). FQDN slices are skipped (EDS
needs IPs); an address in two slices (while the controller moves it) counts once.

InferencePools (`inference.networking.k8s.io/v1`): `spec.selector.matchLabels` selects
Pods; every Pod with a `status.podIP` and the Ready condition True is an endpoint on
each of `spec.targetPorts[].number` (one to eight); a Pod being deleted
(`metadata.deletionTimestamp`) that is still Ready drains. `spec.appProtocol:
kubernetes.io/h2c` makes the pool speak HTTP/2 to its upstreams. Pods carry no zone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from xds_server.config.types import Endpoint
from xds_server.kubernetes.client import Resource

__all__ = [
    "APP_PROTOCOLS",
    "ENDPOINT_SLICES",
    "H2C",
    "INFERENCE_POOLS",
    "PODS",
    "SERVICE_LABEL",
    "PoolSpec",
    "pod_endpoints",
    "pool_spec",
    "service_selector",
    "slice_endpoints",
]

ENDPOINT_SLICES: Final = Resource("/apis/discovery.k8s.io/v1", "endpointslices")
PODS: Final = Resource("/api/v1", "pods")
INFERENCE_POOLS: Final = Resource("/apis/inference.networking.k8s.io/v1", "inferencepools")
SERVICE_LABEL: Final = "kubernetes.io/service-name"
H2C: Final = "kubernetes.io/h2c"
#: The InferencePool v1 CRD's appProtocol values (default "http": HTTP/1.1).
APP_PROTOCOLS: Final = ("http", H2C)

Endpoints = tuple[Endpoint, ...]


def service_selector(service: str) -> str:
    return f"{SERVICE_LABEL}={service}"


def _ip(text: object) -> str | None:
    try:
        return str(ipaddress.ip_address(str(text)))
    except ValueError:
        return None


def _sorted(by_key: Mapping[str, Endpoint]) -> Endpoints:
    return tuple(sorted(by_key.values(), key=lambda e: (e.zone, e.key)))


def _keep(by_key: dict[str, Endpoint], endpoint: Endpoint) -> None:
    """An address met twice counts once, active over draining."""
    seen = by_key.get(endpoint.key)
    if seen is None or (seen.draining and not endpoint.draining):
        by_key[endpoint.key] = endpoint


def _slice_port(ports: Iterable[Mapping[str, Any]], wanted: str | int) -> int | None:
    for port in ports:
        number = port.get("port")
        if isinstance(wanted, str) and (port.get("name") or "") == wanted and number:
            return int(number)
        if isinstance(wanted, int) and number in (wanted, None):
            return wanted  # a port of null means every port
    return None


def _slice_state(conditions: Mapping[str, Any]) -> str | None:
    ready = conditions.get("ready")
    serving = conditions.get("serving")
    serving = (ready is not False) if serving is None else serving
    if conditions.get("terminating"):
        return "draining" if serving else None
    return "active" if ready is not False else None


def slice_endpoints(
    slices: Iterable[Mapping[str, Any]], port: str | int
) -> tuple[Endpoints, list[str]]:
    """The endpoints of a Service's slices, and what could not be used (slice by slice)."""
    by_key: dict[str, Endpoint] = {}
    notes = []
    for item in sorted(slices, key=lambda s: str(s["metadata"]["name"])):
        name = item["metadata"]["name"]
        if item.get("addressType") not in ("IPv4", "IPv6"):
            notes.append(f"EndpointSlice {name}: addressType {item.get('addressType')} skipped")
            continue
        number = _slice_port(item.get("ports") or [], port)
        if number is None:
            if item.get("endpoints"):
                notes.append(f"EndpointSlice {name} has no port {port!r}")
            continue
        for entry in item.get("endpoints") or []:
            state = _slice_state(entry.get("conditions") or {})
            addresses = entry.get("addresses") or []
            address = _ip(addresses[0]) if addresses else None
            if state is None or address is None:
                continue
            zone = str(entry.get("zone") or "")
            _keep(by_key, Endpoint(address, number, zone, 1, draining=state == "draining"))
    return _sorted(by_key), notes


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What the control plane reads from an InferencePool's spec."""

    selector: str  # the label selector of its matchLabels ("" when it has none)
    ports: tuple[int, ...]
    app_protocol: str
    endpoint_picker: str | None

    @property
    def http2(self) -> bool:
        return self.app_protocol == H2C

    @property
    def problems(self) -> list[str]:
        out = []
        if not self.selector:
            out.append("spec.selector.matchLabels is empty: it would select every Pod")
        if not self.ports:
            out.append("spec.targetPorts names no port")
        if self.app_protocol not in APP_PROTOCOLS:
            out.append(f"spec.appProtocol {self.app_protocol!r} is not one of {APP_PROTOCOLS}")
        return out


def pool_spec(obj: Mapping[str, Any]) -> PoolSpec:
    spec = obj.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    ports = tuple(
        int(p["number"])
        for p in spec.get("targetPorts") or []
        if isinstance(p.get("number"), int) and 1 <= p["number"] <= 65535
    )
    picker = spec.get("endpointPickerRef") or {}
    return PoolSpec(
        selector,
        tuple(dict.fromkeys(ports)),
        str(spec.get("appProtocol") or "http"),
        str(picker["name"]) if picker.get("name") else None,
    )


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_endpoints(
    pods: Iterable[Mapping[str, Any]], spec: PoolSpec
) -> tuple[Endpoints, dict[str, int]]:
    """The endpoints of an InferencePool's Pods, and counts: pods selected, ready, draining."""
    wanted = dict(term.split("=", 1) for term in spec.selector.split(",") if term)
    by_key: dict[str, Endpoint] = {}
    counts = {"pods": 0, "ready": 0, "draining": 0}
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if not wanted or any(labels.get(k) != v for k, v in wanted.items()):
            continue
        counts["pods"] += 1
        address = _ip((pod.get("status") or {}).get("podIP") or "")
        if address is None or not _pod_ready(pod):
            continue
        draining = bool(meta.get("deletionTimestamp"))
        counts["draining" if draining else "ready"] += 1
        for port in spec.ports:
            _keep(by_key, Endpoint(address, port, "", 1, draining=draining))
    return _sorted(by_key), counts
