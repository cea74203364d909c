"""The body router: JSON model extraction, its answers, and the ext_proc gRPC protocol."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import given
from hypothesis import strategies as st

from tests.loop_watch import cpu_seconds_of, watch_loop
from xds_server.config.reader import parse_config
from xds_server.config.types import MODEL_HEADER
from xds_server.grpc_server import start_grpc_server
from xds_server.resources.build import LISTENER_METADATA
from xds_server.router.body import (
    BAD_MODEL,
    INLINE_LIMIT,
    INVALID_JSON,
    NOT_AN_OBJECT,
    BodyError,
    ModelReader,
    extract_model,
)
from xds_server.router.ext_proc import SERVICE, BodyRouter
from xds_server.router.standalone import StandaloneRouter

SNAPSHOT = """
listeners:
  - name: strict                  # model routes only
    port: 10000
    routes:
      - {model: llama-3-8b, pool: llama}
      - {model: llama3, pool: llama}
      - {model: qwen, split: [{pool: qwen-a, weight: 90}, {pool: qwen-b, weight: 10}]}
  - name: lenient                 # a prefix route takes what names no model
    port: 10001
    routes:
      - {model: llama-3-8b, pool: llama}
      - {prefix: /, pool: qwen-a}
  - name: plain                   # no model routes: no body routing
    port: 10002
    routes: [{prefix: /, pool: llama}]
pools:
  - {name: llama}
  - {name: qwen-a}
  - {name: qwen-b}
"""

# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "llama-3-8b", "prompt": "hi"}', "llama-3-8b"),
        (b'{"messages": [{"role": "user", "content": "x"}], "model": "m"}', "m"),
        (b'{"prompt": "say \\"model\\": \\"evil\\""}', None),  # a "model" inside a string
        (b'{"metadata": {"model": "nested"}}', None),  # only the top level counts
        (b'{"model": "a", "model": "b"}', "b"),  # a repeated key: the last, as servers read it
        (b'{"model": null}', None),
        (b"{}", None),
        (b"", None),
        ('{"model": "ünïcode"}'.encode(), "ünïcode"),
        ('{"model": "u16"}'.encode("utf-16"), "u16"),  # RFC 8259 allows UTF-16/32
    ],
)
def test_extract_model(body: bytes, model: str | None) -> None:
    assert extract_model(body) == model


@pytest.mark.parametrize(
    ("body", "kind", "text"),
    [
        (b"{nope", INVALID_JSON, "not valid JSON"),
        (b'{"model": "a"', INVALID_JSON, "not valid JSON"),
        (b"\xff\xfe\xfa", INVALID_JSON, "not valid JSON"),
        (b"[" * 100_000, INVALID_JSON, "nested too deeply"),
        (b"1" * 5000, INVALID_JSON, "digits"),
        (b"[1, 2]", NOT_AN_OBJECT, "got an array"),
        (b'"llama"', NOT_AN_OBJECT, "got a string"),
        (b"null", NOT_AN_OBJECT, "got null"),
        (b'{"model": 7}', BAD_MODEL, "non-empty string"),
        (b'{"model": ""}', BAD_MODEL, "non-empty string"),
        (b'{"model": ["a"]}', BAD_MODEL, "non-empty string"),
    ],
)
def test_extract_model_refuses(body: bytes, kind: str, text: str) -> None:
    with pytest.raises(BodyError, match=text) as caught:
        extract_model(body)
    assert caught.value.kind == kind


_JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_OBJECTS = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "model"), _JSON, max_size=6)


@given(_OBJECTS, st.text(min_size=1), st.sampled_from(["utf-8", "utf-16", "utf-32"]))
def test_model_found_in_any_object(document: dict, model: str, encoding: str) -> None:
    document["model"] = model
    assert extract_model(json.dumps(document, ensure_ascii=False).encode(encoding)) == model


@given(_OBJECTS)
def test_object_without_model_is_none(document: dict) -> None:
    assert extract_model(json.dumps(document).encode()) is None


@given(_OBJECTS, _JSON.filter(lambda v: not (isinstance(v, str) and v) and v is not None))
def test_model_that_is_not_a_string_is_refused(document: dict, model: object) -> None:
    document["model"] = model
    with pytest.raises(BodyError) as caught:
        extract_model(json.dumps(document).encode())
    assert caught.value.kind == BAD_MODEL


@given(_JSON.filter(lambda v: not isinstance(v, dict)))
def test_json_that_is_not_an_object_is_refused(document: object) -> None:
    with pytest.raises(BodyError) as caught:
        extract_model(json.dumps(document).encode())
    assert caught.value.kind == NOT_AN_OBJECT


@given(st.binary(max_size=200))
def test_any_bytes_give_a_model_none_or_a_body_error(body: bytes) -> None:
    try:
        model = extract_model(body)
    except BodyError as err:
        assert err.kind in (INVALID_JSON, NOT_AN_OBJECT, BAD_MODEL) and str(err)
    else:
        assert model is None or (isinstance(model, str) and model)


# --------------------------------------------------------------------------- answers


@pytest.fixture
async def router() -> AsyncIterator[BodyRouter]:
    router = BodyRouter()
    router.update(parse_config(textwrap.dedent(SNAPSHOT), "t.yaml"))
    yield router
    await router.aclose()


def decode(answer: bytes) -> ep.ProcessingResponse:
    return ep.ProcessingResponse.FromString(answer)


def routed_to(response: ep.ProcessingResponse) -> str:
    """The model header the answer sets; asserts it also makes Envoy pick the route again."""
    common = response.request_body.response
    assert common.clear_route_cache
    (header,) = common.header_mutation.set_headers
    assert header.header.key == MODEL_HEADER
    return header.header.raw_value.decode()


def refused(response: ep.ProcessingResponse) -> tuple[int, dict]:
    immediate = response.immediate_response
    assert immediate.status.code >= 400, response
    headers = {h.header.key: h.header.raw_value for h in immediate.headers.set_headers}
    assert headers["content-type"] == b"application/json"
    return immediate.status.code, json.loads(immediate.body)["error"]


def sample(router: BodyRouter, name: str, **labels: str) -> float:
    return router.registry.get_sample_value(f"xds_body_router_{name}_total", labels) or 0.0


def test_only_body_routing_listeners_are_known(router: BodyRouter) -> None:
    assert sorted(router.routes) == ["lenient", "strict"]
    assert router.routes["strict"].models == ("llama-3-8b", "llama3", "qwen")
    assert not router.routes["strict"].fallback and router.routes["lenient"].fallback


@pytest.mark.parametrize("model", ["llama-3-8b", "llama3", "qwen"])
def test_known_model_sets_the_header(router: BodyRouter, model: str) -> None:
    body = json.dumps({"model": model, "prompt": "hi"}).encode()
    assert routed_to(decode(router.answer("strict", body))) == model
    assert sample(router, "routed", listener="strict", model=model) == 1


def test_unknown_model_is_404_listing_the_models(router: BodyRouter) -> None:
    status, error = refused(decode(router.answer("strict", b'{"model": "gpt-5"}')))
    assert status == 404 and error["code"] == "unknown_model"
    assert "'gpt-5'" in error["message"] and "llama-3-8b, llama3, qwen" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert sample(router, "errors", kind="unknown_model") == 1


def test_unknown_model_name_is_quoted_short(router: BodyRouter) -> None:
    body = json.dumps({"model": "x" * 10_000}).encode()
    _, error = refused(decode(router.answer("strict", body)))
    assert len(error["message"]) < 300


def test_unknown_models_do_not_become_label_values(router: BodyRouter) -> None:
    for index in range(20):
        router.answer("strict", json.dumps({"model": f"m{index}"}).encode())
    labelled = {s.labels.get("model") for m in router.registry.collect() for s in m.samples}
    assert labelled - {None} == {"llama-3-8b", "llama3", "qwen"}  # the configured ones only


@pytest.mark.parametrize(
    ("body", "kind"),
    [(b"{nope", "invalid_json"), (b"[]", "not_an_object"), (b'{"model": 1}', "bad_model")],
)
def test_bad_bodies_are_400(router: BodyRouter, body: bytes, kind: str) -> None:
    for listener in ("strict", "lenient"):  # a prefix route does not make a bad body good
        status, error = refused(decode(router.answer(listener, body)))
        assert (status, error["code"]) == (400, kind)
    assert sample(router, "errors", kind=kind) == 2


def test_body_without_model_is_400_without_a_prefix_route(router: BodyRouter) -> None:
    status, error = refused(decode(router.answer("strict", b'{"prompt": "hi"}')))
    assert (status, error["code"]) == (400, "missing_model")
    assert "llama-3-8b, llama3, qwen" in error["message"]


def test_body_without_model_goes_to_the_prefix_route(router: BodyRouter) -> None:
    response = decode(router.answer("lenient", b'{"prompt": "hi"}'))
    assert response.HasField("request_body") and not response.request_body.HasField("response")
    assert sample(router, "passed", listener="lenient", reason="no_model") == 1


def test_unknown_listener_is_503(router: BodyRouter) -> None:
    status, error = refused(decode(router.answer("plain", b'{"model": "llama-3-8b"}')))
    assert (status, error["code"], error["type"]) == (503, "unknown_listener", "server_error")


def test_update_replaces_the_routes(router: BodyRouter) -> None:
    router.update(parse_config("listeners: []\npools: []\n", "t.yaml"))
    assert router.routes == {}
    status, _ = refused(decode(router.answer("strict", b'{"model": "llama3"}')))
    assert status == 503


# --------------------------------------------------------------------------- gRPC protocol


@pytest.fixture
async def channel(router: BodyRouter) -> AsyncIterator[grpc.aio.Channel]:
    server, port = await start_grpc_server(router.handlers(), "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def open_stream(channel: grpc.aio.Channel, listener: str) -> grpc.aio.StreamStreamCall:
    process = channel.stream_stream(
        f"/{SERVICE}/Process",
        request_serializer=ep.ProcessingRequest.SerializeToString,
        response_deserializer=ep.ProcessingResponse.FromString,
    )
    return process(metadata=((LISTENER_METADATA, listener),))


def headers_message(end_of_stream: bool) -> ep.ProcessingRequest:
    headers = ep.HttpHeaders(end_of_stream=end_of_stream)
    headers.headers.headers.add(key=":method", raw_value=b"POST")
    return ep.ProcessingRequest(request_headers=headers)


def body_message(body: bytes) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))


async def closed_ok(stream: grpc.aio.StreamStreamCall) -> bool:
    """The server ended the stream cleanly: Envoy then goes on without the router."""
    return await stream.read() is grpc.aio.EOF and await stream.code() == grpc.StatusCode.OK


async def test_headers_then_body_then_the_router_hangs_up(channel, router) -> None:
    stream = open_stream(channel, "strict")
    await stream.write(headers_message(end_of_stream=False))
    first = await stream.read()
    assert first.HasField("request_headers") and not first.request_headers.HasField("response")
    await stream.write(body_message(b'{"model": "llama3", "stream": true}'))
    assert routed_to(await stream.read()) == "llama3"
    assert await closed_ok(stream)


async def test_request_without_body_passes_untouched(channel, router) -> None:
    stream = open_stream(channel, "strict")
    await stream.write(headers_message(end_of_stream=True))
    answer = await stream.read()
    assert answer.HasField("request_headers") and not answer.request_headers.HasField("response")
    assert await closed_ok(stream)
    assert sample(router, "passed", listener="strict", reason="no_body") == 1


async def test_refusal_over_grpc(channel) -> None:
    stream = open_stream(channel, "strict")
    await stream.write(headers_message(end_of_stream=False))
    await stream.read()
    await stream.write(body_message(b"not json"))
    status, error = refused(await stream.read())
    assert (status, error["code"]) == (400, "invalid_json")
    assert await closed_ok(stream)


async def test_unexpected_message_ends_the_stream(channel, router) -> None:
    stream = open_stream(channel, "strict")
    await stream.write(ep.ProcessingRequest(response_headers=ep.HttpHeaders()))
    assert await closed_ok(stream)
    assert sample(router, "errors", kind="unexpected_message") == 1


async def test_streams_in_parallel(channel) -> None:
    async def one(model: str) -> str:
        stream = open_stream(channel, "strict")
        await stream.write(headers_message(end_of_stream=False))
        await stream.read()
        await stream.write(body_message(json.dumps({"model": model}).encode()))
        answer = routed_to(await stream.read())
        assert await closed_ok(stream)
        return answer

    models = ["llama-3-8b", "qwen", "llama3"] * 20
    assert await asyncio.gather(*(one(m) for m in models)) == models


async def _route(channel: grpc.aio.Channel, body: bytes) -> ep.ProcessingResponse:
    """Headers, then the body as Envoy sends it; the request is encoded before it is sent
    (Envoy's work, not the router's: in this test it would run on the loop watched)."""
    process = channel.stream_stream(
        f"/{SERVICE}/Process",
        request_serializer=lambda encoded: encoded,
        response_deserializer=ep.ProcessingResponse.FromString,
    )
    stream = process(metadata=((LISTENER_METADATA, "strict"),))
    encoded = body_message(body).SerializeToString()
    await stream.write(headers_message(end_of_stream=False).SerializeToString())
    await stream.read()
    await stream.write(encoded)
    answer = await stream.read()
    assert await closed_ok(stream)
    return answer


async def test_a_big_body_is_parsed_off_the_event_loop(channel, router) -> None:
    """Issue 12: the loop that parses bodies serves xDS and LRS too. json.loads of an 8 MiB
    body holds it (and the GIL: a thread would not help) for tens of ms; a big body is
    parsed in a worker process, so the loop's longest stall stays a fraction of that."""
    body = json.dumps({"model": "llama-3-8b", "prompt": list(range(1_050_000))}).encode()
    assert 7 * 2**20 < len(body) <= 8 * 2**20  # Envoy sends at most max_body_bytes (8 MiB)
    inline = cpu_seconds_of(lambda: extract_model(body))  # what a parse on the loop takes
    for attempt in ("cold", "warm"):  # the first one starts the worker
        async with watch_loop() as loop:
            assert routed_to(await _route(channel, body)) == "llama-3-8b"
        assert loop.longest_busy < inline / 3, (attempt, loop.longest_busy, loop.longest, inline)
    bad = body[:-1]  # cut short: invalid JSON, refused as 400 from the worker's BodyError
    status, error = refused(await _route(channel, bad))
    assert (status, error["code"]) == (400, INVALID_JSON)


async def test_model_reader_agrees_with_extract_model_on_both_sides_of_the_limit() -> None:
    reader = ModelReader(inline_limit=64)
    try:
        small, big = b'{"model": "m"}', json.dumps({"x": "y" * 100, "model": "big"}).encode()
        assert len(small) <= 64 < len(big)
        assert (await reader.read(small), await reader.read(big)) == ("m", "big")
        for body in (b'{"model": 7, "pad": "' + b"x" * 100 + b'"}', b"[" + b"1," * 100 + b"1]"):
            with pytest.raises(BodyError) as caught:
                await reader.read(body)
            with pytest.raises(BodyError) as inline:
                extract_model(body)
            assert (caught.value.kind, str(caught.value)) == (inline.value.kind, str(inline.value))
    finally:
        await reader.aclose()
    assert INLINE_LIMIT == 256 * 1024


async def test_a_dead_body_worker_is_replaced_and_no_body_goes_unanswered(caplog) -> None:
    reader = ModelReader(inline_limit=16)
    body = b'{"model": "m", "pad": "0123456789abcdef"}'
    try:
        assert await reader.read(body) == "m"
        worker = reader._worker
        assert worker is not None
        worker.kill()
        await worker.wait()
        assert await reader.read(body) == "m"  # parsed inline, this once
        assert "body parsing worker failed" in caplog.text
        assert await reader.read(body) == "m" and reader._worker not in (None, worker)
    finally:
        await reader.aclose()


# --------------------------------------------------------------------------- standalone


async def test_standalone_router_follows_file_edits_and_serves_metrics(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.yaml"
    path.write_text(textwrap.dedent(SNAPSHOT))
    standalone = StandaloneRouter(path, "127.0.0.1", 0, metrics_port=0, watch_interval=0.02)
    await standalone.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{standalone.port}") as channel:

            async def answer(model: str) -> ep.ProcessingResponse:
                stream = open_stream(channel, "strict")
                await stream.write(body_message(json.dumps({"model": model}).encode()))
                return await stream.read()

            assert routed_to(await answer("qwen")) == "qwen"
            assert refused(await answer("mistral"))[0] == 404
            path.write_text(
                textwrap.dedent(SNAPSHOT).replace(
                    "      - {model: llama3, pool: llama}",
                    "      - {model: llama3, pool: llama}\n      - {model: mistral, pool: llama}",
                )
            )
            deadline = asyncio.get_running_loop().time() + 5
            while "mistral" not in standalone.router.routes["strict"].models:
                assert asyncio.get_running_loop().time() < deadline, "edit not picked up"
                await asyncio.sleep(0.02)
            assert routed_to(await answer("mistral")) == "mistral"
        url = f"http://127.0.0.1:{standalone.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            text = await resp.text()
        assert 'xds_body_router_routed_total{listener="strict",model="qwen"} 1.0' in text
        assert 'xds_body_router_errors_total{kind="unknown_model"} 1.0' in text
    finally:
        await standalone.stop(0)
