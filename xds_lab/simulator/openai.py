"""OpenAI request parsing and response shapes for `/v1/completions` and `/v1/chat/completions`.

Only what the simulator needs to be a drop-in target for OpenAI clients: how long the prompt
is, how many tokens to generate, whether to stream, and the JSON that comes back. The prompt
is never read beyond counting it (about four characters per token, at least one); clients
that know their token counts (benchmarks) send the `prompt_tokens` extension field instead.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "DEFAULT_MAX_TOKENS",
    "SSE_DONE",
    "Api",
    "BadRequest",
    "GenerationRequest",
    "Reply",
    "count_text_tokens",
    "error_body",
    "output_text",
    "sse_error",
]

DEFAULT_MAX_TOKENS = 128

#: Output "tokens": four characters each, so a reply fed back as a prompt counts the same.
_WORDS = (" the", " cat", " sat", " big", " red", " mat", " and", " ran", " far", " off")


class BadRequest(ValueError):
    """The request body is not a request this server can serve (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str | None  # None: the client did not name one, the served model answers
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool


def count_text_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def output_text(start: int, end: int) -> str:
    """The text of output tokens start..end-1 (deterministic)."""
    return "".join(_WORDS[i % len(_WORDS)] for i in range(start, end))


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"{name} must be a positive integer, got {value!r}")
    return value


def _completion_prompt(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return count_text_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return len(prompt)  # token ids
    raise BadRequest("prompt must be a string or a non-empty list of token ids")


def _chat_prompt(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    chars = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message must be an object with a string role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts carry tokens here
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(parts) != len(content) or not all(isinstance(t, str | None) for t in parts):
                raise BadRequest("content parts must be objects; a part's text must be a string")
            chars += sum(len(t) for t in parts if t)
        elif isinstance(content, str):
            chars += len(content)
        elif content is not None:
            raise BadRequest("message content must be a string, a list of parts or null")
    return max(1, chars // 4)


def _parse(
    body: Any, prompt: Callable[[dict[str, Any]], int], *max_names: str
) -> GenerationRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string")
    stream = body.get("stream", False)
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise BadRequest("stream must be a boolean and stream_options an object")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("stream_options.include_usage must be a boolean")
    explicit = _positive_int(body, "prompt_tokens")
    max_tokens = next(
        (value for name in max_names if (value := _positive_int(body, name)) is not None),
        DEFAULT_MAX_TOKENS,
    )
    return GenerationRequest(
        model=model,
        prompt_tokens=explicit if explicit is not None else prompt(body),
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
    )


class Api:
    """One OpenAI endpoint's dialect: how to read its requests and shape its answers."""

    def __init__(
        self, kind: str, prompt: Callable[[dict[str, Any]], int], max_names: tuple[str, ...]
    ) -> None:
        self.kind = kind  # "completion" or "chat"
        self._prompt = prompt
        self._max_names = max_names

    def parse(self, body: Any) -> GenerationRequest:
        """The generation a request body asks for; BadRequest when it is malformed."""
        return _parse(body, self._prompt, *self._max_names)

    def start(self, model: str) -> Reply:
        return Reply(self.kind, model)


class Reply:
    """The identity of one answer (id, created, model) and the JSON shapes carrying it."""

    def __init__(self, kind: str, model: str) -> None:
        self.chat = kind == "chat"
        prefix = "chatcmpl" if self.chat else "cmpl"
        self._head = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def full(
        self, text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice |= {"text": text, "logprobs": None}
        return {
            **self._head,
            "choices": [choice],
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    def chunk(self, text: str, first: bool, finish_reason: str | None) -> bytes:
        """One SSE event carrying new output text."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice |= {"text": text, "logprobs": None}
        return self._event({"choices": [choice]})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._event({"choices": [], "usage": _usage(prompt_tokens, completion_tokens)})

    def _event(self, fields: dict[str, Any]) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        payload = {**self._head, "object": obj, **fields}
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object, as vLLM sends it."""
    kinds = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}
    return {
        "error": {
            "message": message,
            "type": kinds.get(status, "InternalServerError"),
            "param": None,
            "code": status,
        }
    }


def sse_error(status: int, message: str) -> bytes:
    """An error that happens after a stream started: one event, as vLLM sends it."""
    return b"data: " + json.dumps(error_body(status, message)).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
COMPLETIONS = Api("completion", _completion_prompt, ("max_tokens",))
CHAT = Api("chat", _chat_prompt, ("max_completion_tokens", "max_tokens"))
