"""The model an OpenAI-style request body names: its top-level "model" string.

The body router routes on this and the model server serves what it reads from the
same bytes, so both must agree: the body is parsed as the servers parse it (Python's
json, where a repeated key means its last value), never guessed at with a regex that
a "model" inside a prompt or a nested object would fool.
"""

from __future__ import annotations

import json
from typing import Final

__all__ = ["BAD_MODEL", "INVALID_JSON", "NOT_AN_OBJECT", "BodyError", "extract_model"]

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
