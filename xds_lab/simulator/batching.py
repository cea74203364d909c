"""A continuous-batching engine modelled on vLLM's scheduler, stepping in simulated time.

One asyncio task runs the steps: the engine model (`steps`: realistic chunked prefill, or the
legacy model) plans a step and says what it costs in simulated seconds; the engine sleeps for
it, stretched by `time_scale`, the runtime `slowdown` and, in the realistic model, this
server's speed factor and the step's jitter (`variation`); then the model completes it.

The engine sleeps for the step instead of computing anything, so its CPU cost is a few
Python operations per running sequence per step. Step deadlines are kept on a schedule, so
the sleeps' small overshoots on a busy machine do not add up into a slower server.
`plan_step` and `finish_step` are the two halves of a step without the clock: the task runs
them around its sleep, and tests drive them directly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass, field

from xds_lab.simulator.options import BLOCK_TOKENS, LEGACY, SimulatorConfig
from xds_lab.simulator.sequence import Rejected, Sequence, blocks_for, fits_alone
from xds_lab.simulator.steps import ChunkedSteps, LegacySteps, StepModel
from xds_lab.simulator.variation import Variation

__all__ = [
    "RPS_WINDOW_S",
    "Engine",
    "EngineCounters",
    "EngineState",
    "Rejected",
    "Sequence",
    "blocks_for",
]

#: Seconds of finished requests behind the reported request rate (ORCA rps_fractional).
RPS_WINDOW_S = 5.0


@dataclass(frozen=True, slots=True)
class EngineState:
    running: int
    waiting: int
    used_blocks: int
    total_blocks: int
    slowdown: float
    speed_factor: float

    @property
    def kv_cache_usage(self) -> float:
        """Fraction 0..1 of KV blocks in use: what vLLM calls `kv_cache_usage_perc`."""
        return min(1.0, self.used_blocks / self.total_blocks)


@dataclass
class EngineCounters:
    """Running totals for the Prometheus counters, read at scrape time."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})


class Engine:
    """The queues, the KV cache and the clock; `config` and `slowdown` may change between
    steps, `engine_model` may not (a step model's state would not carry over)."""

    def __init__(self, config: SimulatorConfig, identity: str = "") -> None:
        self._config = config
        self._variation = Variation(identity, config)
        self._steps: StepModel = LegacySteps() if config.engine_model == LEGACY else ChunkedSteps()
        self.slowdown = 1.0
        self.counters = EngineCounters()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order: the newest is preempted first
        self._used_blocks = 0
        self._wake = asyncio.Event()
        self._finish_times: collections.deque[float] = collections.deque()
        self._started = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    @config.setter
    def config(self, config: SimulatorConfig) -> None:
        if config.engine_model != self._config.engine_model:
            raise ValueError("engine_model cannot change while the server runs")
        self._config = config
        self._variation.reseed(config)

    def start(self) -> None:
        """Start stepping, on the running event loop."""
        self._started = self.now()
        self._task = asyncio.create_task(self._run(), name="simulator-engine")

    async def stop(self) -> None:
        """Stop stepping and end every sequence with 503, so no handler waits forever."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        shutdown = Rejected(503, "the server is shutting down")
        for seq in [*self.running, *self.waiting]:
            self._end(seq, "abort", shutdown)
        self.running.clear()
        self.waiting.clear()
        self._used_blocks = 0

    def submit(self, prompt_tokens: int, max_tokens: int) -> Sequence:
        """Queue a request, or raise Rejected (400: can never fit, 503: queue full)."""
        if not fits_alone(prompt_tokens, max_tokens, self.total_blocks()):
            raise Rejected(
                400,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds what this "
                f"server's KV cache ({self.config.kv_cache_tokens} tokens) can hold",
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise Rejected(503, f"server overloaded: {len(self.waiting)} requests waiting")
        target = self._variation.output_tokens(self.config, max_tokens)
        seq = Sequence(prompt_tokens, max_tokens, target, arrival=self.now())
        self.waiting.append(seq)
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence whose client went away, freeing its cache; no-op once it ended."""
        if seq.done.is_set():
            return
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        self._end(seq, "abort", Rejected(499, "client disconnected"))

    @property
    def state(self) -> EngineState:
        return EngineState(
            running=len(self.running),
            waiting=len(self.waiting),
            used_blocks=self._used_blocks,
            total_blocks=self.total_blocks(),
            slowdown=self.slowdown,
            speed_factor=self._variation.speed_factor(self.config),
        )

    def finished_rps(self) -> float:
        """Requests finished per wall-clock second over the last RPS_WINDOW_S seconds."""
        now = self.now()
        self._forget_finishes(now)
        window = min(RPS_WINDOW_S, now - self._started)
        return len(self._finish_times) / window if window > 0 else 0.0

    # --- one step, without the clock -----------------------------------------------------

    def plan_step(self) -> float | None:
        """Schedule the next step: its wall-clock seconds, or None when nothing can run."""
        simulated = self._steps.schedule(self)
        if simulated is None:
            return None
        cfg = self.config
        return simulated * cfg.time_scale * self.slowdown * self._variation.step_factor(cfg)

    def finish_step(self) -> None:
        """The planned step's end: its tokens, its finished sequences."""
        self._steps.complete(self)

    async def _run(self) -> None:
        deadline = self.now()
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                deadline = self.now()
            step = self.plan_step()
            if step is None:
                continue
            now = self.now()
            # Catch up on at most one step of lag, never more: a stalled loop must not
            # turn into a burst of zero-length steps.
            deadline = max(deadline, now - step) + step
            await asyncio.sleep(deadline - now)
            self.finish_step()

    # --- for the step models ---------------------------------------------------------------

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def total_blocks(self) -> int:
        return self.config.kv_cache_tokens // BLOCK_TOKENS

    def free_blocks(self) -> int:
        """May be negative right after the cache was shrunk at runtime: preemption follows."""
        return self.total_blocks() - self._used_blocks

    def allocate(self, seq: Sequence, blocks: int) -> None:
        seq.blocks += blocks
        self._used_blocks += blocks

    def queue_head(self) -> Sequence | None:
        """The first waiting request, after ending those that no longer fit (the cache shrank)."""
        total = self.total_blocks()
        while self.waiting:
            seq = self.waiting[0]
            if fits_alone(seq.prompt_tokens, seq.max_tokens, total):
                return seq
            self.waiting.popleft()
            self._end(seq, "abort", Rejected(400, "request no longer fits the KV cache"))
        return None

    def admit(self, seq: Sequence, blocks: int) -> None:
        """Move the queue head into the batch with `blocks` of cache."""
        self.waiting.popleft()
        self.allocate(seq, blocks)
        self.running.append(seq)
        if not seq.prefilled:
            seq.prefilled = True
            self.counters.prompt_tokens += seq.prompt_tokens

    def preempt_newest(self) -> Sequence:
        """vLLM's recompute preemption: free the newest running sequence's cache and put it
        back at the front of the queue, to compute its whole context again."""
        victim = self.running.pop()
        self._release(victim)
        victim.computed = 0
        self.waiting.appendleft(victim)
        self.counters.preemptions += 1
        return victim

    def finish(self, seq: Sequence, now: float) -> None:
        """A sequence generated its last token (the caller drops it from `running`)."""
        self._release(seq)
        self._finish_times.append(now)
        self._forget_finishes(now)
        self._end(seq, "length" if seq.generated >= seq.max_tokens else "stop", None)

    # --- internals ---------------------------------------------------------------------------

    def _forget_finishes(self, now: float) -> None:
        while self._finish_times and self._finish_times[0] < now - RPS_WINDOW_S:
            self._finish_times.popleft()

    def _end(self, seq: Sequence, reason: str, error: Rejected | None) -> None:
        seq.finished_at = self.now()
        seq.finish_reason = reason
        seq.error = error
        self.counters.finished[reason] += 1
        seq.done.set()
        seq.progress.set()

    def _release(self, seq: Sequence) -> None:
        self._used_blocks -= seq.blocks
        seq.blocks = 0
