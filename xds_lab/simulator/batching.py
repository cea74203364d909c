"""A continuous-batching engine modelled on vLLM's scheduler, stepping in simulated time.

One asyncio task runs the steps. Each step first gives every running sequence room in the
KV cache for its next token (preempting the most recently admitted sequence when the cache
is full: vLLM's recompute preemption, which frees its blocks and puts it back at the front
of the queue), then admits waiting requests first-come-first-served while a batch slot is
free and the cache holds the request's context + 1 block. The step lasts
`prefill + decode_step_base_s + decode_step_per_seq_s * running` and ends with one new token
for every running sequence; sequences with all their tokens leave the batch.

The engine sleeps for the step instead of computing anything, so its CPU cost is a few
Python operations per running sequence per step. Step deadlines are kept on a schedule, so
the sleeps' small overshoots on a busy machine do not add up into a slower server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass, field

from xds_lab.simulator.options import BLOCK_TOKENS, SimulatorConfig

#: Seconds of finished requests behind the reported request rate (ORCA rps_fractional).
RPS_WINDOW_S = 5.0


class Rejected(Exception):
    """A request the engine will not serve; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


def fits_alone(prompt_tokens: int, max_tokens: int, total_blocks: int) -> bool:
    """Whether the request can ever be admitted and finish, even with the cache to itself.

    Its largest context at admission (after a late preemption) is prompt + max_tokens - 1,
    and admission wants one block more than that context.
    """
    return blocks_for(prompt_tokens + max_tokens - 1) + 1 <= total_blocks


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Handlers wait on `progress` (set at every new token
    and at the end) or `done` (set once, at the end; `error` says why if not finished)."""

    prompt_tokens: int
    max_tokens: int
    arrival: float
    generated: int = 0
    blocks: int = 0
    prefilled: bool = False
    first_token_at: float | None = None
    finished_at: float | None = None
    error: Rejected | None = None
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def context(self) -> int:
        """Tokens the KV cache must hold for this sequence: prompt plus what it generated."""
        return self.prompt_tokens + self.generated


@dataclass(frozen=True, slots=True)
class EngineState:
    running: int
    waiting: int
    used_blocks: int
    total_blocks: int
    slowdown: float

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
    finished: dict[str, int] = field(default_factory=lambda: {"length": 0, "abort": 0})


class Engine:
    """The scheduler and its KV cache. `config` and `slowdown` may change between steps."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.slowdown = 1.0
        self.counters = EngineCounters()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []  # admission order: the newest is preempted first
        self._used_blocks = 0
        self._wake = asyncio.Event()
        self._finish_times: collections.deque[float] = collections.deque()
        self._started = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start stepping, on the running event loop."""
        self._started = self._now()
        self._task = asyncio.create_task(self._run(), name="simulator-engine")

    async def stop(self) -> None:
        """Stop stepping and end every sequence with 503, so no handler waits forever."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        shutdown = Rejected(503, "the server is shutting down")
        for seq in [*self._running, *self._waiting]:
            self._end(seq, "abort", shutdown)
        self._running.clear()
        self._waiting.clear()
        self._used_blocks = 0

    def submit(self, prompt_tokens: int, max_tokens: int) -> Sequence:
        """Queue a request, or raise Rejected (400: can never fit, 503: queue full)."""
        if not fits_alone(prompt_tokens, max_tokens, self._total_blocks()):
            raise Rejected(
                400,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds what this "
                f"server's KV cache ({self.config.kv_cache_tokens} tokens) can hold",
            )
        if len(self._waiting) >= self.config.max_waiting:
            raise Rejected(503, f"server overloaded: {len(self._waiting)} requests waiting")
        seq = Sequence(prompt_tokens, max_tokens, arrival=self._now())
        self._waiting.append(seq)
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence whose client went away, freeing its cache; no-op once it ended."""
        if seq.done.is_set():
            return
        if seq in self._running:
            self._running.remove(seq)
            self._release(seq)
        else:
            self._waiting.remove(seq)
        self._end(seq, "abort", Rejected(499, "client disconnected"))

    @property
    def state(self) -> EngineState:
        return EngineState(
            running=len(self._running),
            waiting=len(self._waiting),
            used_blocks=self._used_blocks,
            total_blocks=self._total_blocks(),
            slowdown=self.slowdown,
        )

    def finished_rps(self) -> float:
        """Requests finished per wall-clock second over the last RPS_WINDOW_S seconds."""
        now = self._now()
        self._forget_finishes(now)
        window = min(RPS_WINDOW_S, now - self._started)
        return len(self._finish_times) / window if window > 0 else 0.0

    async def _run(self) -> None:
        deadline = self._now()
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                deadline = self._now()
            prefill_tokens = self._schedule()
            if not self._running:
                continue  # the queue head could never fit and was dropped
            step = self._step_seconds(prefill_tokens)
            now = self._now()
            # Catch up on at most one step of lag, never more: a stalled loop must not
            # turn into a burst of zero-length steps.
            deadline = max(deadline, now - step) + step
            await asyncio.sleep(deadline - now)
            self._advance()

    def _step_seconds(self, prefill_tokens: int) -> float:
        cfg = self.config
        simulated = (
            prefill_tokens / cfg.prefill_tokens_per_s
            + cfg.decode_step_base_s
            + cfg.decode_step_per_seq_s * len(self._running)
        )
        return simulated * cfg.time_scale * self.slowdown

    def _schedule(self) -> int:
        """Make room for this step's tokens, then admit; returns the prompt tokens to prefill.

        Like vLLM, nothing new is admitted in a step that had to preempt.
        """
        if self._grow_running():
            return 0
        return self._admit()

    def _grow_running(self) -> bool:
        """Reserve each running sequence's next token, oldest first; True if any was preempted."""
        preempted = False
        index = 0
        while index < len(self._running):
            seq = self._running[index]
            need = blocks_for(seq.context + 1) - seq.blocks
            if self._free_blocks() >= need:
                self._allocate(seq, need)
                index += 1
            else:  # evict the newest; when that is `seq` itself the loop ends
                victim = self._running.pop()
                self._release(victim)
                self._waiting.appendleft(victim)
                self.counters.preemptions += 1
                preempted = True
        return preempted

    def _admit(self) -> int:
        prefill = 0
        total = self._total_blocks()
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            seq = self._waiting[0]
            if not fits_alone(seq.prompt_tokens, seq.max_tokens, total):  # cache shrank
                self._waiting.popleft()
                self._end(seq, "abort", Rejected(400, "request no longer fits the KV cache"))
                continue
            if self._free_blocks() < blocks_for(seq.context) + 1:
                break  # first-come-first-served: the head waits, and so does everyone else
            self._waiting.popleft()
            self._allocate(seq, blocks_for(seq.context + 1))
            self._running.append(seq)
            prefill += seq.context  # a preempted sequence recomputes its output too
            if not seq.prefilled:
                seq.prefilled = True
                self.counters.prompt_tokens += seq.prompt_tokens
        return prefill

    def _advance(self) -> None:
        """The step's end: one token for every running sequence; finished ones leave."""
        now = self._now()
        still_running = []
        for seq in self._running:
            seq.generated += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            if seq.generated >= seq.max_tokens:
                self._release(seq)
                self._finish_times.append(now)
                self._end(seq, "length", None)
            else:
                seq.progress.set()
                still_running.append(seq)
        self.counters.generation_tokens += len(self._running)
        self._running = still_running
        self._forget_finishes(now)

    def _forget_finishes(self, now: float) -> None:
        while self._finish_times and self._finish_times[0] < now - RPS_WINDOW_S:
            self._finish_times.popleft()

    def _end(self, seq: Sequence, reason: str, error: Rejected | None) -> None:
        seq.finished_at = self._now()
        seq.error = error
        self.counters.finished[reason] += 1
        seq.done.set()
        seq.progress.set()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _total_blocks(self) -> int:
        return self.config.kv_cache_tokens // BLOCK_TOKENS

    def _free_blocks(self) -> int:
        """May be negative right after the cache was shrunk at runtime: preemption follows."""
        return self._total_blocks() - self._used_blocks

    def _allocate(self, seq: Sequence, blocks: int) -> None:
        seq.blocks += blocks
        self._used_blocks += blocks

    def _release(self, seq: Sequence) -> None:
        self._used_blocks -= seq.blocks
        seq.blocks = 0
