"""How responsive the event loop stays: the longest gap between the ticks of a 1 ms ticker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class LoopWatch:
    gaps: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def longest(self) -> float:
        return max(self.gaps, default=0.0)


@contextlib.asynccontextmanager
async def watch_loop() -> AsyncIterator[LoopWatch]:
    """Ticks every millisecond while the block runs; `longest` is the worst stall, `elapsed`
    the block's duration. The cyclic GC is off meanwhile: a full collection pauses every
    thread wherever the garbage came from (measured: ~40 ms here), which is not the stall
    a test of this kind is about."""
    watch = LoopWatch()
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            watch.gaps.append(now - last)
            last = now

    enabled = gc.isenabled()
    gc.disable()
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    try:
        yield watch
    finally:
        watch.elapsed = time.perf_counter() - started
        stop.set()
        await ticker
        if enabled:
            gc.enable()
