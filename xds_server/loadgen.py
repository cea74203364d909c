"""Open-loop LLM traffic: Poisson arrivals of completions with a mix of prompt and output lengths.

Open loop on purpose: a request is sent when its arrival time comes, whatever became of
the earlier ones, as independent users do. A closed loop (send the next when the last is
answered) slows its clients down when a server slows, which hides the queueing that load
balancing is there to avoid.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp


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
class Outcome:
    """One request as the client saw it."""

    sent: float  # monotonic time it was sent
    latency: float  # seconds until the whole answer arrived (or the failure)
    status: int  # HTTP status; 0 for a timeout or a connection error
    upstream: str | None  # the answering server's `x-upstream-port`, if any
    output_tokens: int


class OpenLoopLoad:
    """Sends `rate` requests per second on average to an OpenAI completions URL.

    `rate` may be changed while running. Each outcome is handed to `on_outcome`.
    Deterministic for a seed: the same arrival gaps and token counts.
    """

    def __init__(
        self,
        url: str,
        rate: float,
        on_outcome: Callable[[Outcome], None],
        mix: RequestMix | None = None,
        model: str = "llama-3-8b",
        timeout: float = 30.0,
        seed: int = 0,
    ) -> None:
        self.url = url
        self.rate = rate
        self.on_outcome = on_outcome
        self.mix = mix or RequestMix()
        self.model = model
        self.timeout = timeout
        self._rng = random.Random(seed)
        self.in_flight = 0

    async def run(self, duration: float) -> None:
        """Send for `duration` seconds, then wait (at most `timeout`) for the answers."""
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            started = time.monotonic()
            due = started
            while True:
                due += self._rng.expovariate(self.rate) if self.rate > 0 else 0.1
                if due - started >= duration:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if self.rate <= 0:
                    continue
                prompt, output = self.mix.draw(self._rng)
                task = asyncio.create_task(self._one(session, prompt, output))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=self.timeout)

    async def _one(self, session: aiohttp.ClientSession, prompt: int, output: int) -> None:
        body = {"model": self.model, "prompt_tokens": prompt, "max_tokens": output}
        sent = time.monotonic()
        status, upstream = 0, None
        self.in_flight += 1
        try:
            async with session.post(self.url, json=body) as response:
                await response.read()
                status, upstream = response.status, response.headers.get("x-upstream-port")
        except (TimeoutError, aiohttp.ClientError):
            pass
        finally:
            self.in_flight -= 1
        self.on_outcome(
            Outcome(sent, time.monotonic() - sent, status, upstream, output if status == 200 else 0)
        )
