"""Open-loop LLM traffic: Poisson arrivals of completions with a mix of prompt and output lengths,
some streaming, and what each request met (status, latency, time to first token, server).

Open loop on purpose: a request is sent when its arrival time comes, whatever became of
the earlier ones, as independent users do. A closed loop (send the next when the last is
answered) slows its clients down when a server slows, which hides the queueing that load
balancing is there to avoid.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

OK, ERROR, TIMEOUT = "ok", "error", "timeout"


@dataclass(frozen=True, slots=True)
class RequestMix:
    """Token counts drawn per request: lognormal, as prompt and reply lengths of chat traffic
    are (a long tail of long prompts), clipped to what the servers accept."""

    prompt_tokens: int = 200  # median
    output_tokens: int = 100  # median
    spread: float = 0.5  # sigma of log(length)
    max_prompt_tokens: int = 1500
    max_output_tokens: int = 400

    def draw(self, rng: random.Random) -> tuple[int, int]:
        prompt = rng.lognormvariate(math.log(self.prompt_tokens), self.spread)
        output = rng.lognormvariate(math.log(self.output_tokens), self.spread)
        return (
            max(1, min(self.max_prompt_tokens, round(prompt))),
            max(1, min(self.max_output_tokens, round(output))),
        )


@dataclass(frozen=True, slots=True)
class Mix:
    """Lognormal lengths (`RequestMix`), plus a share of streaming requests."""

    lengths: RequestMix = RequestMix()
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


def body(request: Request, model: str) -> dict[str, Any]:
    """A completions request; `prompt_tokens` (the simulator's extension) sets the length."""
    payload: dict[str, Any] = {
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


class OpenLoopLoad:
    """Sends `rate` requests per second on average to an OpenAI completions URL.

    Each outcome is handed to `on_outcome` when known. Deterministic for a seed: the same
    arrival times and token counts.
    """

    def __init__(
        self,
        url: str,
        rate: float,
        on_outcome: Callable[[Outcome], None],
        mix: Mix | None = None,
        model: str = "llama-3-8b",
        timeout: float = 30.0,
        seed: int = 0,
    ) -> None:
        self.url = url
        self.rate = rate
        self.on_outcome = on_outcome
        self.mix = mix or Mix(stream_share=0.0)
        self.model = model
        self.timeout = timeout
        self._rng = random.Random(seed)
        self.in_flight = 0

    async def run(self, duration: float) -> None:
        """Send for `duration` seconds, then wait (at most `timeout`) for the answers."""
        connector = aiohttp.TCPConnector(limit=0)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=connector) as session:
            started = time.monotonic()
            for request in poisson_schedule(self.rate, duration, self._rng, self.mix):
                await asyncio.sleep(max(0.0, started + request.at - time.monotonic()))
                now = time.monotonic()
                outcome = Outcome(request, sent=now, lag=now - started - request.at)
                task = asyncio.create_task(self._one(session, outcome))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=self.timeout)

    async def _one(self, session: aiohttp.ClientSession, outcome: Outcome) -> None:
        self.in_flight += 1
        try:
            await send(session, self.url, outcome, self.model, self.timeout)
        finally:
            self.in_flight -= 1
        self.on_outcome(outcome)
