"""The vLLM-like model-server simulator, over real HTTP on 127.0.0.1.

Timing asserts compare runs against each other with loose ratios (2 cores, other agents'
tests running too); simulated steps are kept short so the file stays in seconds. The engine
models themselves are stepped without the clock in test_sim_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport

from xds_lab.envoy_rig import free_port
from xds_lab.simulator.model_server import ModelServer
from xds_lab.simulator.openai import CHAT, COMPLETIONS, BadRequest, GenerationRequest
from xds_lab.simulator.options import PROFILES, SimulatorConfig
from xds_lab.simulator.orca import SIGNALS

CLI = [sys.executable, "-m", "xds_lab.cli"]
ORCA_FIELDS = {"application_utilization", "rps_fractional", "cpu_utilization", "mem_utilization"}
#: Quick steps for tests: 4 ms per decode step, plus 0.5 ms per running sequence.
QUICK = {"decode_step_base_s": 0.004, "decode_step_per_seq_s": 0.0005}
#: Every answer runs to max_tokens (no drawn lengths), where a test counts tokens exactly.
FULL = {"output_median_fraction": 1.0, "output_sigma": 0.0}


@asynccontextmanager
async def running(
    config: SimulatorConfig | None = None, **overrides: Any
) -> AsyncIterator[tuple[ModelServer, aiohttp.ClientSession]]:
    """A started server (the fast profile with QUICK steps, unless `config`) and a client."""
    server = ModelServer(config or SimulatorConfig.profile("fast", **{**QUICK, **overrides}))
    await server.start()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        yield server, session
    finally:
        await session.close()
        await server.stop()


async def complete(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, dict[str, Any], float, Mapping[str, str]]:
    """POST /v1/completions; returns status, JSON body, seconds taken, response headers."""
    start = time.monotonic()
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
        payload = await resp.json()
        return resp.status, payload, time.monotonic() - start, resp.headers


async def sse_events(resp: aiohttp.ClientResponse) -> list[tuple[float, bytes]]:
    """(arrival time, payload) of each `data:` event of a stream."""
    events = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            events.append((time.monotonic(), line[len(b"data: ") :].strip()))
    return events


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def scrape(session: aiohttp.ClientSession, server: ModelServer) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}."""
    async with session.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def parse_orca_text(value: str) -> OrcaLoadReport:
    """The header as Envoy 1.40 reads a `TEXT ` report: comma-separated `name=value`, spaces
    around entries dropped, `named_metrics.` names into the map, other names only if they are
    OrcaLoadReport fields, no duplicates, finite numbers."""
    assert value.startswith("TEXT ")
    report = OrcaLoadReport()
    seen: set[str] = set()
    for entry in value[len("TEXT ") :].split(","):
        name, sep, number = entry.strip().partition("=")
        assert sep and name and name not in seen, entry
        seen.add(name)
        parsed = float(number)
        assert math.isfinite(parsed)
        if name.startswith("named_metrics."):
            report.named_metrics[name[len("named_metrics.") :]] = parsed
        else:
            assert name in ORCA_FIELDS, f"Envoy rejects unsupported metric {name}"
            setattr(report, name, parsed)
    return report


def parse_orca_json(value: str) -> OrcaLoadReport:
    assert value.startswith("JSON ")
    return json_format.Parse(value[len("JSON ") :], OrcaLoadReport())


# --- OpenAI shapes ---------------------------------------------------------------------------


async def test_completion_is_openai_shaped_and_names_the_server():
    async with running(**FULL) as (server, session):
        status, body, _, headers = await complete(
            session, server.url, prompt="x" * 80, max_tokens=7
        )
    assert status == 200
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "llama-3-8b" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert len(choice["text"]) == 7 * 4  # seven 4-character tokens
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}
    assert headers["x-upstream"] == server.name == f"sim-{server.port}"
    assert headers["x-upstream-port"] == str(server.port)
    assert "endpoint-load-metrics" not in headers


async def test_chat_is_openai_shaped_and_counts_messages():
    async with running(**FULL) as (server, session):
        messages = [
            {"role": "system", "content": "s" * 40},
            {"role": "user", "content": [{"type": "text", "text": "u" * 40}]},
        ]
        request = {"model": "llama-3-8b", "messages": messages, "max_completion_tokens": 3}
        async with session.post(f"{server.url}/v1/chat/completions", json=request) as resp:
            body = await resp.json()
        explicit = {"messages": messages, "prompt_tokens": 999, "max_tokens": 2}
        async with session.post(f"{server.url}/v1/chat/completions", json=explicit) as resp:
            counted = await resp.json()
    assert resp.status == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and len(choice["message"]["content"]) == 12
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}
    assert counted["usage"]["prompt_tokens"] == 999  # the benchmark extension wins
    assert counted["usage"]["completion_tokens"] == 2


async def test_models_health_and_request_errors():
    async with running(model="m1") as (server, session):
        async with session.get(f"{server.url}/v1/models") as resp:
            models = await resp.json()
        async with session.get(f"{server.url}/health") as resp:
            health = resp.status
        wrong_model = await complete(session, server.url, model="other", prompt="hi")
        bad_tokens = await complete(session, server.url, prompt="hi", max_tokens=0)
        too_long = await complete(session, server.url, prompt="hi", prompt_tokens=40_000)
        async with session.post(f"{server.url}/v1/completions", data=b"{not json") as resp:
            garbage = resp.status, await resp.json()
    assert [m["id"] for m in models["data"]] == ["m1"] and health == 200
    assert wrong_model[0] == 404 and wrong_model[1]["error"]["code"] == 404
    assert bad_tokens[0] == 400 and "max_tokens" in bad_tokens[1]["error"]["message"]
    assert too_long[0] == 400 and "KV cache" in too_long[1]["error"]["message"]
    assert garbage[0] == 400 and garbage[1]["error"]["type"] == "BadRequestError"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
FIELDS = st.sampled_from(
    ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "prompt_tokens",
     "stream", "stream_options"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON_VALUES, st.dictionaries(FIELDS, JSON_VALUES)))
def test_parsing_any_json_gives_a_request_or_bad_request(body: Any):
    for api in (COMPLETIONS, CHAT):
        try:
            request = api.parse(body)
        except BadRequest:
            continue
        assert isinstance(request, GenerationRequest)
        assert request.prompt_tokens >= 1 and request.max_tokens >= 1


# --- streaming -------------------------------------------------------------------------------


async def test_stream_arrives_token_by_token_and_ends_with_done():
    async with running(decode_step_base_s=0.02, **FULL) as (server, session):
        body = {"prompt": "hello", "max_tokens": 8, "stream": True}
        start = time.monotonic()
        async with session.post(f"{server.url}/v1/completions", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = await sse_events(resp)
        _, whole, _, _ = await complete(session, server.url, prompt="hello", max_tokens=8)
    assert events[-1][1] == b"[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) == 8  # one event per decode step
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 7 + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    arrivals = [t for t, _ in events[:-1]]
    assert len(set(arrivals)) == 8
    # 8 steps of >= 20 ms: the first event comes early, the last one far later.
    assert arrivals[0] - start < (arrivals[-1] - start) / 2
    assert arrivals[-1] - arrivals[0] > 7 * 0.02 * 0.5


async def test_chat_stream_deltas_and_usage():
    async with running(**FULL) as (server, session):
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with session.post(f"{server.url}/v1/chat/completions", json=body) as resp:
            events = [json.loads(d) for _, d in (await sse_events(resp))[:-1]]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert deltas[0]["role"] == "assistant" and "role" not in deltas[1]
    assert len("".join(d["content"] for d in deltas)) == 12
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


async def test_client_disconnect_frees_its_sequence():
    async with running(max_num_seqs=1) as (server, session):
        body = {"prompt": "x", "prompt_tokens": 64, "max_tokens": 5000, "stream": True}
        resp = await session.post(f"{server.url}/v1/completions", json=body)
        await resp.content.readline()  # the first token arrived: it is running
        assert server.state.running == 1 and server.state.used_blocks > 0
        waiting = asyncio.create_task(complete(session, server.url, prompt="x", max_tokens=5000))
        await until(lambda: server.state.waiting == 1)
        resp.close()  # hang up mid-stream
        await until(lambda: server.state.running == 1 and server.state.waiting == 0)
        waiting.cancel()  # hang up while running
        await until(lambda: server.state.running == 0 and server.state.used_blocks == 0)
        metrics = await scrape(session, server)
    labels = (("finished_reason", "abort"), ("model_name", "llama-3-8b"))
    assert metrics[("vllm:request_success_total", labels)] == 2


# --- ORCA ------------------------------------------------------------------------------------


async def test_orca_header_only_when_asked_and_parses_like_envoy():
    # One long request runs (320-token prompt: 20 of 64 blocks), one waits behind it. Streams
    # sample the report as their headers go out, so this mode sends it on streams too.
    config = SimulatorConfig.profile(
        "fast",
        max_num_seqs=1,
        kv_cache_tokens=1024,
        decode_step_base_s=0.05,
        orca_signals="vllm-streams",
        **FULL,
    )
    async with running(config) as (server, session):
        first = asyncio.create_task(
            complete(session, server.url, prompt_tokens=320, max_tokens=500)
        )
        await until(lambda: server.state.running == 1)
        second = asyncio.create_task(complete(session, server.url, prompt="x", max_tokens=500))
        await until(lambda: server.state.waiting == 1)
        reports = {}
        for fmt in ("TEXT", "JSON", "BIN", None):  # streams: sampled as headers go out
            headers = {"endpoint-load-metrics-format": fmt} if fmt else {}
            body = {"prompt": "x", "max_tokens": 1, "stream": True}
            async with session.post(
                f"{server.url}/v1/completions", json=body, headers=headers
            ) as resp:
                reports[fmt] = resp.headers.get("endpoint-load-metrics")
            await until(lambda: server.state.waiting == 1)  # hung up: it left the queue
        first.cancel()
        second.cancel()
    assert reports["BIN"] is None and reports[None] is None  # vLLM: TEXT and JSON only
    assert ", named_metrics.num_requests_waiting=" in reports["TEXT"]
    for report in (parse_orca_text(reports["TEXT"]), parse_orca_json(reports["JSON"])):
        assert set(report.named_metrics) == {"kv_cache_usage_perc", "num_requests_waiting"}
        assert report.named_metrics["num_requests_waiting"] == 2.0  # `second` and itself
        assert 20 / 64 <= report.named_metrics["kv_cache_usage_perc"] < 0.5  # a fraction
        assert report.rps_fractional == 0 and report.application_utilization == 0


#: Per `orca_signals` mode: the top-level fields it adds to vLLM's two named metrics, and
#: whether streamed answers carry the report (vLLM attaches it to complete JSON answers only).
MODES = {
    "vllm": (set(), False),
    "vllm-streams": (set(), True),
    "cswrr": ({"application_utilization", "rps_fractional"}, True),
    "cswrr-kv": ({"rps_fractional"}, True),
}
VLLM_NAMED = {"named_metrics.kv_cache_usage_perc", "named_metrics.num_requests_waiting"}


async def test_each_orca_mode_sends_what_it_says_and_vllm_mode_only_what_vllm_sends():
    assert set(MODES) == set(SIGNALS)
    assert SimulatorConfig().orca_signals == "vllm"  # the default
    seen = {}
    async with running(max_num_seqs=4, **FULL) as (server, session):
        await asyncio.gather(  # finished requests: a positive rps_fractional where it is sent
            *(complete(session, server.url, prompt="x", max_tokens=3) for _ in range(8))
        )
        for mode in MODES:
            server.update({"orca_signals": mode})
            text = {"endpoint-load-metrics-format": "TEXT"}
            as_json = {"endpoint-load-metrics-format": "JSON"}
            _, _, _, plain = await complete(session, server.url, text, prompt="x", max_tokens=2)
            _, _, _, js = await complete(session, server.url, as_json, prompt="x", max_tokens=2)
            wrong = await complete(session, server.url, text, model="other", prompt="x")
            body = {"prompt": "x", "max_tokens": 2, "stream": True}
            async with session.post(
                f"{server.url}/v1/completions", json=body, headers=text
            ) as resp:
                await resp.read()
                streamed = resp.headers.get("endpoint-load-metrics")
            seen[mode] = (
                plain["endpoint-load-metrics"],
                js["endpoint-load-metrics"],
                wrong[0],
                "endpoint-load-metrics" in wrong[3],
                streamed,
            )
    for mode, (fields, on_streams) in MODES.items():
        text, js, wrong_status, error_has_report, streamed = seen[mode]
        names = {entry.split("=")[0] for entry in text[len("TEXT ") :].split(", ")}
        assert names == VLLM_NAMED | fields, mode
        payload = json.loads(js[len("JSON ") :])
        assert set(payload) == {"named_metrics"} | fields, mode
        assert set(payload["named_metrics"]) == {n.split(".")[1] for n in VLLM_NAMED}
        for report in (parse_orca_text(text), parse_orca_json(js)):  # and Envoy reads it
            assert (report.rps_fractional > 0) == ("rps_fractional" in fields), mode
        assert wrong_status == 404 and not error_has_report  # errors: never a report
        assert (streamed is not None) == on_streams, mode
        if on_streams:
            assert {e.split("=")[0] for e in streamed[len("TEXT ") :].split(", ")} == names


# --- load behaviour --------------------------------------------------------------------------


async def test_queue_and_kv_usage_rise_under_load_and_return_to_zero():
    async with running(max_num_seqs=8) as (server, session):
        load = [
            asyncio.create_task(complete(session, server.url, prompt_tokens=100, max_tokens=20))
            for _ in range(40)
        ]
        peak_waiting = peak_kv = 0.0
        while not all(task.done() for task in load):
            state = server.state
            assert state.running <= 8 and state.used_blocks <= state.total_blocks
            peak_waiting = max(peak_waiting, state.waiting)
            peak_kv = max(peak_kv, state.kv_cache_usage)
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*load)
        metrics = await scrape(session, server)
    assert all(status == 200 for status, *_ in results)
    assert peak_waiting >= 20 and peak_kv > 0.01
    labels = (("model_name", "llama-3-8b"),)
    assert server.state.running == server.state.waiting == server.state.used_blocks == 0
    assert metrics[("vllm:num_requests_running", labels)] == 0
    assert metrics[("vllm:num_requests_waiting", labels)] == 0
    assert metrics[("vllm:kv_cache_usage_perc", labels)] == 0


async def test_latency_rises_with_load():
    async with running(max_num_seqs=8, **FULL) as (server, session):
        light = [
            (await complete(session, server.url, prompt="x", max_tokens=20))[2] for _ in range(3)
        ]
        heavy = await asyncio.gather(
            *(complete(session, server.url, prompt="x", max_tokens=20) for _ in range(32))
        )
    light_mean = sum(light) / len(light)
    heavy_mean = sum(seconds for _, _, seconds, _ in heavy) / len(heavy)
    # 32 requests through 8 slots queue for ~4 rounds of bigger, slower steps: ~5x here.
    assert heavy_mean > 2 * light_mean, (light_mean, heavy_mean)


@pytest.mark.parametrize("model", ["realistic", "legacy"])
async def test_admission_waits_for_cache_and_is_fifo(model: str):
    # 4 blocks of 16 tokens; a 40-token prompt takes 3 blocks; the second finds 1 free, where
    # the realistic model wants 3 for its first chunk and the legacy one 3 + 1.
    async with running(kv_cache_tokens=64, engine_model=model, **FULL) as (server, session):
        first = asyncio.create_task(complete(session, server.url, prompt_tokens=40, max_tokens=8))
        await until(lambda: server.state.running == 1)
        second = asyncio.create_task(complete(session, server.url, prompt_tokens=40, max_tokens=8))
        await until(lambda: server.state.waiting == 1)
        assert server.state.running == 1  # a slot is free; the cache is not
        results = await asyncio.gather(first, second)
    assert [status for status, *_ in results] == [200, 200]


@pytest.mark.parametrize("model", ["realistic", "legacy"])
async def test_preemption_frees_cache_and_every_request_still_finishes(model: str):
    # 16 blocks; three requests start at 3 blocks each and would each grow to 9.
    overrides = {"kv_cache_tokens": 256, "max_num_seqs": 4, "engine_model": model, **FULL}
    async with running(**overrides) as (server, session):
        load = [
            asyncio.create_task(complete(session, server.url, prompt_tokens=40, max_tokens=100))
            for _ in range(3)
        ]
        saw_preempted = False
        while not all(task.done() for task in load):
            state = server.state
            assert state.used_blocks <= state.total_blocks
            saw_preempted |= state.waiting > 0 and state.running < 3
            await asyncio.sleep(0.002)
        results = await asyncio.gather(*load)
        metrics = await scrape(session, server)
    assert saw_preempted
    assert metrics[("vllm:num_preemptions_total", (("model_name", "llama-3-8b"),))] >= 1
    assert [status for status, *_ in results] == [200] * 3
    assert all(body["usage"]["completion_tokens"] == 100 for _, body, *_ in results)
    assert server.state.used_blocks == 0


async def test_full_queue_answers_503():
    async with running(max_num_seqs=1, max_waiting=1) as (server, session):
        first = asyncio.create_task(complete(session, server.url, prompt="x", max_tokens=5000))
        await until(lambda: server.state.running == 1)
        second = asyncio.create_task(complete(session, server.url, prompt="x", max_tokens=5000))
        await until(lambda: server.state.waiting == 1)
        status, body, _, headers = await complete(session, server.url, prompt="x")
        first.cancel()
        second.cancel()
    assert status == 503 and body["error"]["code"] == 503
    assert headers["x-upstream"] == server.name  # so a benchmark can count who shed load


# --- profiles and runtime changes ------------------------------------------------------------


async def test_slow_profile_is_slower_than_fast():
    timings = {}
    for profile in ("fast", "slow"):
        config = SimulatorConfig.profile(profile, time_scale=0.5, **FULL)
        async with running(config) as (server, session):
            runs = await asyncio.gather(
                *(complete(session, server.url, prompt="x", max_tokens=20) for _ in range(4))
            )
            timings[profile] = sum(seconds for _, _, seconds, _ in runs) / len(runs)
    assert timings["slow"] > 1.4 * timings["fast"], timings  # ~2x by design
    assert SimulatorConfig.profile("slow").kv_cache_tokens < SimulatorConfig().kv_cache_tokens
    # small: a quarter of fast's KV cache, most of its speed (faster than slow)
    small, fast, slow = (SimulatorConfig.profile(name) for name in ("small", "fast", "slow"))
    assert small.kv_cache_tokens * 4 == fast.kv_cache_tokens
    assert fast.decode_step_base_s < small.decode_step_base_s < slow.decode_step_base_s
    assert set(PROFILES) == {"fast", "slow", "small"}


async def test_runtime_slowdown_and_profile_changes():
    async with running(**FULL) as (server, session):

        async def mean_latency() -> float:
            runs = [await complete(session, server.url, prompt="x", max_tokens=15) for _ in "abc"]
            return sum(seconds for _, _, seconds, _ in runs) / len(runs)

        normal = await mean_latency()
        server.set_slowdown(4)
        slowed = await mean_latency()
        url = f"{server.url}/admin/profile"
        async with session.post(url, json={"slowdown": 1, "profile": "slow"}) as resp:
            changed = await resp.json()
        async with session.post(url, json={"max_num_seqs": 0, "slowdown": 9}) as resp:
            rejected = resp.status
        async with session.post(url, json={"no_such_knob": 1}) as resp:
            unknown = resp.status
        async with session.post(url, json={"engine_model": "legacy", "slowdown": 9}) as resp:
            model_change = resp.status, (await resp.json())["error"]["message"]
        async with session.get(url) as resp:
            after = await resp.json()
        assert server.update({"max_num_seqs": 2}).max_num_seqs == 2  # the Python way
        load = [complete(session, server.url, prompt="x", max_tokens=20) for _ in range(4)]
        pending = asyncio.gather(*load)
        await until(lambda: server.state.waiting == 2)
        assert server.state.running == 2
        await pending
    assert slowed > 2 * normal, (normal, slowed)
    assert changed["slowdown"] == 1.0 and changed["config"]["kv_cache_tokens"] == 16384
    assert changed["config"]["decode_step_base_s"] == 0.016
    assert changed["config"]["time_scale"] == 1.0  # not a hardware value: kept
    assert rejected == 400 and unknown == 400
    assert model_change == (400, "engine_model cannot change while the server runs")
    assert after["slowdown"] == 1.0 and after["config"] == changed["config"]
    assert after["config"]["engine_model"] == "realistic"
    assert 0.95 <= after["speed_factor"] <= 1.05


def test_config_validates_every_parameter():
    assert SimulatorConfig.profile("slow", time_scale=0.5).time_scale == 0.5
    for bad in (
        {"max_num_seqs": 0},
        {"kv_cache_tokens": 16},
        {"decode_step_base_s": 0},
        {"time_scale": -1.0},
        {"max_waiting": True},
        {"model": ""},
        {"prefill_tokens_per_s": "fast"},
        {"engine_model": "v2"},
        {"orca_signals": "everything"},
        {"speed_spread": 0.9},
        {"step_jitter": -0.1},
        {"output_median_fraction": 0},
        {"max_num_seqs": 64, "max_num_batched_tokens": 32},  # vLLM refuses it too
    ):
        with pytest.raises(ValueError):
            SimulatorConfig(**bad)
    # the token budget is the realistic model's: the legacy one has none to check
    assert SimulatorConfig(engine_model="legacy", max_num_batched_tokens=32).max_num_seqs == 64
    with pytest.raises(ValueError):
        SimulatorConfig.profile("medium")
    with pytest.raises(ValueError):
        SimulatorConfig().with_overrides({"profile": "medium"})


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_use_vllm_names_per_server():
    async with running(model="m-a") as (a, session), running(model="m-b") as (b, _):
        answers = await asyncio.gather(
            *(complete(session, a.url, prompt="p" * 40, max_tokens=5) for _ in range(3))
        )
        await complete(session, b.url, prompt="p" * 40, max_tokens=5)
        metrics_a, metrics_b = await scrape(session, a), await scrape(session, b)

    def value(metrics: dict[tuple, float], name: str, model: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted({"model_name": model, **labels}.items())))]

    def finished(metrics: dict[tuple, float], model: str) -> float:
        return sum(
            value(metrics, "vllm:request_success_total", model, finished_reason=reason)
            for reason in ("stop", "length")  # an answer shorter than max_tokens stopped
        )

    output = [body["usage"]["completion_tokens"] for _, body, *_ in answers]
    assert all(1 <= tokens <= 5 for tokens in output)
    reasons = [body["choices"][0]["finish_reason"] for _, body, *_ in answers]
    assert reasons == ["length" if tokens == 5 else "stop" for tokens in output]
    assert value(metrics_a, "vllm:prompt_tokens_total", "m-a") == 3 * 10
    assert value(metrics_a, "vllm:generation_tokens_total", "m-a") == sum(output)
    assert value(metrics_a, "vllm:request_success_total", "m-a", finished_reason="length") == sum(
        tokens == 5 for tokens in output
    )
    assert finished(metrics_a, "m-a") == 3
    assert value(metrics_a, "vllm:e2e_request_latency_seconds_count", "m-a") == 3
    assert value(metrics_a, "vllm:time_to_first_token_seconds_count", "m-a") == 3
    assert value(metrics_a, "vllm:kv_cache_usage_perc", "m-a") == 0
    assert finished(metrics_b, "m-b") == 1
    assert value(metrics_b, "vllm:num_requests_running", "m-b") == 0


# --- CLI -------------------------------------------------------------------------------------


def test_simulate_help_lists_every_parameter():
    result = subprocess.run(
        [*CLI, "simulate", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "usage: xds-lab simulate" in result.stdout
    described = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  -")]
    parameters = [f"--{name.replace('_', '-')}" for name in SimulatorConfig.__dataclass_fields__]
    for flag in ("--profile", "--count", *parameters):
        assert described.count(flag) == 1, flag  # each declared once, each with its help
    assert "{realistic,legacy}" in result.stdout and "small" in result.stdout


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_simulate_serves_count_servers_until_sigterm():
    port = free_port()
    while not _bindable(port + 1):  # the second server takes port + 1; a retry is rare
        port = free_port()
    args = ["simulate", "--port", str(port), "--count", "2", "--profile", "slow", "--model", "cli"]
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        names = set()
        async with aiohttp.ClientSession() as session:
            for url in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"):
                for _ in range(200):  # until the child listens
                    try:
                        status, body, _, headers = await complete(
                            session, url, prompt="x", max_tokens=2
                        )
                        break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
                assert status == 200 and body["model"] == "cli"
                names.add(headers["x-upstream"])
        assert names == {f"sim-{port}", f"sim-{port + 1}"}
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
        assert proc.returncode == 0, err
        assert f"sim-{port}: cli (slow) on http://127.0.0.1:{port}" in out.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_simulate_rejects_bad_parameters():
    result = subprocess.run(
        [*CLI, "simulate", "--port", "0", "--max-num-seqs", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "max_num_seqs must be >= 1" in result.stderr
