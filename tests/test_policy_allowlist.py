"""Custom weight policies load only from allowed modules (`--allow-policy-module`), and are
refused before their module is imported; the built-in policy needs no allowing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xds_server.config.reader import parse_config
from xds_server.config.types import SnapshotError

_PLUGIN = """
import pathlib
pathlib.Path(__file__).with_name("imported").write_text("ran")


class Policy:
    def __init__(self, params):
        self.params = params

    def compute(self, endpoints, now):
        raise NotImplementedError
"""


def _snapshot(spec: str) -> str:
    return f"""
listeners: [{{name: l, port: 10000, routes: [{{prefix: /, pool: p}}]}}]
pools:
  - {{name: p, weighting: orca, policy: "{spec}", endpoints: [{{address: 127.0.0.1, port: 1}}]}}
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """An importable package `acme_weights.policies` whose import leaves a file behind."""
    package = tmp_path / "acme_weights"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "policies.py").write_text(_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package / "imported"
    for name in ("acme_weights.policies", "acme_weights"):
        sys.modules.pop(name, None)


def test_a_custom_policy_is_refused_and_not_imported_unless_allowed(plugin) -> None:
    """Issue 12: `policy: module:Class` imports and runs code, even in `validate`."""
    with pytest.raises(SnapshotError) as caught:
        parse_config(_snapshot("acme_weights.policies:Policy"), "s.yaml")
    [problem] = caught.value.problems
    assert problem.path == "pools[0].policy"
    assert "--allow-policy-module acme_weights.policies" in problem.message
    assert not plugin.exists()  # refused before the import: none of its code ran


@pytest.mark.parametrize(
    "allowed",
    [["acme_weights.policies"], ["acme_weights"], ["other", "acme_weights.policies"]],
)
def test_an_allowed_module_or_its_package_loads_the_policy(plugin, allowed: list[str]) -> None:
    config = parse_config(
        _snapshot("acme_weights.policies:Policy"), "s.yaml", allowed_policy_modules=allowed
    )
    assert config.pools[0].policy == "acme_weights.policies:Policy" and plugin.exists()


@pytest.mark.parametrize("allowed", [["acme"], ["acme_weights.policies.sub"], ["acme_weights."]])
def test_allowing_is_by_whole_module_names(plugin, allowed: list[str]) -> None:
    with pytest.raises(SnapshotError, match="is not allowed"):
        parse_config(
            _snapshot("acme_weights.policies:Policy"), "s.yaml", allowed_policy_modules=allowed
        )
    assert not plugin.exists()


def test_the_built_in_policy_needs_no_allowing_and_errors_still_name_the_path() -> None:
    assert parse_config(_snapshot("headroom"), "s.yaml").pools[0].policy == "headroom"
    with pytest.raises(SnapshotError, match="unknown policy 'roundrobin'"):
        parse_config(_snapshot("roundrobin"), "s.yaml")  # malformed: named, not refused
    with pytest.raises(SnapshotError, match="has no attribute 'Missing'"):
        parse_config(
            _snapshot("tests.custom_policy:Missing"),
            "s.yaml",
            allowed_policy_modules=["tests.custom_policy"],
        )


def test_validate_and_serve_take_the_allow_flag(plugin, tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(_snapshot("acme_weights.policies:Policy"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    validate = [sys.executable, "-m", "xds_server.cli", "validate", str(path)]
    refused = subprocess.run(validate, capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and not plugin.exists()
    assert f"{path}: pools[0].policy" in refused.stderr
    assert "--allow-policy-module acme_weights.policies" in refused.stderr
    allowed = [*validate, "--allow-policy-module", "acme_weights"]
    result = subprocess.run(allowed, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert plugin.exists()
    serve = subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "serve", "--allow-policy-module", "a-b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 2 and "expected a module name" in serve.stderr
