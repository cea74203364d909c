"""The two engine models: what one step schedules, what it costs, what it produces.

`ChunkedSteps` (the realistic model) follows vLLM's V1 scheduler (`vllm/v1/core/sched/
scheduler.py`): every step has a budget of `max_num_batched_tokens`. Running sequences go
first, oldest first: a decoding one takes 1 token, one still prefilling (or recomputing after
a preemption) takes what remains of its context, capped by the budget left. A sequence whose
next tokens find no free KV block preempts the newest running one (recompute: its blocks are
freed, its computed tokens forgotten, it goes back to the front of the queue), itself if it
is the newest. Then, unless that step preempted, waiting requests are admitted first come first
served while a batch slot, budget and KV blocks for their first chunk remain: a long prompt is
prefilled over several steps while the decodes go on. A step costs

    prefill tokens / prefill_tokens_per_s + decode_step_base_s
        + decode_step_per_seq_s * sequences in the batch
        + decode_step_per_kv_token_s * tokens of context they attend to

and a sequence whose whole context is computed at its end gets one new token.

`LegacySteps` is the model before issue 15, unchanged: room for every running sequence's
next token (preempting the newest), then whole-prompt admission while the cache holds the
prompt + 1 block; the step costs `prefill + decode_step_base_s + decode_step_per_seq_s *
running` and every running sequence gets a token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from xds_lab.simulator.sequence import Sequence, blocks_for

if TYPE_CHECKING:
    from xds_lab.simulator.batching import Engine

__all__ = ["ChunkedSteps", "LegacySteps", "StepModel"]


class StepModel(Protocol):
    def schedule(self, engine: Engine) -> float | None:
        """Plan the next step: its simulated seconds, or None when nothing can run."""

    def complete(self, engine: Engine) -> None:
        """The planned step's end: new tokens, finished sequences."""


class LegacySteps:
    def schedule(self, engine: Engine) -> float | None:
        # Like vLLM, nothing new is admitted in a step that had to preempt.
        prefill = 0 if self._grow_running(engine) else self._admit(engine)
        if not engine.running:
            return None  # the queue head could never fit and was dropped
        cfg = engine.config
        return (
            prefill / cfg.prefill_tokens_per_s
            + cfg.decode_step_base_s
            + cfg.decode_step_per_seq_s * len(engine.running)
        )

    def complete(self, engine: Engine) -> None:
        now = engine.now()
        for seq in engine.running:
            seq.generated += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            if seq.generated >= seq.target:
                engine.finish(seq, now)
            else:
                seq.progress.set()
        engine.counters.generation_tokens += len(engine.running)
        engine.running = [seq for seq in engine.running if not seq.done.is_set()]

    @staticmethod
    def _grow_running(engine: Engine) -> bool:
        """Reserve each running sequence's next token, oldest first; True if any was preempted."""
        preempted = False
        index = 0
        while index < len(engine.running):
            seq = engine.running[index]
            need = blocks_for(seq.context + 1) - seq.blocks
            if engine.free_blocks() >= need:
                engine.allocate(seq, need)
                index += 1
            else:  # evict the newest; when that is `seq` itself the loop ends
                engine.preempt_newest()
                preempted = True
        return preempted

    @staticmethod
    def _admit(engine: Engine) -> int:
        """Admit whole prompts; returns the tokens to prefill."""
        prefill = 0
        while len(engine.running) < engine.config.max_num_seqs:
            seq = engine.queue_head()
            if seq is None or engine.free_blocks() < blocks_for(seq.context) + 1:
                break  # first-come-first-served: the head waits, and so does everyone else
            engine.admit(seq, blocks_for(seq.context + 1))
            prefill += seq.context  # a preempted sequence recomputes its output too
        return prefill


class ChunkedSteps:
    def __init__(self) -> None:
        self._batch: list[tuple[Sequence, int]] = []  # (sequence, tokens computed this step)

    def schedule(self, engine: Engine) -> float | None:
        cfg = engine.config
        batch: list[tuple[Sequence, int]] = []
        budget = cfg.max_num_batched_tokens
        preempted = False
        index = 0
        while index < len(engine.running) and budget > 0:
            seq = engine.running[index]
            tokens = min(seq.context - seq.computed, budget)
            need = blocks_for(seq.computed + tokens) - seq.blocks
            if engine.free_blocks() >= need:
                engine.allocate(seq, need)
                batch.append((seq, tokens))
                budget -= tokens
                index += 1
            else:  # evict the newest (not yet scheduled); when that is `seq` the loop ends
                engine.preempt_newest()
                preempted = True
        while not preempted and budget > 0 and len(engine.running) < cfg.max_num_seqs:
            head = engine.queue_head()
            if head is None:
                break
            tokens = min(head.context, budget)
            if engine.free_blocks() < blocks_for(tokens):
                break  # first-come-first-served: the head waits, and so does everyone else
            engine.admit(head, blocks_for(tokens))
            batch.append((head, tokens))
            budget -= tokens
        self._batch = batch
        return self._seconds(engine, batch) if batch else None

    @staticmethod
    def _seconds(engine: Engine, batch: list[tuple[Sequence, int]]) -> float:
        cfg = engine.config
        prefill = sum(
            tokens
            for seq, tokens in batch
            if seq.generated == 0 or seq.context - seq.computed > 1  # not a plain decode
        )
        attended = sum(seq.computed + tokens for seq, tokens in batch)
        return (
            prefill / cfg.prefill_tokens_per_s
            + cfg.decode_step_base_s
            + cfg.decode_step_per_seq_s * len(batch)
            + cfg.decode_step_per_kv_token_s * attended
        )

    def complete(self, engine: Engine) -> None:
        now = engine.now()
        for seq, tokens in self._batch:
            if seq.done.is_set():
                continue  # aborted while the step ran
            seq.computed += tokens
            if seq.computed < seq.context:
                continue  # a prefill chunk: no token yet
            seq.generated += 1
            engine.counters.generation_tokens += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            if seq.generated >= seq.target:
                engine.finish(seq, now)
            else:
                seq.progress.set()
        self._batch = []
        engine.running = [seq for seq in engine.running if not seq.done.is_set()]
