"""The generated Envoy bootstrap: committed files in sync, accepted by the real Envoy."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from xds_lab.envoy_process import find_envoy
from xds_server.bootstrap import envoy_bootstrap, render_yaml

BOOTSTRAP_DIR = Path(__file__).resolve().parent.parent / "envoy-bootstrap"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def xds_cluster(bootstrap: dict[str, Any]) -> dict[str, Any]:
    [cluster] = bootstrap["static_resources"]["clusters"]
    return cluster


def xds_address(bootstrap: dict[str, Any]) -> dict[str, Any]:
    [locality] = xds_cluster(bootstrap)["load_assignment"]["endpoints"]
    [endpoint] = locality["lb_endpoints"]
    return endpoint["endpoint"]["address"]["socket_address"]


@pytest.mark.parametrize("name, delta", [("sotw", False), ("delta", True)])
def test_committed_files_match_generator(name: str, delta: bool):
    committed = (BOOTSTRAP_DIR / f"{name}.yaml").read_text()
    assert committed == render_yaml(envoy_bootstrap(node_id="envoy-1", delta=delta)), (
        f"envoy-bootstrap/{name}.yaml is stale: regenerate it, see envoy-bootstrap/README.md"
    )


@pytest.mark.parametrize("delta, api_type", [(False, "GRPC"), (True, "DELTA_GRPC")])
def test_ads_and_lrs_point_at_the_server(delta: bool, api_type: str):
    boot = envoy_bootstrap(node_id="e1", node_cluster="pool-a", xds_port=19000, delta=delta)
    ads = boot["dynamic_resources"]["ads_config"]
    assert boot["node"] == {"id": "e1", "cluster": "pool-a"}
    assert ads["api_type"] == api_type and ads["set_node_on_first_message_only"] is True
    assert ads["grpc_services"] == [{"envoy_grpc": {"cluster_name": "xds_cluster"}}]
    lrs = boot["cluster_manager"]["load_stats_config"]
    assert lrs["api_type"] == "GRPC" and lrs["grpc_services"] == ads["grpc_services"]
    assert xds_address(boot) == {"address": "127.0.0.1", "port_value": 19000}
    options = xds_cluster(boot)["typed_extension_protocol_options"][HTTP_OPTIONS]
    assert "http2_protocol_options" in options["explicit_http_config"]


def test_lrs_can_be_left_out():
    assert "cluster_manager" not in envoy_bootstrap(node_id="e1", lrs=False)


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.7", "::1"])
def test_ip_host_is_a_static_cluster(host: str):
    boot = envoy_bootstrap(node_id="e1", xds_host=host)
    assert xds_cluster(boot)["type"] == "STATIC"
    assert "dns_lookup_family" not in xds_cluster(boot)
    assert xds_address(boot)["address"] == host


@pytest.mark.parametrize("host", ["localhost", "xds-server.gateway.svc.cluster.local"])
def test_hostname_host_is_resolved_by_dns(host: str):
    boot = envoy_bootstrap(node_id="e1", xds_host=host)
    assert xds_cluster(boot)["type"] == "STRICT_DNS"
    assert xds_cluster(boot)["dns_lookup_family"] == "V4_PREFERRED"
    assert xds_address(boot)["address"] == host


def test_admin_address_and_port():
    boot = envoy_bootstrap(node_id="e1", envoy_admin_port=9999, envoy_admin_address="127.0.0.2")
    assert boot["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.2",
        "port_value": 9999,
    }


def test_render_yaml_has_header_and_no_anchors():
    text = render_yaml(envoy_bootstrap(node_id="e1"))
    assert text.startswith("# ") and "xds-server bootstrap" in text.splitlines()[0]
    assert "&id" not in text and "*id" not in text


@pytest.mark.envoy
@pytest.mark.parametrize(
    "options",
    [
        {"delta": False},
        {"delta": True},
        {"delta": False, "lrs": False},
        {"delta": True, "xds_host": "xds-server.example.internal"},
    ],
    ids=["sotw", "delta", "sotw-no-lrs", "delta-hostname"],
)
def test_real_envoy_accepts_bootstrap(tmp_path: Path, options: dict[str, Any]):
    path = tmp_path / "bootstrap.yaml"
    path.write_text(render_yaml(envoy_bootstrap(node_id="envoy-1", **options)))
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
