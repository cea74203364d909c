"""A pool's weight policy as the snapshot file names it, and which custom ones may load.

`policy: module:Class` imports that module and runs its code, wherever the file is
loaded: `serve`, and `validate` too. So a custom policy is refused (a problem naming
the pool's `policy` path and the flag) unless its module is allowed: the operator
passes `--allow-policy-module MODULE` to `serve` and `validate`, and a name allows
that module and every module under it (`acme` allows `acme.policies`). The refusal
comes before the import, so nothing of a module that is not allowed runs. The
built-in policies (`headroom`) are always allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from lrs.weights.params import ParamError, Params, parse_params
from lrs.weights.policy import BUILT_IN, PolicyError, load_policy
from xds_server.config.problems import STRING, Reader, describe, join

__all__ = ["ALLOW_FLAG", "module_allowed", "read_policy"]

#: The command-line flag (of `serve`, `validate`, `body-router`) that allows a module.
ALLOW_FLAG: Final = "--allow-policy-module"


def module_allowed(module: str, allowed: Iterable[str]) -> bool:
    """Whether `module` is one of `allowed` or inside one of them (on a dot boundary)."""
    return any(module == name or module.startswith(name + ".") for name in allowed)


def _refusal(spec: str, allowed: tuple[str, ...]) -> str | None:
    """Why a custom policy may not be loaded, or None (built-in, allowed, or malformed:
    load_policy names what is wrong with a malformed one without importing anything)."""
    module = spec.partition(":")[0]
    if spec in BUILT_IN or ":" not in spec or not module or module_allowed(module, allowed):
        return None
    listed = f" (allowed: {', '.join(allowed)})" if allowed else ""
    return (
        f"custom policy {spec!r} is not allowed: loading it imports module {module!r} and runs "
        f"its code{listed}; to allow it, pass {ALLOW_FLAG} {module} to serve and validate"
    )


def read_policy(
    r: Reader, m: dict[str, Any], path: str, allowed: tuple[str, ...]
) -> tuple[str | None, Params | None]:
    """The pool's weight policy and its parameters, checked now so a typo names its place in
    the file instead of surfacing later as a log line from the weight engine."""
    spec = r.value(m, "policy", path, STRING, "headroom")
    raw = m.get("orca") or {}
    if not isinstance(raw, dict):
        r.problem(join(path, "orca"), f"expected a mapping, got {describe(raw)}")
        return spec, None
    try:
        params = parse_params(raw)
    except ParamError as err:
        for key, message in err.problems:
            r.problem(join(join(path, "orca"), key), message)
        return spec, None
    if spec is not None:
        refusal = _refusal(spec, allowed)
        try:
            if refusal is not None:
                raise PolicyError(refusal)
            load_policy(spec, params)
        except PolicyError as err:
            r.problem(join(path, "policy"), str(err))
            return None, params
    return spec, params
