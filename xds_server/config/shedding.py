"""A pool's `shedding:` key: whether Envoy may refuse part of its traffic when it is saturated.

Off unless written: shedding turns the latency of an overloaded pool into 503s that
clients see, a trade the operator makes per pool (lrs.weights.shedding has the law).
`shedding: true` takes the defaults; a mapping sets `max_drop` (the largest fraction
refused, 0 < max_drop < 1) and `settle` (seconds between two changes). The controller
reads the load reports, so only a pool with `weighting: orca` can shed.
"""

from __future__ import annotations

from typing import Any, Final

from lrs.weights.shedding import Shedding
from xds_server.config.problems import NUMBER, Reader, describe, join

__all__ = ["SHEDDING_KEYS", "read_shedding"]

SHEDDING_KEYS: Final = ("max_drop", "settle")


def read_shedding(
    r: Reader, m: dict[str, Any], path: str, weighting: str | None
) -> tuple[bool, Shedding | None]:
    """(ok, settings) for the pool at `path`: settings None when it does not shed; ok False
    when the key has problems (recorded, each naming its place)."""
    here = join(path, "shedding")
    value = m.get("shedding")
    if value is None or value is False:
        return True, None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        r.problem(
            here,
            f"expected true, false or a mapping with keys max_drop, settle; got {describe(value)}",
        )
        return False, None
    if r.mapping(value, here, SHEDDING_KEYS) is None:
        return False, None
    problems = len(r.problems)
    default = Shedding()
    max_drop = r.value(value, "max_drop", here, NUMBER, default.max_drop)
    if max_drop is not None and not 0 < max_drop < 1:
        r.problem(
            join(here, "max_drop"),
            f"expected a fraction of requests above 0 and below 1, got {max_drop!r}",
        )
    settle = r.seconds(
        value, "settle", here, default.settle, 0, " (time between two changes of the fraction)"
    )
    if weighting is not None and weighting != "orca":
        r.problem(
            here,
            "shedding decides from load reports: set weighting: orca on this pool, "
            "or remove shedding",
        )
    if len(r.problems) > problems or max_drop is None or settle is None:
        return False, None
    return True, Shedding(float(max_drop), settle)
