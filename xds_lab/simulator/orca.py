"""The ORCA `endpoint-load-metrics` response header, in vLLM's formats.

vLLM (`vllm/entrypoints/openai/orca_metrics.py`, `create_orca_header`) answers a request
carrying `endpoint-load-metrics-format: TEXT` or `JSON` with, for TEXT,

    endpoint-load-metrics: TEXT named_metrics.kv_cache_usage_perc=0.42, named_metrics.num_r...

(`named_metrics.NAME=VALUE` joined by ", ") or, for JSON,
`endpoint-load-metrics: JSON {"named_metrics": {"kv_cache_usage_perc": 0.42, ...}}`; any other
format gets no header. Its values are the Prometheus gauges `vllm:kv_cache_usage_perc` (a
fraction 0..1 despite the name: "KV-cache usage. 1 means 100 percent usage.") and
`vllm:num_requests_waiting`. Envoy 1.40 parses both prefixes; TEXT entries are split on
commas with surrounding spaces dropped.

With `orca_rps` the report also carries `application_utilization` and `rps_fractional`,
which vLLM never sends but Envoy's client_side_weighted_round_robin needs (it drops reports
without a positive qps).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

HEADER = "endpoint-load-metrics"


def orca_header(
    requested: str | None,
    named: Mapping[str, float],
    utilization: Mapping[str, float],
) -> dict[str, str]:
    """The response header for a request's `endpoint-load-metrics-format` value.

    `named`: named metrics without the `named_metrics.` prefix; `utilization`: top-level
    OrcaLoadReport fields (application_utilization, rps_fractional), possibly empty.
    """
    fmt = (requested or "").strip().upper()
    if fmt == "TEXT":
        entries = [f"named_metrics.{name}={float(value)}" for name, value in named.items()]
        entries += [f"{name}={float(value)}" for name, value in utilization.items()]
        return {HEADER: "TEXT " + ", ".join(entries)}
    if fmt == "JSON":
        report = {**{k: float(v) for k, v in utilization.items()}, "named_metrics": named}
        return {HEADER: "JSON " + json.dumps(report)}
    return {}
