"""The Kubernetes manifests in deploy/ (README, "Running on Kubernetes").

There is no cluster here, so nothing is applied. Each kustomization is rendered, with
`kubectl kustomize` where kubectl is installed, else with the small renderer below, which knows
only the transforms deploy/ uses and is held to kubectl's output whenever both are there. Every
rendered object is validated against the Kubernetes OpenAPI schemas that the PyPI package
`kubernetes-validate` ships (offline; strict, so an unknown or misspelt field fails), for the
oldest and the newest Kubernetes release the manifests support. Then what a schema cannot see:
references resolve, selectors select, probes and Services name real ports, the containers'
arguments parse with the real CLI, the snapshot is valid, RBAC is exactly the minimal set, every
container is locked down, the Envoy bootstrap is the CLI's current output (and a real Envoy
takes it), and a kubelet-style ConfigMap update reaches the snapshot watcher.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from xds_lab.envoy_process import find_envoy
from xds_server.cli import build_parser
from xds_server.config.file_source import FileSource
from xds_server.config.reader import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = "base"
SINGLE = "overlays/single-replica"
GATEWAY = "examples/envoy-gateway"
KUSTOMIZATIONS = (BASE, SINGLE, GATEWAY)
#: The oldest release the manifests support (native sidecars are on by default from 1.29) and
#: the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29", "1.37")
NAMESPACE = "xds-system"
#: A stand-in for the git-ignored deploy/base/admin-token (a real one never enters the test).
TEST_TOKEN = "test-only-" + "0" * 54

#: The Kubernetes API access the control plane needs (its Kubernetes source), and no more.
MINIMAL_RBAC = {
    ("discovery.k8s.io", "endpointslices", "get"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("inference.networking.k8s.io", "inferencepools", "get"),
    ("inference.networking.k8s.io", "inferencepools", "list"),
    ("inference.networking.k8s.io", "inferencepools", "watch"),
    ("inference.networking.k8s.io", "inferencepools/status", "patch"),
}

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
CONTROL_PLANE = {
    "app.kubernetes.io/name": "xds-server",
    "app.kubernetes.io/component": "control-plane",
}
ENVOY_LABEL = ("app.kubernetes.io/component", "envoy-gateway")
BASE_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap"}
BASE_KINDS |= {"Secret", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget"}
BASE_KINDS |= {"NetworkPolicy"}

Obj = dict[str, Any]


# --- rendering ----------------------------------------------------------------------------------


def kustomize_cli() -> list[str] | None:
    """The kustomize that `kubectl apply -k` runs, if this machine has it."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render_cli(directory: Path) -> list[Obj]:
    command = kustomize_cli()
    assert command is not None
    done = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _go_json(value: Any) -> bytes:
    """json.Marshal's bytes, as kustomize hashes them: sorted keys, no spaces, HTML escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def _name_suffix(generated: Obj) -> str:
    """kustomize's content hash of a generated ConfigMap or Secret (api/hasher). Its name
    counts as "" there: kustomize looks the field "metadata/name" up as one key, finding none."""
    fields: dict[str, Any] = {"kind": generated["kind"], "name": "", "data": generated["data"]}
    if generated["kind"] == "Secret":
        fields["type"] = generated.get("type", "")
    digest = hashlib.sha256(_go_json(fields)).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _base64_lines(text: str) -> str:
    """A Secret's value as kustomize writes it (kyaml encodeBase64): past one line of 70
    characters, every line ends with a newline."""
    encoded = base64.b64encode(text.encode()).decode()
    if len(encoded) // 70 == 0:
        return encoded
    return "".join(encoded[i : i + 70] + "\n" for i in range(0, len(encoded), 70))


def _generate(directory: Path, spec: Obj, kind: str) -> tuple[Obj, bool]:
    """A configMapGenerator / secretGenerator entry (files only) -> (object, hashed name)."""
    unknown = set(spec) - {"name", "files", "type", "options"}
    assert not unknown, f"the fallback renderer does not know {unknown}"
    data: dict[str, str] = {}
    for entry in spec["files"]:
        key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
        text = (directory / path).read_text()
        data[key] = _base64_lines(text) if kind == "Secret" else text
    options = spec.get("options", {})
    metadata: Obj = {"name": spec["name"]}
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    generated: Obj = {"apiVersion": "v1", "kind": kind, "metadata": metadata, "data": data}
    if kind == "Secret":
        generated["type"] = spec.get("type", "Opaque")
    return generated, not options.get("disableNameSuffixHash", False)


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def _json_patch(document: Obj, operations: list[Obj]) -> None:
    """RFC 6902 add / replace / remove: the operations deploy/ uses."""
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        target: Any = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        index: Any = last
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
        op = operation["op"]
        assert op in {"add", "replace", "remove"}, f"the fallback renderer does not know {op}"
        if op != "add":
            assert index < len(target) if isinstance(target, list) else index in target, operation
        if op == "remove":
            del target[index]
        elif op == "add" and isinstance(target, list):
            target.insert(index, copy.deepcopy(operation["value"]))
        else:
            target[index] = copy.deepcopy(operation["value"])


def _patch_targets(objects: list[Obj], target: Obj) -> list[Obj]:
    def matches(obj: Obj) -> bool:
        group, _, version = obj["apiVersion"].rpartition("/")
        return (
            target.get("kind", obj["kind"]) == obj["kind"]
            and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
            and target.get("group", group) == group
            and target.get("version", version) == version
        )

    found = [obj for obj in objects if matches(obj)]
    assert found, f"patch target {target} matches nothing"
    return found


def _rename_references(pod: Obj, kind: str, old: str, new: str) -> None:
    for volume in pod.get("volumes", []):
        if kind == "ConfigMap" and volume.get("configMap", {}).get("name") == old:
            volume["configMap"]["name"] = new
        if kind == "Secret" and volume.get("secret", {}).get("secretName") == old:
            volume["secret"]["secretName"] = new
    for container in containers(pod):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get(
                "configMapKeyRef" if kind == "ConfigMap" else "secretKeyRef"
            )
            if ref and ref.get("name") == old:
                ref["name"] = new
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef" if kind == "ConfigMap" else "secretRef")
            if ref and ref.get("name") == old:
                ref["name"] = new


def render_fallback(directory: Path) -> list[Obj]:
    """A kustomization rendered the way kustomize does, for the transforms deploy/ uses."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources"}
    known |= {"configMapGenerator", "secretGenerator", "patches"}
    assert not set(spec) - known, f"the fallback renderer does not know {set(spec) - known}"
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += render_fallback(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for key, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for generator in spec.get(key, []):
            generated, hashed = _generate(directory, generator, kind)
            if hashed:
                old = generated["metadata"]["name"]
                new = f"{old}-{_name_suffix(generated)}"
                generated["metadata"]["name"] = new
                for _, pod in pod_specs(objects):
                    _rename_references(pod, kind, old, new)
            objects.append(generated)
    for patch in spec.get("patches", []):
        assert set(patch) == {"target", "patch"}, "only inline JSON 6902 patches are known"
        for obj in _patch_targets(objects, patch["target"]):
            _json_patch(obj, yaml.safe_load(patch["patch"]))
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def render(directory: Path) -> list[Obj]:
    return render_cli(directory) if kustomize_cli() else render_fallback(directory)


def _key(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


# --- what the checks look at ---------------------------------------------------------------------


def containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def pod_specs(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield obj, obj["spec"]["template"]["spec"]


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def find_prefixed(objects: list[Obj], kind: str, prefix: str) -> Obj:
    """A generated object, whatever its hash suffix."""
    pattern = re.compile(rf"{re.escape(prefix)}(-[a-z0-9]{{10}})?")
    found = [o for o in objects if o["kind"] == kind and pattern.fullmatch(o["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{prefix}: {len(found)} objects"
    return found[0]


def container(pod: Obj, name: str) -> Obj:
    found = [c for c in containers(pod) if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions, or a Service's plain map)."""
    structured = "matchLabels" in selector or "matchExpressions" in selector
    match = selector.get("matchLabels", {}) if structured else selector
    if not all(labels.get(k) == v for k, v in match.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        within = labels.get(expression["key"]) in expression.get("values", [])
        outcome = {
            "In": within,
            "NotIn": not within,
            "Exists": present,
            "DoesNotExist": not present,
        }
        if not outcome[expression["operator"]]:
            return False
    return True


def pod_labels(workload: Obj) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def namespace_of(obj: Obj) -> str:
    """Its namespace; "default" for cluster-scoped objects, which have none."""
    return obj["metadata"].get("namespace", "default")


def port_number(c: Obj, port: int | str) -> int | None:
    """A probe's or Service's port (a number, or a name) as one the container declares."""
    for declared in c.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    return None


def cli_args(c: Obj) -> Any:
    """The container's arguments, parsed by the real `xds-server` parser (the image's
    ENTRYPOINT is `xds-server`, so the container must not replace it)."""
    assert "command" not in c, c["name"]
    argv = c["args"]
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{c['name']}: xds-server refuses its arguments {argv} (see stderr)")


def mount_for(pod: Obj, c: Obj, path: str) -> tuple[Obj, str]:
    """(the volume mounted over `path`, the file's name in it), for a whole-directory mount."""
    for mount in c.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            assert "subPath" not in mount, f"{path}: subPath mounts never see updates"
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            return volume, path[len(prefix) :]
    raise AssertionError(f"{c['name']}: nothing mounted at {path}")


def quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(value)
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/ copied, with a test admin token in place of the git-ignored real one."""
    copied = tmp_path_factory.mktemp("manifests") / "deploy"
    shutil.copytree(DEPLOY, copied, ignore=shutil.ignore_patterns("admin-token"))
    (copied / "base" / "admin-token").write_text(TEST_TOKEN + "\n")
    return copied


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[Obj]]:
    return {name: render(tree / name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def cluster(rendered: dict[str, list[Obj]]) -> dict[str, list[Obj]]:
    """What each kustomization sees once applied: the example gateway goes beside the base."""
    return {
        BASE: rendered[BASE],
        SINGLE: rendered[SINGLE],
        GATEWAY: rendered[BASE] + rendered[GATEWAY],
    }


@pytest.fixture(scope="module")
def base(rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered[BASE]


@pytest.fixture(scope="module")
def control_plane(base: list[Obj]) -> Obj:
    return find(base, "Deployment", "xds-server")


@pytest.fixture(scope="module")
def gateway(rendered: dict[str, list[Obj]]) -> Obj:
    return find(rendered[GATEWAY], "Deployment", "envoy-gateway")


# --- rendering and schemas -----------------------------------------------------------------------


def test_every_kustomization_renders_what_it_should(rendered: dict[str, list[Obj]]):
    kinds = {name: sorted({o["kind"] for o in objects}) for name, objects in rendered.items()}
    assert kinds[BASE] == sorted(BASE_KINDS)
    assert kinds[SINGLE] == kinds[BASE]
    assert kinds[GATEWAY] == ["ConfigMap", "Deployment", "Service"]
    for objects in rendered.values():
        keys = [_key(o) for o in objects]
        assert len(keys) == len(set(keys)), "an object is defined twice"
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                assert namespace_of(obj) == NAMESPACE, _key(obj)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_matches_the_kubernetes_schema(
    rendered: dict[str, list[Obj]], name: str, version: str
):
    problems = []
    for obj in rendered[name]:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(part) for part in err.path)
            problems.append(f"{_key(obj)}: {where}: {err.message}")
    assert not problems, "\n".join(problems)


def test_the_schema_check_catches_mistakes(control_plane: Obj):
    """The validator is strict: a misspelt field or a wrong type fails."""
    misspelt = copy.deepcopy(control_plane)
    spec = misspelt["spec"]["template"]["spec"]
    spec["containers"][0]["readinessprobe"] = spec["containers"][0].pop("readinessProbe")
    wrong_type = copy.deepcopy(control_plane)
    wrong_type["spec"]["replicas"] = "3"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_fallback_renderer_matches_kustomize(tree: Path, name: str):
    """Where no kubectl is installed the test renders by itself: it must agree with kustomize."""
    if kustomize_cli() is None:
        pytest.skip("no kubectl or kustomize here: the fallback renderer is what runs")
    ours = sorted(render_fallback(tree / name), key=_key)
    theirs = sorted(render_cli(tree / name), key=_key)
    assert [_key(o) for o in ours] == [_key(o) for o in theirs]
    assert ours == theirs


# --- references, selectors, ports ----------------------------------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_reference_resolves(cluster: dict[str, list[Obj]], name: str):
    objects = cluster[name]

    def exists(kind: str, ref: str, namespace: str) -> Obj:
        found = [
            o
            for o in objects
            if o["kind"] == kind and o["metadata"]["name"] == ref and namespace_of(o) == namespace
        ]
        assert len(found) == 1, f"{kind} {namespace}/{ref} is referenced but not defined"
        return found[0]

    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            exists("Namespace", namespace_of(obj), "default")
    for workload, pod in pod_specs(objects):
        namespace = namespace_of(workload)
        if "serviceAccountName" in pod:
            exists("ServiceAccount", pod["serviceAccountName"], namespace)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                cm = exists("ConfigMap", volume["configMap"]["name"], namespace)
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in cm["data"]
            if "secret" in volume:
                secret = exists("Secret", volume["secret"]["secretName"], namespace)
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret["data"]
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        mounted = set()
        for c in containers(pod):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes.keys() | claims, f"{c['name']}: {mount['name']}"
                mounted.add(mount["name"])
            for env in c.get("env", []):
                source = env.get("valueFrom", {})
                for kind, ref in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if ref in source:
                        found = exists(kind, source[ref]["name"], namespace)
                        assert source[ref]["key"] in found["data"]
        assert mounted == volumes.keys() | claims, "a volume no container mounts"
        if workload["kind"] == "StatefulSet":
            governing = exists("Service", workload["spec"]["serviceName"], namespace)
            assert governing["spec"].get("clusterIP") == "None"
    for binding in (o for o in objects if o["kind"] in {"ClusterRoleBinding", "RoleBinding"}):
        exists(binding["roleRef"]["kind"], binding["roleRef"]["name"], "default")
        for subject in binding["subjects"]:
            exists(subject["kind"], subject["name"], subject["namespace"])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_selectors_select_the_pods_they_mean(cluster: dict[str, list[Obj]], name: str):
    objects = cluster[name]
    workloads = [w for w, _ in pod_specs(objects)]
    for workload in workloads:
        selector = workload["spec"]["selector"]
        assert selects(selector, pod_labels(workload)), _key(workload)
        others = [w for w in workloads if w is not workload and selects(selector, pod_labels(w))]
        assert not others, f"{_key(workload)} would adopt the pods of {others}"
        for spread in workload["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert selects(spread["labelSelector"], pod_labels(workload)), _key(workload)

    def selected(selector: Obj, namespace: str) -> list[Obj]:
        return [
            w
            for w in workloads
            if namespace_of(w) == namespace and selects(selector, pod_labels(w))
        ]

    for obj in objects:
        namespace = namespace_of(obj)
        if obj["kind"] == "Service":
            assert len(selected(obj["spec"]["selector"], namespace)) == 1, _key(obj)
        if obj["kind"] == "PodDisruptionBudget":
            assert len(selected(obj["spec"]["selector"], namespace)) == 1, _key(obj)
        if obj["kind"] == "NetworkPolicy":
            assert len(selected(obj["spec"]["podSelector"], namespace)) == 1, _key(obj)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_probes_and_services_name_real_ports(cluster: dict[str, list[Obj]], name: str):
    objects = cluster[name]
    for workload, pod in pod_specs(objects):
        for c in containers(pod):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                handler = c.get(probe, {})
                for kind in ("httpGet", "tcpSocket", "grpc"):
                    if kind in handler:
                        port = handler[kind]["port"]
                        assert port_number(c, port), f"{_key(workload)} {c['name']} {probe}"
    for service in (o for o in objects if o["kind"] == "Service"):
        for workload, pod in pod_specs(objects):
            if not selects(service["spec"]["selector"], pod_labels(workload)):
                continue
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert any(port_number(c, target) for c in pod["containers"]), (
                    f"{_key(service)} port {port['name']}: {target} is not a container port"
                )
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        for workload, pod in pod_specs(objects):
            if not selects(policy["spec"]["podSelector"], pod_labels(workload)):
                continue
            for rule in policy["spec"].get("ingress", []):
                for port in rule.get("ports", []):
                    assert any(port_number(c, port["port"]) for c in pod["containers"]), (
                        f"{_key(policy)}: {port['port']} is not a port of {_key(workload)}"
                    )


# --- the control plane ---------------------------------------------------------------------------


def test_control_plane_arguments_fit_the_manifests(base: list[Obj], control_plane: Obj):
    pod = control_plane["spec"]["template"]["spec"]
    c = container(pod, "xds-server")
    args = cli_args(c)
    assert args.command == "serve"
    assert (args.host, args.admin_host) == ("0.0.0.0", "0.0.0.0")
    assert port_number(c, "xds") == args.xds_port
    assert port_number(c, "admin") == args.admin_port
    # Redis: the Service in this namespace, on the Redis port.
    match = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", args.redis)
    assert match, args.redis
    redis = find(base, "Service", match.group(1))
    assert int(match.group(2)) in [p["port"] for p in redis["spec"]["ports"]]
    assert args.state is None  # --redis replaces it
    # The snapshot: the whole-directory mount of the unhashed ConfigMap (followed live).
    volume, key = mount_for(pod, c, str(args.snapshot))
    assert volume["configMap"]["name"] == "xds-server-snapshot"
    assert key in find(base, "ConfigMap", "xds-server-snapshot")["data"]
    # The admin token: the Secret's key, and the Secret is made from deploy/base/admin-token.
    volume, key = mount_for(pod, c, str(args.admin_token_file))
    secret = find_prefixed(base, "Secret", "xds-server-admin-token")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert base64.b64decode(secret["data"][key]).decode().strip() == TEST_TOKEN
    # The admin API answers the Service's names and port-forwards.
    service = f"xds-server.{NAMESPACE}.svc"
    assert {"localhost", service, f"{service}.cluster.local"} <= set(args.admin_allowed_host)
    # SIGTERM: the drain finishes well before the kubelet's SIGKILL.
    assert args.drain_period + 10 <= pod["terminationGracePeriodSeconds"]


def test_control_plane_image_is_this_project(control_plane: Obj, gateway: Obj):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user
    ours = [
        c
        for workload in (control_plane, gateway)
        for c in containers(workload["spec"]["template"]["spec"])
        if c["image"].startswith("xds-server:")
    ]
    assert len(ours) == 2
    for c in ours:
        assert c["image"] == f"xds-server:{version}"
        assert c["securityContext"]["runAsUser"] == int(user.group(1))
        assert c["securityContext"]["runAsGroup"] == int(user.group(2))


def test_control_plane_probes_and_availability(base: list[Obj], control_plane: Obj):
    spec = control_plane["spec"]
    pod = spec["template"]["spec"]
    c = container(pod, "xds-server")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = find(base, "PodDisruptionBudget", "xds-server")["spec"]
    assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable") == 2
    zone = [
        s
        for s in pod["topologySpreadConstraints"]
        if s["topologyKey"] == "topology.kubernetes.io/zone"
    ]
    assert zone and zone[0]["maxSkew"] == 1 and zone[0]["whenUnsatisfiable"] == "DoNotSchedule"


def test_single_replica_overlay(rendered: dict[str, list[Obj]]):
    single = find(rendered[SINGLE], "Deployment", "xds-server")
    assert single["spec"]["replicas"] == 1
    assert "topologySpreadConstraints" not in single["spec"]["template"]["spec"]
    budget = find(rendered[SINGLE], "PodDisruptionBudget", "xds-server")["spec"]
    assert budget.get("maxUnavailable", 0) >= 1, "a one-replica budget must not block drains"
    # Nothing else differs from the base.
    base = {_key(o): o for o in rendered[BASE]}
    changed = [_key(o) for o in rendered[SINGLE] if base[_key(o)] != o]
    assert changed == [_key(single)]


def test_redis_keeps_the_overlay_on_disk(base: list[Obj]):
    redis = find(base, "StatefulSet", "xds-server-redis")
    args = container(redis["spec"]["template"]["spec"], "redis")["args"]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--dir"] == "/data"
    assert options["--maxmemory-policy"] == "noeviction"
    claims = redis["spec"]["volumeClaimTemplates"]
    assert [t["metadata"]["name"] for t in claims] == ["data"]


def test_snapshot_configmap_is_a_valid_snapshot(
    tmp_path: Path, base: list[Obj], control_plane: Obj, gateway: Obj
):
    text = find(base, "ConfigMap", "xds-server-snapshot")["data"]["snapshot.yaml"]
    assert text == (DEPLOY / "base" / "snapshot.yaml").read_text()
    path = tmp_path / "snapshot.yaml"
    path.write_text(text)
    config = load_config(path)  # what `xds-server validate` checks; raises SnapshotError
    pod = gateway["spec"]["template"]["spec"]
    router = cli_args(container(pod, "body-router"))
    envoy = container(pod, "envoy")
    assert config.body_router is not None
    assert (config.body_router.address, config.body_router.port) == (router.host, router.port)
    assert [listener.port for listener in config.listeners] == [port_number(envoy, "http")]
    assert all(listener.address == "0.0.0.0" for listener in config.listeners)


async def test_a_configmap_update_reaches_the_file_watcher(tmp_path: Path):
    """The kubelet updates a ConfigMap volume by swapping a symlink (`..data`) to a new
    directory; the snapshot's watcher (file events on the folders the path goes through)
    reloads it."""

    def kubelet_writes(text: str, version: int) -> None:
        payload = tmp_path / f"..2026_01_01_00_00_0{version}.000000000"
        payload.mkdir()
        (payload / "snapshot.yaml").write_text(text)
        (tmp_path / "..data_tmp").symlink_to(payload.name)
        (tmp_path / "..data_tmp").replace(tmp_path / "..data")  # rename(2): atomic

    text = (DEPLOY / "base" / "snapshot.yaml").read_text()
    kubelet_writes(text, 1)
    (tmp_path / "snapshot.yaml").symlink_to("..data/snapshot.yaml")
    served: list[Any] = []

    async def publish(config: Any) -> None:
        served.append(config)

    source = FileSource(tmp_path / "snapshot.yaml", publish)
    assert await source.load(strict=True)
    watching = asyncio.create_task(source.watch(interval=0.05, settle=0.01))
    try:
        kubelet_writes(text.replace("port: 10000", "port: 10080"), 2)
        for _ in range(200):
            if len(served) == 2:
                break
            await asyncio.sleep(0.025)
    finally:
        watching.cancel()
    assert [[listener.port for listener in c.listeners] for c in served] == [[10000], [10080]]


# --- RBAC, network, security ---------------------------------------------------------------------


def test_rbac_is_exactly_the_minimal_set(rendered: dict[str, list[Obj]]):
    everything = [o for objects in rendered.values() for o in objects]
    roles = [o for o in everything if o["kind"] in {"Role", "ClusterRole"}]
    assert {_key(r) for r in roles} == {
        ("rbac.authorization.k8s.io/v1", "ClusterRole", "", "xds-server")
    }
    granted = set()
    for role in roles:
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames etc.
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((group, resource, verb))
    assert granted == MINIMAL_RBAC
    bindings = [o for o in everything if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}]
    bound = {
        (b["roleRef"]["name"], s["kind"], s["namespace"], s["name"])
        for b in bindings
        for s in b["subjects"]
    }
    assert bound == {("xds-server", "ServiceAccount", NAMESPACE, "xds-server")}
    # Only the control plane's pods carry an API token.
    for workload, pod in (p for objects in rendered.values() for p in pod_specs(objects)):
        if workload["metadata"]["name"] == "xds-server":
            assert pod["serviceAccountName"] == "xds-server"
        else:
            assert pod.get("automountServiceAccountToken") is False, _key(workload)


def test_network_policy_admits_only_envoys_and_monitoring(base: list[Obj], gateway: Obj):
    policy = find(base, "NetworkPolicy", "xds-server")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    namespace = find(base, "Namespace", NAMESPACE)
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in policy["ingress"]}
    assert set(rules) == {("xds",), ("admin",)}
    for peers in rules.values():
        for peer in peers:
            assert "ipBlock" not in peer
    # 18000: pods labelled as Envoy gateways, and nothing else (each peer names the label).
    for peer in rules[("xds",)]:
        assert peer["podSelector"]["matchLabels"][ENVOY_LABEL[0]] == ENVOY_LABEL[1]
        assert selects(peer["namespaceSelector"], namespace["metadata"]["labels"])
        assert selects(peer["podSelector"], pod_labels(gateway))
        assert not selects(peer["podSelector"], pod_labels(find(base, "Deployment", "xds-server")))
    # 8080: the monitoring namespace only.
    assert rules[("admin",)] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    redis = find(base, "NetworkPolicy", "xds-server-redis")["spec"]
    assert [rule["from"] for rule in redis["ingress"]] == [
        [{"podSelector": {"matchLabels": CONTROL_PLANE}}]
    ]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_is_locked_down(rendered: dict[str, list[Obj]], name: str):
    for workload, pod in pod_specs(rendered[name]):
        where = _key(workload)
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        pod_context = pod.get("securityContext", {})
        assert pod_context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert pod_context.get("runAsNonRoot") is True, where
        for c in containers(pod):
            context = {**pod_context, **c.get("securityContext", {})}
            what = f"{where} {c['name']}"
            assert context.get("runAsNonRoot") is True, what
            assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, what
            assert context.get("readOnlyRootFilesystem") is True, what
            assert context.get("allowPrivilegeEscalation") is False, what
            assert not context.get("privileged"), what
            assert context.get("capabilities") == {"drop": ["ALL"]}, what
            assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, what
            resources = c.get("resources", {})
            for which in ("cpu", "memory"):
                request = quantity(resources["requests"][which])
                limit = quantity(resources["limits"][which])
                assert 0 < request <= limit, f"{what} {which}"
    for namespace in (o for o in rendered[name] if o["kind"] == "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_admin_token_file_is_never_committed():
    ignored = (DEPLOY / "base" / ".gitignore").read_text().split()
    assert "admin-token" in ignored


# --- the example gateway -------------------------------------------------------------------------


def _bootstrap_script_output() -> str:
    beside = Path(sys.executable).parent / "xds-server"
    env = {**os.environ, "XDS_SERVER": str(beside) if beside.exists() else "xds-server"}
    done = subprocess.run(
        ["sh", str(DEPLOY / "bootstrap.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bootstrap_configmap_is_the_cli_output(
    rendered: dict[str, list[Obj]], gateway: Obj, base: list[Obj]
):
    committed = (DEPLOY / "examples" / "envoy-gateway" / "envoy.yaml").read_text()
    assert committed == _bootstrap_script_output(), (
        "deploy/examples/envoy-gateway/envoy.yaml is stale: run `make -C deploy bootstrap`"
    )
    configmap = find_prefixed(rendered[GATEWAY], "ConfigMap", "envoy-gateway-bootstrap")
    assert configmap["data"] == {"envoy.yaml": committed}
    # Envoy reads it from that ConfigMap.
    pod = gateway["spec"]["template"]["spec"]
    envoy = container(pod, "envoy")
    bootstrap_path = envoy["args"][envoy["args"].index("-c") + 1]
    volume, key = mount_for(pod, envoy, bootstrap_path)
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert key == "envoy.yaml"
    # It points at the base's Service, on its xDS port.
    bootstrap = yaml.safe_load(committed)
    (xds,) = (c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "xds_cluster")
    (address,) = (
        e["endpoint"]["address"]["socket_address"]
        for group in xds["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    )
    service = find(base, "Service", "xds-server")
    assert address["address"] == f"xds-server.{namespace_of(service)}.svc.cluster.local"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert address["port_value"] == ports["xds"]
    # Each Envoy's node.id is its pod's name.
    node = envoy["args"][envoy["args"].index("--service-node") + 1]
    assert node == "$(POD_NAME)"
    (env,) = (e for e in envoy["env"] if e["name"] == "POD_NAME")
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_body_router_is_a_native_sidecar_on_loopback(gateway: Obj):
    pod = gateway["spec"]["template"]["spec"]
    (router,) = pod["initContainers"]
    assert router["name"] == "body-router"
    assert router["restartPolicy"] == "Always"  # started before Envoy, stopped after it
    args = cli_args(router)
    assert args.command == "body-router"
    assert args.host == "127.0.0.1"
    volume, key = mount_for(pod, router, str(args.snapshot))
    assert volume["configMap"]["name"] == "xds-server-snapshot"
    assert key == "snapshot.yaml"
    probe = router["startupProbe"]["exec"]["command"]
    assert f'("127.0.0.1", {args.port})' in probe[-1]


@pytest.mark.envoy
def test_real_envoy_accepts_the_gateway_command_line(tmp_path: Path, gateway: Obj):
    """Envoy 1.40 (`--mode validate`) takes the bootstrap and the container's arguments."""
    envoy = container(gateway["spec"]["template"]["spec"], "envoy")
    path = tmp_path / "envoy.yaml"
    path.write_text((DEPLOY / "examples" / "envoy-gateway" / "envoy.yaml").read_text())
    args = [str(path) if a == "/etc/envoy/envoy.yaml" else a for a in envoy["args"]]
    args = [a.replace("$(POD_NAME)", "envoy-gateway-7d9f8-x2x4q") for a in args]
    done = subprocess.run(
        [find_envoy(), "--mode", "validate", *args, "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout
