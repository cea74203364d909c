"""How responsive the event loop stays while something runs: a 1 ms ticker's gaps.

Each gap between two ticks is measured twice: in wall time (`longest`), and in the loop
thread's own CPU time within it (`longest_busy`). Work done on the loop stalls it with
the thread busy for the whole gap; a machine busy with other processes also makes long
gaps, but with the loop thread idle (preempted). Tests assert on `longest_busy`, so a
loaded CI machine does not fail them, and report both.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass
class LoopWatch:
    gaps: list[float] = field(default_factory=list)  # wall seconds between ticks
    busy: list[float] = field(default_factory=list)  # loop-thread CPU seconds in each gap
    elapsed: float = 0.0

    @property
    def longest(self) -> float:
        return max(self.gaps, default=0.0)

    @property
    def longest_busy(self) -> float:
        return max(self.busy, default=0.0)


@contextlib.asynccontextmanager
async def watch_loop() -> AsyncIterator[LoopWatch]:
    """Ticks every millisecond while the block runs; `elapsed` is the block's duration.

    The cyclic GC is off meanwhile: a full collection pauses every thread wherever the
    garbage came from (measured: ~40 ms here), which is not the stall these tests are about.
    """
    watch = LoopWatch()
    stop = asyncio.Event()

    async def tick() -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now, cpu = time.perf_counter(), time.thread_time()
            watch.gaps.append(now - last)
            watch.busy.append(cpu - last_cpu)
            last, last_cpu = now, cpu

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


def cpu_seconds_of(work: Callable[[], object]) -> float:
    """The least CPU time of two calls of `work()` in this thread."""
    best = float("inf")
    for _ in range(2):
        started = time.thread_time()
        work()
        best = min(best, time.thread_time() - started)
    return best
