"""The InferencePool status the control plane writes for the pools it serves.

Per the v1 CRD (`inferencepools.inference.networking.k8s.io`, gateway-api-inference-
extension), `status.parents[]` holds one entry per parent that uses the pool: a
`parentRef` ({group, kind, name, namespace}; group and kind default to a Gateway's,
but any group and kind may be named), an optional `controllerName` (DOMAIN/PATH) and up
to eight `conditions`, of which `Accepted` and `ResolvedRefs` are the known types. The
control plane is not a Gateway: its entry names itself, from `--kubernetes-controller-name`
DOMAIN/NAME: `parentRef: {group: DOMAIN, kind: ControlPlane, name: NAME}` and
`controllerName: DOMAIN/NAME`. Replicas with the same name write the same entry.

`parents` is an atomic list (a merge patch replaces it whole), so the patch carries
every other controller's entries unchanged with ours, and the `metadata.resourceVersion`
it was computed from: if the object moved meanwhile the API server answers 409 and the
next watch event brings the new version to compute from. Nothing is written when the
wanted list is the one there (a condition keeps its lastTransitionTime while its status
holds), so the watch event of our own write causes no second write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from xds_server.kubernetes.client import ApiClient, ApiError, Resource

__all__ = ["DEFAULT_CONTROLLER_NAME", "PARENT_KIND", "Condition", "StatusWriter"]

log = logging.getLogger(__name__)

DEFAULT_CONTROLLER_NAME: Final = "xds-server/control-plane"
PARENT_KIND: Final = "ControlPlane"


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StatusWriter:
    """Writes this control plane's entry of `status.parents` when (and only when) it moves."""

    def __init__(self, client: ApiClient, resource: Resource, controller_name: str) -> None:
        self.client = client
        self.resource = resource
        self.controller_name = controller_name
        domain, _, name = controller_name.partition("/")
        self.parent_ref = {"group": domain, "kind": PARENT_KIND, "name": name}
        self.written = 0
        self.conflicts = 0
        self.errors = 0
        self.last_error: str | None = None

    def _ours(self, parent: Mapping[str, Any]) -> bool:
        ref = parent.get("parentRef") or {}
        return parent.get("controllerName") == self.controller_name or (
            ref.get("group") == self.parent_ref["group"]
            and ref.get("kind") == PARENT_KIND
            and ref.get("name") == self.parent_ref["name"]
        )

    def wanted(
        self, obj: Mapping[str, Any], conditions: Sequence[Condition] | None
    ) -> list[dict[str, Any]]:
        """The parents list with our entry as `conditions` say (None: without our entry)."""
        current = list((obj.get("status") or {}).get("parents") or [])
        ours = next((p for p in current if self._ours(p)), None)
        others = [p for p in current if not self._ours(p) and not _placeholder(p)]
        if conditions is None:
            return others
        before = {c.get("type"): c for c in (ours or {}).get("conditions") or []}
        generation = (obj.get("metadata") or {}).get("generation")
        entry_conditions = []
        for condition in conditions:
            status = "True" if condition.status else "False"
            old = before.get(condition.type) or {}
            entry: dict[str, Any] = {
                "type": condition.type,
                "status": status,
                "reason": condition.reason,
                "message": condition.message[:32768],
                "lastTransitionTime": old.get("lastTransitionTime")
                if old.get("status") == status
                else _now(),
            }
            if isinstance(generation, int):
                entry["observedGeneration"] = generation
            entry_conditions.append(entry)
        mine = {
            "parentRef": dict(self.parent_ref),
            "controllerName": self.controller_name,
            "conditions": entry_conditions,
        }
        return [*others, mine][-32:]

    async def write(self, obj: Mapping[str, Any], conditions: Sequence[Condition] | None) -> bool:
        """Patch the status if ours differs from what `obj` has; True when a patch landed."""
        parents = self.wanted(obj, conditions)
        current = (obj.get("status") or {}).get("parents") or []
        if parents == current:
            return False
        meta = obj["metadata"]
        body = {
            "metadata": {"resourceVersion": meta["resourceVersion"]},
            "status": {"parents": parents},
        }
        path = self.resource.path(meta["namespace"], meta["name"]) + "/status"
        try:
            await self.client.merge_patch(path, body)
        except ApiError as err:
            if err.code == 409:  # moved meanwhile: its watch event brings the next try
                self.conflicts += 1
                return False
            self.errors += 1
            self.last_error = str(err)
            log.warning("cannot write the status of InferencePool %s: %s", meta["name"], err)
            raise
        self.written += 1
        log.info("InferencePool %s/%s status written", meta["namespace"], meta["name"])
        return True


def _placeholder(parent: Mapping[str, Any]) -> bool:
    """Early v1 CRDs defaulted status to a `kind: Status, name: default` parent, which the
    first controller to set Accepted removes."""
    ref = parent.get("parentRef") or {}
    return ref.get("kind") == "Status" and ref.get("name") == "default"
