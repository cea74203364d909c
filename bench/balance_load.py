"""How the balancing benchmark's load is shaped and scored: its request lengths (a heavy-tailed
mix of three kinds of traffic) and the latency summaries (the percentile itself is the load
generator's, `xds_lab.loadgen`).

Kept apart from the orchestration (`balance.py`) so the pieces a reader must trust are small,
pure and tested on their own. Sending (Poisson schedule, streaming, TTFT) is the lab's
open-loop generator, `xds_lab.loadgen`, which the demo uses too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from xds_lab.loadgen import OK, Outcome, RequestMix, percentile

__all__ = ["MIX", "Kind", "LengthMix", "latency_summary"]


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of request in the mix: its share and its lognormal lengths."""

    name: str
    share: float
    lengths: RequestMix


@dataclass(frozen=True, slots=True)
class LengthMix:
    """A mixture of request kinds, drawn per request, plus a share of streaming requests.

    One lognormal (the lab's `Mix`) has a light tail: its p99 is a few times its median.
    Real LLM traffic mixes short chat turns with long-context (RAG) prompts and long answers,
    and that mixture is what makes a server's load depend on *which* requests it got, not
    only how many: the case where counting requests in flight (least request) is not enough.
    Same `draw` as `xds_lab.loadgen.Mix`, so `poisson_schedule` takes either.
    """

    kinds: tuple[Kind, ...]
    stream_share: float = 0.3

    def __post_init__(self) -> None:
        if not math.isclose(sum(k.share for k in self.kinds), 1.0):
            raise ValueError(f"kind shares must add up to 1, not {[k.share for k in self.kinds]}")

    def draw(self, rng: random.Random) -> tuple[int, int, bool]:
        pick = rng.random()
        kind = self.kinds[-1]
        for candidate in self.kinds:
            if pick < candidate.share:
                kind = candidate
                break
            pick -= candidate.share
        prompt, output = kind.lengths.draw(rng)
        return prompt, output, rng.random() < self.stream_share

    @property
    def largest(self) -> tuple[int, int]:
        """The longest prompt and answer any request may have: every server must fit both."""
        return (
            max(k.lengths.max_prompt_tokens for k in self.kinds),
            max(k.lengths.max_output_tokens for k in self.kinds),
        )

    def quantiles(self, draws: int = 20_000, seed: int = 0) -> dict[str, dict[str, int]]:
        """p50/p90/p99/max of prompt and output lengths over `draws` requests (for the record)."""
        rng = random.Random(seed)
        samples = [self.draw(rng) for _ in range(draws)]
        out = {}
        for index, name in ((0, "prompt"), (1, "output")):
            values = sorted(float(s[index]) for s in samples)
            out[name] = {f"p{q}": int(percentile(values, q)) for q in (50, 90, 99, 100)}
        return out


#: Short chat turns, long-context prompts (retrieval, documents) and long answers (code,
#: summaries): the mean prompt is ~1.6x the median and p99/p50 ~6 for prompts and outputs.
#: Sized for the benchmark's small simulated servers: the largest request (1,200 + 300 tokens)
#: fits the smallest KV cache with room to spare.
MIX = LengthMix(
    kinds=(
        Kind("chat", 0.7, RequestMix(150, 40, 0.6, max_prompt_tokens=1200, max_output_tokens=300)),
        Kind("long-context", 0.2, RequestMix(600, 60, 0.45, 1200, 300)),
        Kind("long-answer", 0.1, RequestMix(200, 180, 0.5, 1200, 300)),
    )
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
