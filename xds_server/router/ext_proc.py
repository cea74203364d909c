"""The body-based model router: Envoy's external processor (ext_proc) for OpenAI-style APIs.

Clients name the model in the JSON body (`{"model": "llama-3-8b", ...}`), which Envoy
cannot route on. For each request on a listener with body routing, Envoy sends this
service the request headers and then the whole body (see resources._ext_proc_filter);
the router answers with header `x-gateway-model-name: <model>` and a cleared route
cache, so Envoy's route table, generated from the same snapshot, picks the pool.

Per request, one short gRPC stream:

* no body (GET /v1/models, health checks): passed on untouched;
* a body naming a model of the listener's routes: routed by that model, even over a
  header the client sent, since the model server serves what the body says;
* a body naming another model: 404 JSON listing the listener's models;
* a body that is not a JSON object, or whose "model" is not a string: 400 JSON;
* a JSON body without "model": passed on to the listener's prefix route when it has one
  (a header the client sent still routes it), else 400 JSON.

Bodies over the limit never get here: Envoy answers 413 itself. The router closes each
stream as soon as it has answered, so Envoy holds no stream per in-flight generation
and never sends it the response: server-sent events stream through untouched.

Which routes a request's listener has comes from the snapshot (`update`, called on
every config the control plane publishes); Envoy names the listener in the stream's
gRPC metadata. Answers are encoded once per config, so routing a request costs one
JSON parse and a dict lookup; a body over 256 KiB is parsed in a worker process so the
event loop, which serves xDS and LRS too, is not held up (router.body.ModelReader).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from prometheus_client import CollectorRegistry, Counter

from lrs.contract import raw_bytes
from xds_server.config.types import MODEL_HEADER, Config, Listener
from xds_server.resources.build import LISTENER_METADATA
from xds_server.router.body import BodyError, ModelReader, extract_model

__all__ = [
    "MISSING_MODEL",
    "SERVICE",
    "UNEXPECTED_MESSAGE",
    "UNKNOWN_LISTENER",
    "UNKNOWN_MODEL",
    "BodyRouter",
    "ListenerRoutes",
    "RouterMetrics",
]

log = logging.getLogger(__name__)

SERVICE: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
MISSING_MODEL: Final = "missing_model"
UNKNOWN_MODEL: Final = "unknown_model"
UNKNOWN_LISTENER: Final = "unknown_listener"
UNEXPECTED_MESSAGE: Final = "unexpected_message"
#: Longest part of a client's model name quoted back in an error.
_QUOTE_LIMIT: Final = 100
#: Longest a request waits for the router's first config (Envoy gives up after its own
#: message timeout, 1 s by default, and that cancels the wait).
_FIRST_CONFIG_WAIT: Final = 5.0


class RouterMetrics:
    """The router's series, in the registry of whoever serves them (the control plane's
    /metrics). Labels stay bounded: listeners and models come from the snapshot, never from
    a request (an unknown model is counted as an error kind, not by name)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.routed = Counter(
            "xds_body_router_routed",
            "Requests the body router routed by the model their body names",
            ("listener", "model"),
            registry=registry,
        )
        self.passed = Counter(
            "xds_body_router_passed",
            "Requests passed on to the route table untouched (reason: no_body, no_model)",
            ("listener", "reason"),
            registry=registry,
        )
        self.errors = Counter(
            "xds_body_router_errors",
            "Requests the body router refused or could not serve, by kind",
            ("kind",),
            registry=registry,
        )


_CONTINUE: Final = ep.ProcessingResponse(request_headers=ep.HeadersResponse()).SerializeToString()
_PASS_BODY: Final[bytes] = ep.ProcessingResponse(request_body=ep.BodyResponse()).SerializeToString()
_JSON: Final = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")
)


def _route_answer(model: str) -> bytes:
    """Set the model header, overwriting a client's, and have Envoy pick the route again."""
    header = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=MODEL_HEADER, raw_value=model.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    common = ep.CommonResponse(
        header_mutation=ep.HeaderMutation(set_headers=[header]), clear_route_cache=True
    )
    answer: bytes = ep.ProcessingResponse(
        request_body=ep.BodyResponse(response=common)
    ).SerializeToString()
    return answer


def _refusal(status: int, kind: str, message: str) -> bytes:
    """An immediate JSON answer in the OpenAI error shape, which OpenAI clients show."""
    error = {
        "message": message,
        "type": "server_error" if status >= 500 else "invalid_request_error",
        "param": "model",
        "code": kind,
    }
    answer = ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=ep.HeaderMutation(set_headers=[_JSON]),
        body=json.dumps({"error": error}).encode(),
        details=f"body_router_{kind}",
    )
    encoded: bytes = ep.ProcessingResponse(immediate_response=answer).SerializeToString()
    return encoded


def _quote(model: str) -> str:
    shown = model if len(model) <= _QUOTE_LIMIT else model[:_QUOTE_LIMIT] + "..."
    return repr(shown)


@dataclass(frozen=True, slots=True)
class ListenerRoutes:
    """What the router knows of one body-routing listener: its models, answers pre-encoded."""

    name: str
    models: tuple[str, ...]
    fallback: bool
    answers: Mapping[str, tuple[bytes, Counter]]  # model -> (route answer, its routed counter)
    metrics: RouterMetrics

    @classmethod
    def of(cls, listener: Listener, metrics: RouterMetrics) -> ListenerRoutes:
        models = tuple(dict.fromkeys(listener.models))
        answers = {m: (_route_answer(m), metrics.routed.labels(listener.name, m)) for m in models}
        return cls(listener.name, models, listener.has_fallback, answers, metrics)

    def answer(self, body: bytes) -> bytes:
        """The router's answer to a request body on this listener (parsed here and now)."""
        try:
            model = extract_model(body)
        except BodyError as err:
            return self.refuse_body(err)
        return self.answer_model(model)

    def refuse_body(self, err: BodyError) -> bytes:
        return self._refuse(400, err.kind, str(err))

    def answer_model(self, model: str | None) -> bytes:
        """The answer to a body that names `model` (None: names none)."""
        if model is None:
            if self.fallback:
                self.metrics.passed.labels(self.name, "no_model").inc()
                return _PASS_BODY
            return self._refuse(
                400,
                MISSING_MODEL,
                f'request body names no "model"; models served here: {self._listing()}',
            )
        known = self.answers.get(model)
        if known is None:
            listing = self._listing()
            message = f"model {_quote(model)} is not served here; models served here: {listing}"
            return self._refuse(404, UNKNOWN_MODEL, message)
        answer, routed = known
        routed.inc()
        return answer

    def _listing(self) -> str:
        return ", ".join(self.models)

    def _refuse(self, status: int, kind: str, message: str) -> bytes:
        self.metrics.errors.labels(kind).inc()
        return _refusal(status, kind, message)


def _listener_name(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == LISTENER_METADATA:
            return str(value)
    return ""


class BodyRouter:
    """The ext_proc service; `update` swaps in the routes of each newly served config.

    `registry`: where its metrics go (the control plane's); by default one of its own.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, reader: ModelReader | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        self.routes: Mapping[str, ListenerRoutes] = {}
        self.reader = reader or ModelReader()
        self._configured = asyncio.Event()

    def update(self, config: Config) -> None:
        """Route by the body-routing listeners of `config` from now on."""
        self.routes = {
            x.name: ListenerRoutes.of(x, self.metrics) for x in config.listeners if x.body_routing
        }
        self._configured.set()

    def answer(self, listener: str, body: bytes) -> bytes:
        """The answer to a request body that arrived on `listener` (a serialized response),
        parsed here and now whatever its size (`answer_off_loop` is what the service uses)."""
        routes = self.routes.get(listener)
        if routes is None:
            return self._unknown_listener(listener)
        return routes.answer(body)

    async def answer_off_loop(self, listener: str, body: bytes) -> bytes:
        """`answer`, with a big body parsed off the event loop (ModelReader).

        Before its first config the router waits for it: the control plane's own router listens
        before the plane has loaded its file (so that the file's config can name the router's
        port), and after a restart Envoy's requests reach it in that moment.
        """
        routes = self.routes.get(listener)
        if routes is None and not self._configured.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FIRST_CONFIG_WAIT):
                    await self._configured.wait()
            routes = self.routes.get(listener)
        if routes is None:
            return self._unknown_listener(listener)
        try:
            model = await self.reader.read(body)
        except BodyError as err:
            return routes.refuse_body(err)
        return routes.answer_model(model)

    def _unknown_listener(self, listener: str) -> bytes:
        self.metrics.errors.labels(UNKNOWN_LISTENER).inc()
        return _refusal(
            503,
            UNKNOWN_LISTENER,
            f"the body router has no routes for listener {listener!r}: does it follow "
            "the same snapshot as the control plane?",
        )

    async def aclose(self) -> None:
        """Stop the worker process that parses big bodies (if one was started)."""
        await self.reader.aclose()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        process = grpc.stream_stream_rpc_method_handler(
            self._process,
            request_deserializer=ep.ProcessingRequest.FromString,
            response_serializer=raw_bytes,
        )
        return [grpc.method_handlers_generic_handler(SERVICE, {"Process": process})]

    async def _process(
        self, requests: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Headers, then (when the request has one) the body; returning closes the stream,
        which tells Envoy to go on without us."""
        listener = _listener_name(context)
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                if request.request_headers.end_of_stream:  # counted first: Envoy goes on at once
                    self.metrics.passed.labels(listener, "no_body").inc()
                    yield _CONTINUE
                    return
                yield _CONTINUE
            elif kind == "request_body":
                yield await self.answer_off_loop(listener, request.request_body.body)
                return
            else:  # a processing mode other than the generated one: stay out of the way
                self.metrics.errors.labels(UNEXPECTED_MESSAGE).inc()
                return
