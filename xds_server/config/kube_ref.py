"""A pool's `kubernetes:` key: where in Kubernetes its endpoints come from, checked offline.

Only the shape is checked here (`xds-server validate` needs no cluster): exactly one of
`service` and `inferencePool`, names as Kubernetes accepts them, a port for a Service.
What the cluster holds is xds_server.kubernetes's business.
"""

from __future__ import annotations

import re
from typing import Any, Final

from xds_server.config.problems import STRING, Reader, describe, is_int, join
from xds_server.config.types import KubernetesRef

__all__ = ["KUBERNETES_KEYS", "read_kubernetes"]

KUBERNETES_KEYS: Final = ("service", "inferencePool", "namespace", "port")
#: Namespaces and port names: DNS-1123 labels. Service names: DNS-1035 labels (a letter
#: first). InferencePool names: DNS-1123 subdomains (the name rule of custom resources).
_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS1035_LABEL: Final = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS1123_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)


def _name(
    r: Reader, m: dict[str, Any], key: str, path: str, rule: re.Pattern[str], what: str
) -> str | None:
    value = r.value(m, key, path, STRING)
    if value is None:
        return None
    if not rule.fullmatch(value) or len(value) > (253 if rule is _DNS1123_SUBDOMAIN else 63):
        r.problem(join(path, key), f"invalid {what} {value!r}")
        return None
    return value


def _port(r: Reader, m: dict[str, Any], path: str) -> str | int | None:
    here = join(path, "port")
    value = m.get("port")
    if is_int(value) and 1 <= value <= 65535:
        return value
    if isinstance(value, str) and _DNS1123_LABEL.fullmatch(value) and not value.isdigit():
        return value
    if value is None:
        r.problem(here, "required: the Service port's name, or the Pods' port number (1-65535)")
    else:
        r.problem(
            here,
            "expected a port name (a DNS-1123 label, as the Service names its ports) or a "
            f"port number 1-65535, got {describe(value)}",
        )
    return None


def read_kubernetes(r: Reader, value: object, path: str) -> KubernetesRef | None:
    """The `kubernetes:` mapping of the pool at `path`; None (problems recorded) if bad."""
    here = join(path, "kubernetes")
    m = r.mapping(value, here, KUBERNETES_KEYS)
    if m is None:
        return None
    if (m.get("service") is None) == (m.get("inferencePool") is None):
        r.problem(
            here,
            "give exactly one of 'service' (the Service's EndpointSlices) or 'inferencePool' "
            "(the Pods an InferencePool selects)",
        )
        return None
    namespace = _name(r, m, "namespace", here, _DNS1123_LABEL, "namespace (a DNS-1123 label)")
    if m.get("service") is not None:
        service = _name(r, m, "service", here, _DNS1035_LABEL, "Service name (a DNS-1035 label)")
        port = _port(r, m, here)
        if namespace is None or service is None or port is None:
            return None
        return KubernetesRef(namespace, service=service, port=port)
    pool = _name(
        r, m, "inferencePool", here, _DNS1123_SUBDOMAIN, "InferencePool name (a DNS-1123 subdomain)"
    )
    if m.get("port") is not None:
        r.problem(join(here, "port"), "an InferencePool names its ports (spec.targetPorts)")
        return None
    if namespace is None or pool is None:
        return None
    return KubernetesRef(namespace, inference_pool=pool)
