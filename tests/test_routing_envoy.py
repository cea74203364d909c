"""Model routing through a real Envoy 1.40: the body router (ext_proc) and the generated routes.

Each test runs `ControlPlane` (with its body router on a free port) on a snapshot file,
real HTTP upstreams on 127.0.0.1 (one per pool, plus a server-sent-events one) and a
real Envoy, then sends OpenAI-style requests through Envoy's listeners:

* `models`: model routes only (two names for one pool, a 90/10 split, a streaming model);
* `lenient`: one model route and a prefix route for requests that name no model.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from xds_lab.envoy_process import EnvoyProcess
from xds_lab.envoy_rig import PlaneWithEnvoy, converge, free_port, local_settings
from xds_lab.upstream import Upstream, start_upstreams
from xds_server.app import ControlPlane
from xds_server.router.standalone import StandaloneRouter

pytestmark = pytest.mark.envoy

NODE = "envoy-routing"
POOLS = ("llama-a", "qwen-a", "qwen-b")
MAX_BODY = 64 * 1024
SSE_EVENTS = 5
SSE_GAP = 0.15


class SseUpstream(Upstream):
    """Answers with server-sent events, one every SSE_GAP seconds, like a streaming LLM."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await request.read()
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "x-upstream": self.name}
        )
        await response.prepare(request)
        for index in range(SSE_EVENTS):
            await response.write(f"data: {json.dumps({'token': index})}\n\n".encode())
            await asyncio.sleep(SSE_GAP)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass
class Answer:
    status: int
    upstream: str | None
    content_type: str
    body: bytes

    def error(self) -> dict[str, Any]:
        assert self.content_type.startswith("application/json"), (self.content_type, self.body)
        return json.loads(self.body)["error"]


@dataclass
class Rig:
    plane: ControlPlane
    envoy: EnvoyProcess
    upstreams: dict[str, Upstream]
    doc: dict[str, Any]
    path: Path
    ports: dict[str, int]  # listener name -> port

    def url(self, listener: str, path: str = "/v1/chat/completions") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"

    async def send(
        self,
        listener: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        method: str = "POST",
        session: aiohttp.ClientSession | None = None,
    ) -> Answer:
        """One request; `body` is JSON-encoded unless it is bytes or an async generator."""
        data = body if isinstance(body, bytes) or hasattr(body, "__aiter__") else None
        payload = None if data is not None or body is None else body
        async with aiohttp.ClientSession() if session is None else _borrowed(session) as client:
            async with client.request(
                method, self.url(listener), json=payload, data=data, headers=headers
            ) as resp:
                return Answer(
                    resp.status,
                    resp.headers.get("x-upstream"),
                    resp.headers.get("content-type", ""),
                    await resp.read(),
                )

    async def edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        before = self.plane.cache.generation
        change(self.doc)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.doc, sort_keys=False))
        tmp.replace(self.path)
        await converge(self.plane, NODE, before)

    async def eventually(self, attempt: Callable[[], Any], holds: Callable[[Any], bool]) -> Any:
        """Retry until the answer holds: a listener change takes effect on new connections."""
        deadline = time.monotonic() + 5
        while True:
            result = await attempt()
            if holds(result) or time.monotonic() > deadline:
                return result
            await asyncio.sleep(0.05)

    def routed(self, listener: str, model: str) -> float:
        value = self.plane.body_router.registry.get_sample_value(
            "xds_body_router_routed_total", {"listener": listener, "model": model}
        )
        return value or 0.0


class _borrowed:
    """A caller's session, not closed on exit."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def __aenter__(self) -> aiohttp.ClientSession:
        return self.session

    async def __aexit__(self, *exc: object) -> None:
        return None


def _doc(ports: dict[str, int], upstreams: dict[str, Upstream]) -> dict[str, Any]:
    def pool(name: str) -> dict[str, Any]:
        return {"name": name, "endpoints": [{"address": "127.0.0.1", "port": upstreams[name].port}]}

    def listener(name: str, *routes: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "address": "127.0.0.1", "port": ports[name], "routes": list(routes)}

    split = [{"pool": "qwen-a", "weight": 90}, {"pool": "qwen-b", "weight": 10}]
    return {
        "listeners": [
            listener(
                "models",
                {"model": "llama-3-8b", "pool": "llama-a"},
                {"model": "llama3", "pool": "llama-a"},
                {"model": "qwen", "split": split},
                {"model": "streamer", "pool": "sse"},
            ),
            listener(
                "lenient",
                {"model": "llama-3-8b", "pool": "llama-a"},
                {"prefix": "/", "pool": "qwen-a"},
            ),
        ],
        "body_router": {"max_body_bytes": MAX_BODY},
        "pools": [pool(name) for name in (*POOLS, "sse")],
    }


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    upstreams = {u.name: u for u in await start_upstreams(list(POOLS))}
    upstreams["sse"] = SseUpstream("sse")
    await upstreams["sse"].start()
    ports = {"models": free_port(), "lenient": free_port()}
    doc = _doc(ports, upstreams)
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    pair = PlaneWithEnvoy(local_settings(path, watch_interval=0.05), tmp_path, NODE)
    try:
        async with pair:
            assert pair.envoy is not None
            yield Rig(pair.plane, pair.envoy, upstreams, doc, path, ports)
    finally:
        for upstream in upstreams.values():
            await upstream.stop()


async def test_models_and_aliases_reach_their_pools(rig: Rig) -> None:
    for model in ("llama-3-8b", "llama3"):
        answer = await rig.send("models", {"model": model, "messages": []})
        assert (answer.status, answer.upstream) == (200, "llama-a"), answer
    answer = await rig.send("models", {"model": "qwen"})
    assert answer.status == 200 and answer.upstream in ("qwen-a", "qwen-b")
    # The body wins over a header the client sent: the server serves what the body says.
    answer = await rig.send("models", {"model": "llama3"}, headers={"x-gateway-model-name": "qwen"})
    assert answer.upstream == "llama-a"
    assert rig.routed("models", "llama3") == 2 and rig.routed("models", "llama-3-8b") == 1


async def test_chunked_request_body_is_routed(rig: Rig) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "hi"}],'
        await asyncio.sleep(0.05)
        yield b' "model": "llama3"}'

    answer = await rig.send("models", chunks())
    assert (answer.status, answer.upstream) == (200, "llama-a")


async def test_split_sends_about_a_tenth_to_the_canary(rig: Rig) -> None:
    requests = 400
    limit = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def one() -> str | None:
            async with limit:
                return (await rig.send("models", {"model": "qwen"}, session=session)).upstream

        counts = collections.Counter(await asyncio.gather(*(one() for _ in range(requests))))
    assert set(counts) == {"qwen-a", "qwen-b"}, counts
    # Binomial(400, 0.1): standard deviation 1.5 points; this allows about 4 of them.
    assert 0.04 <= counts["qwen-b"] / requests <= 0.16, counts


async def test_refusals_are_json_and_reach_no_upstream(rig: Rig) -> None:
    before = {name: u.requests for name, u in rig.upstreams.items()}
    unknown = await rig.send("models", {"model": "gpt-5", "messages": []})
    assert unknown.status == 404 and unknown.error()["code"] == "unknown_model"
    assert "llama-3-8b, llama3, qwen, streamer" in unknown.error()["message"]
    malformed = await rig.send("models", b'{"model": "llama3",')
    assert malformed.status == 400 and malformed.error()["code"] == "invalid_json"
    nameless = await rig.send("models", {"messages": []})
    assert nameless.status == 400 and nameless.error()["code"] == "missing_model"
    huge = await rig.send("models", {"model": "llama3", "prompt": "x" * (MAX_BODY + 1)})
    assert huge.status == 413 and huge.error()["code"] == "request_too_large"
    assert {name: u.requests for name, u in rig.upstreams.items()} == before


async def test_requests_naming_no_model(rig: Rig) -> None:
    # With a prefix route, a body without "model" and a bodiless GET both take it.
    assert (await rig.send("lenient", {"prompt": "hi"})).upstream == "qwen-a"
    assert (await rig.send("lenient", method="GET")).upstream == "qwen-a"
    # Without one, a GET passes the router untouched, and Envoy finds no route.
    answer = await rig.send("models", method="GET")
    assert answer.status == 404 and answer.upstream is None
    passed = rig.plane.body_router.registry.get_sample_value(
        "xds_body_router_passed_total", {"listener": "models", "reason": "no_body"}
    )
    assert passed == 1


async def test_server_sent_events_arrive_as_they_are_sent(rig: Rig) -> None:
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        body = {"model": "streamer", "stream": True}
        async with session.post(rig.url("models"), json=body) as resp:
            assert resp.status == 200 and resp.headers["x-upstream"] == "sse"
            async for chunk in resp.content.iter_any():
                arrivals.append((time.monotonic() - started, chunk))
    text = b"".join(chunk for _, chunk in arrivals).decode()
    assert text.count("data: ") == SSE_EVENTS + 1 and text.endswith("data: [DONE]\n\n")
    # Buffered, everything would arrive at once after the last event (~0.75 s).
    first, last = arrivals[0][0], arrivals[-1][0]
    assert len(arrivals) >= 3 and last - first >= 2 * SSE_GAP, arrivals


async def test_router_down_follows_the_failure_mode(rig: Rig, tmp_path: Path) -> None:
    standalone = StandaloneRouter(rig.path, "127.0.0.1", 0)
    await standalone.start()
    try:
        await rig.edit(lambda d: d.update(body_router={"port": standalone.port}))

        def decided() -> float:  # by the standalone router, not the control plane's
            labels = {"listener": "lenient", "model": "llama-3-8b"}
            value = standalone.router.registry.get_sample_value(
                "xds_body_router_routed_total", labels
            )
            return value or 0.0

        routed = await rig.eventually(
            lambda: rig.send("lenient", {"model": "llama-3-8b"}), lambda _: decided() > 0
        )
        assert routed.upstream == "llama-a" and decided() > 0
    finally:
        await standalone.stop(0)
    # Closed (the default): no routing decision, no request.
    down = await rig.eventually(
        lambda: rig.send("lenient", {"model": "llama-3-8b"}), lambda a: a.status == 503
    )
    assert down.status == 503 and down.upstream is None
    # Open: requests go on unrouted by body, here to the prefix route: the wrong model,
    # which is why closed is the default.
    await rig.edit(lambda d: d["body_router"].update(failure_mode="open"))
    unrouted = await rig.eventually(
        lambda: rig.send("lenient", {"model": "llama-3-8b"}), lambda a: a.status == 200
    )
    assert unrouted.upstream == "qwen-a"
    by_header = await rig.send(
        "lenient", {"model": "llama-3-8b"}, headers={"x-gateway-model-name": "llama-3-8b"}
    )
    assert by_header.upstream == "llama-a"
