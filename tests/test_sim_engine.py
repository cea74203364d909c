"""The simulator's engine models, stepped without the clock (`plan_step` / `finish_step`).

Properties of the realistic model (context-dependent steps, chunked prefill, drawn output
lengths, seeded variation) over generated workloads, and the legacy model replayed step for
step against a trace recorded from the engine before issue 15.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import statistics
from collections.abc import Coroutine
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from xds_lab.simulator.batching import Engine
from xds_lab.simulator.model_server import start_servers
from xds_lab.simulator.options import PROFILES, SimulatorConfig

#: No jitter and no per-server speed: step costs are the formula's, exactly.
EXACT = {"step_jitter": 0.0, "speed_spread": 0.0}
#: Every answer runs to max_tokens.
FULL = {"output_median_fraction": 1.0, "output_sigma": 0.0}


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """The engine reads the event loop's clock: each example runs in a loop of its own."""
    return asyncio.run(coroutine)


def step(engine: Engine) -> float:
    """One whole step (the engine has work); its wall-clock seconds."""
    seconds = engine.plan_step()
    assert seconds is not None
    engine.finish_step()
    return seconds


def drain(engine: Engine, limit: int = 20_000) -> list[float]:
    durations = []
    for _ in range(limit):
        if not engine.running and not engine.waiting:
            return durations
        seconds = engine.plan_step()
        if seconds is not None:
            engine.finish_step()
            durations.append(seconds)
    raise AssertionError("the engine did not drain")


# --- legacy: the old model's numbers ---------------------------------------------------------

#: (arrival step, prompt tokens, max tokens): enough to queue, fill a 16-block cache, preempt.
SCENARIO = [(0, 100, 60), (0, 40, 90), (0, 120, 12), (0, 8, 3), (0, 150, 20),
            (2, 60, 25), (5, 200, 4), (9, 20, 140), (9, 90, 9), (40, 30, 50)]  # fmt: skip
#: The same replay of the engine at commit 89f17f9 (before issue 15), through its private
#: `_schedule`, `_step_seconds` and `_advance`: the legacy model must give the same numbers.
BEFORE_ISSUE_15 = {
    "steps": 259,
    "microseconds": 2232375,
    "preemptions": 1,
    "tokens": [818, 413],
    "finished_at_step": [60, 94, 72, 75, 114, 119, 123, 259, 132, 173],
    "digest": "239d036a0d115918",
}


async def legacy_replay(**knobs: Any) -> dict[str, Any]:
    config = SimulatorConfig.profile(
        "fast", engine_model="legacy", max_num_seqs=4, kv_cache_tokens=256, **knobs
    )
    engine = Engine(config, identity="legacy")
    seqs, trace, finished = {}, [], {}
    for at in range(1000):
        for index, (arrival, prompt, max_tokens) in enumerate(SCENARIO):
            if arrival == at:
                seqs[index] = engine.submit(prompt, max_tokens)
        if not engine.running and not engine.waiting:
            if len(seqs) == len(SCENARIO):
                break
            trace.append(None)
            continue
        seconds = engine.plan_step()
        if seconds is None:
            continue
        engine.finish_step()
        state = engine.state
        trace.append([round(seconds * 1e6, 3), state.running, state.waiting, state.used_blocks])
        for index, seq in seqs.items():
            if seq.done.is_set():
                finished.setdefault(index, len(trace))
    assert all(seq.finish_reason == "length" for seq in seqs.values())
    return {
        "steps": len(trace),
        "microseconds": round(sum(t[0] for t in trace if t)),
        "preemptions": engine.counters.preemptions,
        "tokens": [engine.counters.prompt_tokens, engine.counters.generation_tokens],
        "finished_at_step": [finished[i] for i in range(len(SCENARIO))],
        "digest": hashlib.sha256(json.dumps(trace).encode()).hexdigest()[:16],
    }


async def test_legacy_reproduces_the_old_model_step_for_step():
    assert await legacy_replay() == BEFORE_ISSUE_15
    # The realistic model's knobs do not reach the legacy one.
    knobs = {
        "seed": 7,
        "step_jitter": 0.4,
        "speed_spread": 0.3,
        "decode_step_per_kv_token_s": 1e-3,
        "max_num_batched_tokens": 1,
        "output_median_fraction": 0.1,
        "output_sigma": 2.0,
    }
    assert await legacy_replay(**knobs) == BEFORE_ISSUE_15


# --- realistic: step cost --------------------------------------------------------------------


async def decode_step(batch: int, prompt: int) -> float:
    """The first pure decode step of `batch` requests of `prompt` tokens each."""
    config = SimulatorConfig.profile(
        "fast", kv_cache_tokens=131072, max_num_batched_tokens=65536, **EXACT, **FULL
    )
    engine = Engine(config)
    for _ in range(batch):
        engine.submit(prompt, 50)
    step(engine)  # the prefill, and each request's first token
    return step(engine)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 16),
    prompt=st.integers(1, 1500),
    more_context=st.integers(16, 1500),
    more_seqs=st.integers(1, 16),
)
def test_decode_steps_grow_with_context_and_with_batch(batch, prompt, more_context, more_seqs):
    base = run(decode_step(batch, prompt))
    assert run(decode_step(batch, prompt + more_context)) > base
    assert run(decode_step(batch + more_seqs, prompt)) > base
    fast = PROFILES["fast"]
    formula = (
        fast["decode_step_base_s"]
        + fast["decode_step_per_seq_s"] * batch
        + fast["decode_step_per_kv_token_s"] * batch * (prompt + 1)  # prompt + its 1st token
    )
    assert math.isclose(base, formula, rel_tol=1e-9)


# --- realistic: chunked prefill --------------------------------------------------------------


async def interleave(budget: int, decoders: int, prompt: int) -> None:
    config = SimulatorConfig.profile(
        "fast", max_num_seqs=16, max_num_batched_tokens=budget, **EXACT, **FULL
    )
    engine = Engine(config)
    running = [engine.submit(10, 10_000) for _ in range(decoders)]
    while any(seq.generated == 0 for seq in running):
        step(engine)  # their prefill: from now on they decode
    long = engine.submit(prompt, 10)
    chunk = budget - decoders  # what the decodes leave of each step's budget
    for done in range(1, math.ceil(prompt / chunk) + 1):
        before = [seq.generated for seq in running]
        computed = long.computed
        seconds = step(engine)
        assert [seq.generated for seq in running] == [n + 1 for n in before]  # decodes go on
        assert long.computed == min(prompt, done * chunk)  # never more than the budget left
        assert (long.first_token_at is None) == (long.computed < prompt)
        prefill = (long.computed - computed) / config.prefill_tokens_per_s
        assert seconds > config.decode_step_base_s + prefill  # the chunk costs its prefill
    assert long.generated == 1 and long.computed == prompt


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(16, 512), decoders=st.integers(1, 8), chunks=st.integers(2, 6))
def test_a_long_prompt_is_prefilled_in_chunks_while_decodes_continue(budget, decoders, chunks):
    prompt = (budget - decoders) * chunks - budget // 3
    run(interleave(budget, decoders, prompt))


async def test_chunks_share_out_the_stall_a_long_prompt_puts_on_decodes():
    whole = SimulatorConfig.profile("fast", max_num_batched_tokens=8192, **EXACT, **FULL)
    chunked = SimulatorConfig.profile("fast", max_num_batched_tokens=256, **EXACT, **FULL)
    worst_gap = {}
    for name, config in (("whole", whole), ("chunked", chunked)):
        engine = Engine(config)
        engine.submit(10, 100)
        step(engine)
        engine.submit(4000, 5)
        worst_gap[name] = max(step(engine) for _ in range(20))
    # A 4000-token prefill in one step stalls every decode for it; chunks share the stall out.
    assert worst_gap["whole"] > 4000 / 16000 > 3 * worst_gap["chunked"]


# --- realistic: output lengths and seeds -----------------------------------------------------


async def targets(count: int, max_tokens: int, seed: int = 0, identity: str = "a", **kw: Any):
    engine = Engine(SimulatorConfig(seed=seed, **kw), identity=identity)
    return [engine.submit(1, max_tokens).target for _ in range(count)]


async def test_output_lengths_vary_below_max_tokens():
    lengths = await targets(2000, 100)
    assert min(lengths) >= 1 and max(lengths) == 100
    assert len(set(lengths)) > 50
    assert 40 <= statistics.median(lengths) <= 60  # output_median_fraction 0.5
    assert 0.1 < lengths.count(100) / len(lengths) < 0.3  # lognormal(sigma 0.8) above 2x median
    assert await targets(50, 100, engine_model="legacy") == [100] * 50


@settings(max_examples=60, deadline=None)
@given(
    max_tokens=st.integers(1, 5000),
    fraction=st.floats(0.01, 3.0),
    sigma=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**32),
)
def test_output_lengths_are_bounded_by_max_tokens(max_tokens, fraction, sigma, seed):
    kw = {"output_median_fraction": fraction, "output_sigma": sigma}
    lengths = run(targets(20, max_tokens, seed, **kw))
    assert all(1 <= n <= max_tokens for n in lengths)


async def jittered_run(seed: int, identity: str) -> tuple[list[int], list[float], float]:
    engine = Engine(SimulatorConfig(seed=seed, max_num_seqs=8), identity=identity)
    seqs = [engine.submit(20 + 7 * i, 40) for i in range(20)]
    durations = drain(engine)
    return [seq.generated for seq in seqs], durations, engine.state.speed_factor


async def test_the_same_seed_replays_the_same_run():
    lengths, durations, speed = await jittered_run(3, "sim-a")
    assert await jittered_run(3, "sim-a") == (lengths, durations, speed)
    other_seed, other_server = await jittered_run(4, "sim-a"), await jittered_run(3, "sim-b")
    assert other_seed[0] != lengths and other_server[0] != lengths
    assert other_seed[2] != speed and other_server[2] != speed
    assert len(set(durations)) > len(durations) // 2  # jitter: no two steps alike


async def test_servers_started_together_run_at_different_speeds():
    for config, spread in ((SimulatorConfig(), 0.05), (SimulatorConfig(engine_model="legacy"), 0)):
        servers = await start_servers(config, ports=(0, 0, 0))
        try:
            factors = [server.state.speed_factor for server in servers]
        finally:
            for server in servers:
                await server.stop()
        assert all(abs(f - 1) <= spread for f in factors)
        assert len(set(factors)) == (3 if spread else 1)


async def test_an_early_end_is_a_stop_and_counted_as_one():
    engine = Engine(SimulatorConfig(**EXACT), identity="stops")
    seqs = [engine.submit(5, 64) for _ in range(40)]
    drain(engine)
    reasons = {seq.finish_reason for seq in seqs if seq.generated < 64}
    assert reasons == {"stop"}
    assert all(seq.finish_reason == "length" for seq in seqs if seq.generated == 64)
    finished = engine.counters.finished
    assert finished["stop"] + finished["length"] == 40 and finished["stop"] > 0
    assert engine.counters.generation_tokens == sum(seq.generated for seq in seqs)


async def test_jitter_is_mean_one_around_the_servers_own_speed():
    config = SimulatorConfig(
        decode_step_per_kv_token_s=0.0, speed_spread=0.3, step_jitter=0.03, **FULL
    )
    engine = Engine(config, identity="jittery")
    engine.submit(10, 3000)
    durations = drain(engine)[1:]  # the decode steps, each the same by the formula
    formula = config.decode_step_base_s + config.decode_step_per_seq_s
    speed = engine.state.speed_factor
    assert speed != 1.0 and abs(speed - 1) <= 0.3
    ratios = [seconds * speed / formula for seconds in durations]
    assert abs(statistics.fmean(ratios) - 1) < 0.005
    assert 0.025 < statistics.stdev(math.log(r) for r in ratios) < 0.035
