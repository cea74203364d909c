"""The open-loop load of the balancing benchmark: what is sent, when, and how it is scored.

Kept apart from the orchestration (`balance.py`) so the pieces a reader must trust (the Poisson
schedule, the request mix, the percentiles) are small, pure and tested on their own.

Open loop: requests leave on a precomputed Poisson schedule whatever the answers do, as users'
requests do, so a strategy that lets queues grow is charged with the latency (a closed loop
would slow its own arrivals down and hide it).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp

from xds_server.loadgen import RequestMix

OK, ERROR, TIMEOUT = "ok", "error", "timeout"


#: Lengths for the benchmark's small simulated servers: short answers (the servers are slow
#: per token) and prompts that fit the slow profile's small KV cache with room to spare.
LENGTHS = RequestMix(
    prompt_tokens=200, output_tokens=48, spread=0.55, max_prompt_tokens=1200, max_output_tokens=256
)


@dataclass(frozen=True, slots=True)
class Mix:
    """The demo load's lognormal lengths (`RequestMix`), plus a share of streaming requests."""

    lengths: RequestMix = LENGTHS
    stream_share: float = 0.3

    def draw(self, rng: random.Random) -> tuple[int, int, bool]:
        prompt, output = self.lengths.draw(rng)
        return prompt, output, rng.random() < self.stream_share


@dataclass(frozen=True, slots=True)
class Request:
    at: float  # seconds after the phase starts
    prompt_tokens: int
    max_tokens: int
    stream: bool


def poisson_schedule(rate: float, duration: float, rng: random.Random, mix: Mix) -> list[Request]:
    """Arrivals of a Poisson process of `rate` per second over [0, duration)."""
    if rate <= 0.0:
        return []
    schedule = []
    at = rng.expovariate(rate)
    while at < duration:
        schedule.append(Request(at, *mix.draw(rng)))
        at += rng.expovariate(rate)
    return schedule


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it; times are `time.monotonic()` seconds."""

    request: Request
    sent: float  # when it left
    lag: float  # how late it left against the schedule: the generator's own delay
    status: str = TIMEOUT  # stays TIMEOUT unless answered in time
    finished: float = math.inf
    ttft: float = math.inf
    output_tokens: int = 0
    upstream: str | None = None

    @property
    def latency(self) -> float:
        return self.finished - self.sent


def body(request: Request, model: str) -> dict:
    """A completions request; `prompt_tokens` (the simulator's extension) sets the length."""
    payload: dict = {
        "model": model,
        "prompt": "x",
        "prompt_tokens": request.prompt_tokens,
        "max_tokens": request.max_tokens,
    }
    if request.stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return payload


async def send(
    session: aiohttp.ClientSession, url: str, outcome: Outcome, model: str, timeout: float
) -> None:
    """Send one request and fill in `outcome`; a timeout or cancellation leaves it TIMEOUT."""
    request = outcome.request
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, json=body(request, model)) as resp:
                outcome.upstream = resp.headers.get("x-upstream")
                if resp.status != 200:
                    await resp.read()
                    outcome.status, outcome.finished = ERROR, time.monotonic()
                    return
                if request.stream:
                    await _read_stream(resp, outcome)
                else:
                    answer = await resp.json()
                    outcome.finished = outcome.ttft = time.monotonic()
                    outcome.output_tokens = answer["usage"]["completion_tokens"]
                    outcome.status = OK
    except TimeoutError:
        return
    except aiohttp.ClientError:
        outcome.status, outcome.finished = ERROR, time.monotonic()


async def _read_stream(resp: aiohttp.ClientResponse, outcome: Outcome) -> None:
    """Server-sent events: the first event is the first token; the usage event counts them."""
    failed = False
    async for line in resp.content:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        if outcome.ttft == math.inf:
            outcome.ttft = time.monotonic()
        if b'"error"' in line:
            failed = True
        elif b'"usage"' in line:
            outcome.output_tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    outcome.finished = time.monotonic()
    outcome.status = ERROR if failed or not outcome.output_tokens else OK


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of sorted values; inf entries stand for requests
    never answered, so a percentile that lands on one is inf: "over the cut-off"."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(values)))
    return values[rank - 1]


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
