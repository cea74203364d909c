"""One request inside the engine, and the KV-cache arithmetic both engine models share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from xds_lab.simulator.options import BLOCK_TOKENS

__all__ = ["Rejected", "Sequence", "blocks_for", "fits_alone"]


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
    and at the end) or `done` (set once, at the end; `error` says why if not finished).

    `target` is how many tokens it will generate: `max_tokens` in the legacy model, a drawn
    length up to it in the realistic one (an earlier end is vLLM's finish_reason "stop").
    `computed` counts the tokens whose KV the realistic model has computed: a prefill may
    take several steps, and a recompute after preemption starts again from zero.
    """

    prompt_tokens: int
    max_tokens: int
    target: int
    arrival: float
    generated: int = 0
    computed: int = 0
    blocks: int = 0
    prefilled: bool = False
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    error: Rejected | None = None
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def context(self) -> int:
        """Tokens the KV cache must hold for this sequence: prompt plus what it generated."""
        return self.prompt_tokens + self.generated
