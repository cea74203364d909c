"""The model an OpenAI-style request body names: its top-level "model" string.

The body router routes on this and the model server serves what it reads from the
same bytes, so both must agree: the body is parsed as the servers parse it (Python's
json, where a repeated key means its last value), never guessed at with a regex that
a "model" inside a prompt or a nested object would fool.

The router's event loop also serves xDS and LRS, and json.loads holds the GIL for
the whole parse (measured: an 8 MiB body takes 9-17 ms as chat text, 60-112 ms as
an array of token ids, and the loop stalled as long with the parse in a thread), so
a thread would not free the loop. `ModelReader` parses bodies up to `INLINE_LIMIT`
on the loop (256 KiB: ~0.4 ms as text, ~3 ms as numbers) and bigger ones in a
worker process: 0.2 ms more than inline at 64 KiB, 5-20 ms more at 8 MiB, but an
8 MiB body of token ids held the loop 4-9 ms (receiving it over gRPC included)
instead of ~70 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Any, Final

__all__ = [
    "BAD_MODEL",
    "INLINE_LIMIT",
    "INVALID_JSON",
    "NOT_AN_OBJECT",
    "BodyError",
    "ModelReader",
    "extract_model",
]

log = logging.getLogger(__name__)

#: A body error's kind: a label of the router's error metric and the JSON error's "code".
INVALID_JSON: Final = "invalid_json"
NOT_AN_OBJECT: Final = "not_an_object"
BAD_MODEL: Final = "bad_model"


_JSON_TYPES: Final = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class BodyError(ValueError):
    """A body no model server would accept; `kind` names why, the message says it for people."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def extract_model(body: bytes) -> str | None:
    """The top-level "model" of a JSON object body; None when there is no body or no "model".

    Raises BodyError when the body is not a JSON object (UTF-8/16/32 as RFC 8259 allows)
    or when "model" is not a non-empty string.
    """
    if not body:
        return None
    try:
        document = json.loads(body)
    except json.JSONDecodeError as err:
        raise BodyError(INVALID_JSON, f"request body is not valid JSON: {err.msg}") from None
    except RecursionError:
        raise BodyError(INVALID_JSON, "request body is nested too deeply") from None
    except ValueError as err:  # bytes that are not UTF-8/16/32, integers over 4300 digits
        raise BodyError(INVALID_JSON, f"request body is not valid JSON: {err}") from None
    if not isinstance(document, dict):
        kind = _JSON_TYPES[type(document)]
        raise BodyError(NOT_AN_OBJECT, f"request body must be a JSON object, got {kind}")
    model = document.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise BodyError(BAD_MODEL, '"model" must be a non-empty string')
    return model


#: Bodies up to this many bytes are parsed on the event loop; bigger ones in a worker process.
INLINE_LIMIT: Final = 256 * 1024
_LENGTH: Final = 8  # bytes of the big-endian length before each message to and from the worker
_SLICE: Final = 256 * 1024
_ANSWER_TIMEOUT: Final = 10.0  # seconds; an 8 MiB body takes ~0.1 s, a hung worker is replaced


class ModelReader:
    """`extract_model` for the event loop: small bodies inline, big ones in a worker process.

    The worker (`python -m xds_server.router.body`, started on the first big body, ~0.1 s)
    takes length-prefixed bodies on stdin and answers each with a length-prefixed JSON
    result; the loop moves the bytes through pipes without blocking. One body at a time:
    an exchange, once started, finishes even if its caller is cancelled, so answers never
    pair up with the wrong body. If the worker dies, the body is parsed inline and the
    next big body starts a new worker. `aclose()` stops it.
    """

    def __init__(self, inline_limit: int = INLINE_LIMIT) -> None:
        self.inline_limit = inline_limit
        self._worker: asyncio.subprocess.Process | None = None
        self._turn = asyncio.Lock()

    async def read(self, body: bytes) -> str | None:
        """What extract_model(body) returns or raises."""
        if len(body) <= self.inline_limit:
            return extract_model(body)
        answer = await asyncio.shield(self._exchange(body))
        if answer is None:  # no worker: parse here, this once
            return extract_model(body)
        if "kind" in answer:
            raise BodyError(answer["kind"], answer["message"])
        model: str | None = answer["model"]
        return model

    async def _exchange(self, body: bytes) -> dict[str, Any] | None:
        async with self._turn:
            try:
                worker = self._worker or await self._start()
                assert worker.stdin is not None and worker.stdout is not None
                worker.stdin.write(len(body).to_bytes(_LENGTH, "big"))
                view = memoryview(body)  # in slices: no copy of the whole body on the loop
                for start in range(0, len(body), _SLICE):
                    worker.stdin.write(view[start : start + _SLICE])
                    await worker.stdin.drain()
                async with asyncio.timeout(_ANSWER_TIMEOUT):
                    size = int.from_bytes(await worker.stdout.readexactly(_LENGTH), "big")
                    answer: dict[str, Any] = json.loads(await worker.stdout.readexactly(size))
                return answer
            except (OSError, EOFError, ValueError, TimeoutError) as err:  # IncompleteReadError
                log.warning("body parsing worker failed (%s); parsing on the event loop", err)
                self._kill()
                return None

    async def _start(self) -> asyncio.subprocess.Process:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            __name__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        return self._worker

    def _kill(self) -> asyncio.subprocess.Process | None:
        worker, self._worker = self._worker, None
        if worker is not None and worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.kill()
        return worker

    async def aclose(self) -> None:
        """Stop the worker (if one was started) and reap it."""
        worker = self._kill()
        if worker is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.wait(), 5)


def _serve_worker() -> None:
    """The worker's loop: a length-prefixed body in, its length-prefixed answer out."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while len(header := source.read(_LENGTH)) == _LENGTH:
        body = source.read(int.from_bytes(header, "big"))
        try:
            answer: dict[str, Any] = {"model": extract_model(body)}
        except BodyError as err:
            answer = {"kind": err.kind, "message": str(err)}
        data = json.dumps(answer).encode()
        sink.write(len(data).to_bytes(_LENGTH, "big") + data)
        sink.flush()


if __name__ == "__main__":
    _serve_worker()
