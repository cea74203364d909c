"""`ModelServer`: the simulator's HTTP face, an OpenAI-compatible aiohttp server.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (SSE with `"stream": true`),
`GET /v1/models`, `GET /health`, `GET /metrics`, and `GET|POST /admin/profile` to read or
change the parameters while it runs ("the server slows down mid-run").

Every answer names the server (`x-upstream`, `x-upstream-port`, as `upstream.Upstream`
does) so a client behind Envoy can count who served it. A full waiting queue answers 503
(vLLM itself has no queue bound; its proposals for one answer 503, which Envoy's retry and
outlier detection treat as an overloaded host). A client that disconnects, mid-stream or
while waiting, frees its sequence at once. Answers carry ORCA reports as `orca_signals` says
(`orca`: by default exactly what vLLM sends).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from lrs.contract import ORCA_FORMAT_HEADER
from xds_lab.lifecycle import StartStop
from xds_lab.simulator.batching import Engine, EngineState, Rejected, Sequence
from xds_lab.simulator.metrics import SimulatorMetrics
from xds_lab.simulator.openai import (
    CHAT,
    COMPLETIONS,
    SSE_DONE,
    Api,
    GenerationRequest,
    error_body,
    output_text,
    sse_error,
)
from xds_lab.simulator.options import SimulatorConfig
from xds_lab.simulator.orca import on_streams, orca_header, utilization_fields

__all__ = ["ModelServer", "start_servers"]


def _error(status: int, message: str) -> web.Response:
    return web.json_response(error_body(status, message), status=status)


def _slowdown(factor: Any) -> float:
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0:
        raise ValueError(f"slowdown must be a positive number, got {factor!r}")
    return float(factor)


class ModelServer(StartStop):
    """One simulated vLLM server on host:port. Several may share one event loop.

    Its random streams (realistic model) are seeded from `config.seed` and its `name`, or,
    unnamed, its `replica` index: servers started from one config differ, and replay the same.
    """

    def __init__(
        self, config: SimulatorConfig | None = None, name: str | None = None, replica: int = 0
    ) -> None:
        self._config = config or SimulatorConfig()
        self._name = name
        self.host = "127.0.0.1"
        self.port = 0  # the real port once started
        identity = f"name={name}" if name is not None else f"replica={replica}"
        self._engine = Engine(self._config, identity)
        self._metrics = SimulatorMetrics(self._engine)
        self._runner: web.AppRunner | None = None

    @property
    def name(self) -> str:
        """`x-upstream` value: the given name, else `sim-PORT`."""
        return self._name or f"sim-{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    @property
    def state(self) -> EngineState:
        """Running and waiting requests and KV-cache usage, right now."""
        return self._engine.state

    def set_slowdown(self, factor: float) -> None:
        """Stretch every simulated duration by `factor` (1 = normal, 3 = three times slower)."""
        self._engine.slowdown = _slowdown(factor)

    def update(self, changes: dict[str, Any]) -> SimulatorConfig:
        """Apply parameter overrides (and `"profile"`) from the next engine step on;
        ValueError, and no change, on a bad one or a change of `engine_model`."""
        self._apply(self._config.with_overrides(changes))
        return self._config

    def _apply(self, config: SimulatorConfig) -> None:
        self._engine.config = config  # refuses a change of engine model
        self._config = config

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/admin/profile", self._get_profile)
        app.router.add_post("/admin/profile", self._post_profile)
        app.on_response_prepare.append(self._tag)
        # handler_cancellation: a client that hangs up cancels its handler, which aborts
        # the sequence (vLLM aborts too); shutdown_timeout: stop() must not wait on streams.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = self._runner.addresses[0][1]
        self._engine.start()

    async def stop(self) -> None:
        await self._engine.stop()  # ends every sequence, so handlers return promptly
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _tag(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-upstream"] = self.name
        response.headers["x-upstream-port"] = str(self.port)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETIONS)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def _generate(self, request: web.Request, api: Api) -> web.StreamResponse:
        engine = self._engine
        try:
            gen = api.parse(json.loads(await request.read()))
        except (ValueError, UnicodeDecodeError) as err:  # BadRequest and bad JSON alike
            return _error(400, str(err))
        if gen.model is not None and gen.model != self._config.model:
            return _error(404, f"The model `{gen.model}` does not exist.")
        try:
            seq = engine.submit(gen.prompt_tokens, gen.max_tokens)
        except Rejected as err:
            return _error(err.status, err.message)
        orca_format = request.headers.get(ORCA_FORMAT_HEADER)
        try:
            if gen.stream:
                return await self._stream(request, api, gen, seq, orca_format)
            await seq.done.wait()
            if seq.error is not None:
                return _error(seq.error.status, seq.error.message)
            self._metrics.observe(seq)
            body = api.start(self._config.model).full(
                output_text(0, seq.generated), gen.prompt_tokens, seq.generated, seq.finish_reason
            )
            return web.json_response(body, headers=self._orca(orca_format))
        finally:
            engine.abort(seq)  # no-op when it finished; frees it when the client left

    async def _stream(
        self,
        request: web.Request,
        api: Api,
        gen: GenerationRequest,
        seq: Sequence,
        orca_format: str | None,
    ) -> web.StreamResponse:
        orca = self._orca(orca_format) if on_streams(self._config.orca_signals) else {}
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **orca}
        )
        await response.prepare(request)
        try:
            reply = api.start(self._config.model)
            sent = 0
            while not (seq.done.is_set() and sent == seq.generated):
                await seq.progress.wait()
                seq.progress.clear()
                if seq.generated > sent:
                    last = seq.done.is_set() and seq.error is None
                    text = output_text(sent, seq.generated)
                    reason = seq.finish_reason if last else None
                    await response.write(reply.chunk(text, sent == 0, reason))
                    sent = seq.generated
            if seq.error is not None:
                await response.write(sse_error(seq.error.status, seq.error.message))
            else:
                self._metrics.observe(seq)
                if gen.include_usage:
                    await response.write(reply.usage_chunk(gen.prompt_tokens, seq.generated))
            await response.write(SSE_DONE)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left mid-stream: the caller's `finally` frees its sequence
        return response

    def _orca(self, requested: str | None) -> dict[str, str]:
        """The ORCA header for this moment (sampled when the response headers go out)."""
        if requested is None:
            return {}
        engine = self._engine
        state = engine.state
        named = {
            "kv_cache_usage_perc": state.kv_cache_usage,
            "num_requests_waiting": float(state.waiting),
        }
        occupancy = (state.running + state.waiting) / self._config.max_num_seqs
        utilization = utilization_fields(
            self._config.orca_signals, occupancy, engine.finished_rps()
        )
        return orca_header(requested, named, utilization)

    async def _models(self, request: web.Request) -> web.Response:
        model = self._config.model
        card = {"id": model, "object": "model", "owned_by": "vllm", "root": model}
        return web.json_response({"object": "list", "data": [card]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        )

    async def _get_profile(self, request: web.Request) -> web.Response:
        return web.json_response(self._profile_view())

    async def _post_profile(self, request: web.Request) -> web.Response:
        """JSON object of parameter overrides, optionally `"profile"` and `"slowdown"`."""
        try:
            changes = json.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object of parameter overrides")
            slowdown = changes.pop("slowdown", None)
            config = self._config.with_overrides(changes)  # validate all before changing any
            factor = None if slowdown is None else _slowdown(slowdown)
            self._apply(config)
        except (ValueError, UnicodeDecodeError) as err:
            return _error(400, str(err))
        if factor is not None:
            self._engine.slowdown = factor
        return web.json_response(self._profile_view())

    def _profile_view(self) -> dict[str, Any]:
        state = self.state
        return {
            "name": self.name,
            "config": self._config.as_dict(),
            "slowdown": state.slowdown,
            "speed_factor": state.speed_factor,
            "state": {
                "running": state.running,
                "waiting": state.waiting,
                "kv_cache_usage": state.kv_cache_usage,
            },
        }


async def start_servers(
    config: SimulatorConfig, host: str = "127.0.0.1", ports: Iterable[int] = (0,)
) -> list[ModelServer]:
    """Start one server per port (0: ephemeral), all of them or none; the n-th is replica n."""
    started: list[ModelServer] = []
    try:
        for replica, port in enumerate(ports):
            server = ModelServer(config, replica=replica)
            await server.start(host, port)
            started.append(server)
    except BaseException:
        for server in started:
            await server.stop()
        raise
    return started
