"""How the balancing benchmark's load is shaped and scored: its request lengths and the
latency summaries (the percentile itself is the load generator's, `xds_server.loadgen`).

Kept apart from the orchestration (`balance.py`) so the pieces a reader must trust are small,
pure and tested on their own. Sending (Poisson schedule, streaming, TTFT) is the product's
open-loop generator, `xds_server.loadgen`, which the demo uses too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from xds_lab.loadgen import OK, Outcome, RequestMix, percentile

#: Lengths for the benchmark's small simulated servers: short answers (the servers are slow
#: per token) and prompts that fit the slow profile's small KV cache with room to spare.
LENGTHS = RequestMix(
    prompt_tokens=200, output_tokens=48, spread=0.55, max_prompt_tokens=1200, max_output_tokens=256
)


def latency_summary(outcomes: Iterable[Outcome]) -> dict[str, float]:
    """p50/p95/p99 of end-to-end latency over every request (unanswered or failed ones as inf),
    and of time to first token over the streaming ones (a non-streaming answer's TTFT is its
    latency, already counted)."""
    done = list(outcomes)
    latencies = sorted(o.latency if o.status == OK else math.inf for o in done)
    ttfts = sorted(
        o.ttft - o.sent if o.status == OK else math.inf for o in done if o.request.stream
    )
    summary = {}
    for q in (50, 95, 99):
        summary[f"p{q}"] = percentile(latencies, q)
        summary[f"ttft_p{q}"] = percentile(ttfts, q)
    return summary
