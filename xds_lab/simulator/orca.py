"""The ORCA `endpoint-load-metrics` response header: what vLLM sends, and what it could send.

What vLLM sends (`vllm/entrypoints/openai/orca_metrics.py`, since moved to
`vllm/entrypoints/serve/utils/orca_metrics.py`; `create_orca_header`, `metrics_header`,
`get_named_metrics_from_prometheus`): a request carrying `endpoint-load-metrics-format: TEXT`
or `JSON` gets, for TEXT,

    endpoint-load-metrics: TEXT named_metrics.kv_cache_usage_perc=0.42, named_metrics.num_r...

(`named_metrics.NAME=VALUE` joined by ", ") or, for JSON,
`endpoint-load-metrics: JSON {"named_metrics": {"kv_cache_usage_perc": 0.42, ...}}`; any other
format gets no header. The named metrics are exactly two Prometheus gauges,
`vllm:kv_cache_usage_perc` (a fraction 0..1 despite the name: "KV-cache usage. 1 means 100
percent usage.") and `vllm:num_requests_waiting`: no `num_requests_running`, no top-level
OrcaLoadReport field (cpu/mem/application utilization, rps_fractional). Only a complete,
non-streamed answer carries it: the completions and chat routes attach `metrics_header()` to
their `JSONResponse` and return a `StreamingResponse` (and errors) without it. Envoy 1.40 parses
both prefixes; TEXT entries are split on commas with surrounding spaces dropped.

`SIGNALS` are the simulator's modes (`--orca-signals`):

    vllm          exactly the above
    vllm-streams  the same two named metrics on streamed answers too (the simulator before
                  issue 15 did this)
    cswrr         vllm-streams plus `application_utilization` (batch occupancy: running + waiting
                  over max_num_seqs) and `rps_fractional` (finished requests per second):
                  Envoy's client_side_weighted_round_robin drops every report without a
                  positive rps_fractional, so with vLLM's own report it never weighs at all;
                  this mode is CS-WRR "helped by the simulator"
    cswrr-kv      vllm-streams plus `rps_fractional` only: CS-WRR then takes the utilization
                  from its metric_names_for_computing_utilization (the KV-cache fraction)
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["HEADER", "SIGNALS", "VLLM", "on_streams", "orca_header", "utilization_fields"]

HEADER = "endpoint-load-metrics"
VLLM = "vllm"
SIGNALS = (VLLM, "vllm-streams", "cswrr", "cswrr-kv")


def on_streams(signals: str) -> bool:
    """Whether a streamed answer carries the report in this mode (vLLM: never)."""
    return signals != VLLM


def utilization_fields(signals: str, occupancy: float, rps: float) -> dict[str, float]:
    """The top-level OrcaLoadReport fields this mode adds to the named metrics."""
    if signals == "cswrr":
        return {"application_utilization": occupancy, "rps_fractional": rps}
    if signals == "cswrr-kv":
        return {"rps_fractional": rps}
    return {}


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
