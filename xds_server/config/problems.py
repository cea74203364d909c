"""Problem collection for the snapshot reader: typed getters that record what is wrong.

People edit the file by hand while a fleet serves from it, so every mistake is
reported at once, with the file, the path in the document and what to do, and one
edit-validate round fixes all of them.
"""

from __future__ import annotations

import ipaddress
import re
import reprlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Generic, NamedTuple, TypeGuard, TypeVar, cast

from xds_server.config.types import (
    MAX_SECONDS,
    Problem,
)

__all__ = [
    "BOOLEAN",
    "INTEGER",
    "LIST",
    "NUMBER",
    "REQUIRED",
    "STRING",
    "Kind",
    "Reader",
    "declared_names",
    "describe",
    "is_int",
    "join",
    "name_entries",
    "unknown",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_QUOTED_NUMBER = re.compile(r"\s*[-+]?\d+(\.\d*)?\s*")
T = TypeVar("T")

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 2
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_TYPE_NAMES |= {list: "a list", dict: "a mapping"}


def describe(value: object) -> str:
    if value is None:
        return "null"
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    return f"{kind} {_SHORT.repr(value)}"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Kind(NamedTuple, Generic[T]):
    """What a getter expects: its name in messages, and the check that narrows to it."""

    label: str
    accepts: Callable[[object], TypeGuard[T]]


def is_int(value: object) -> TypeGuard[int]:
    # YAML `true` is a bool, and bool is an int subclass: a port of `true` is a typo.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: object) -> TypeGuard[str]:
    return isinstance(value, str)


def _is_number(value: object) -> TypeGuard[float]:
    return is_int(value) or isinstance(value, float)


def _is_list(value: object) -> TypeGuard[list[Any]]:
    return isinstance(value, list)


def _is_bool(value: object) -> TypeGuard[bool]:
    return isinstance(value, bool)


STRING: Final = Kind("a string", _is_str)
INTEGER: Final = Kind("an integer", is_int)
NUMBER: Final = Kind("a number", _is_number)
LIST: Final = Kind("a list", _is_list)
BOOLEAN: Final = Kind("true or false", _is_bool)
REQUIRED: Final = object()


class Reader:
    """Reads a loosely typed YAML tree, recording every problem instead of stopping.

    Getters return the value when it is usable and None (with a problem recorded)
    when it is not, so callers build an object only from good parts.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str) -> None:
        """Keeps the one-line-per-problem contract even for messages quoting library errors."""
        message = message.replace("\n", " ")
        self.problems.append(Problem(self.source, path or "(document)", message))

    def mapping(self, value: object, path: str, keys: tuple[str, ...]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problem(
                path, f"expected a mapping with keys {', '.join(keys)}; got {describe(value)}"
            )
            return None
        for key in value:
            if key not in keys:
                printable = isinstance(key, str) and key.isprintable()
                where = join(path, key) if printable else path
                self.problem(where, f"unknown key {key!r}; expected one of: {', '.join(keys)}")
        return value

    def value(
        self, m: dict[str, Any], key: str, path: str, kind: Kind[T], default: Any = REQUIRED
    ) -> T | None:
        """An absent or null optional key means its default."""
        here = join(path, key)
        value = m.get(key)
        if value is None:
            if default is REQUIRED:
                self.problem(here, f"required key is missing; expected {kind.label}")
                return None
            return cast("T | None", default)
        if kind.accepts(value):
            return value
        hint = ""
        if kind in (INTEGER, NUMBER) and isinstance(value, str) and _QUOTED_NUMBER.fullmatch(value):
            hint = "; write the number without quotes"
        self.problem(here, f"expected {kind.label}, got {describe(value)}{hint}")
        return None

    def integer(
        self,
        m: dict[str, Any],
        key: str,
        path: str,
        low: int,
        high: int,
        default: Any = REQUIRED,
        hint: str = "",
    ) -> int | None:
        value = self.value(m, key, path, INTEGER, default)
        if value is None or low <= value <= high:
            return value
        self.problem(join(path, key), f"{value} is out of range {low}..{high}{hint}")
        return None

    def seconds(
        self, m: dict[str, Any], key: str, path: str, default: float, low: float, hint: str
    ) -> float | None:
        value = self.value(m, key, path, NUMBER, default)
        if value is None:
            return None
        # Compare before float(): a huge YAML int would overflow the conversion.
        if low <= value <= MAX_SECONDS:
            return float(value)
        self.problem(
            join(path, key), f"expected seconds from {low:g} to {MAX_SECONDS}, got {value!r}{hint}"
        )
        return None

    def choice(
        self,
        m: dict[str, Any],
        key: str,
        path: str,
        options: tuple[str, ...],
        default: str | None = None,
    ) -> str | None:
        value = self.value(m, key, path, STRING, default or options[0])
        if value is None or value in options:
            return value
        self.problem(
            join(path, key), f"unknown value {value!r}; expected one of: {', '.join(options)}"
        )
        return None

    def name(self, m: dict[str, Any], path: str) -> str | None:
        """Returns even a malformed name, so references to it do not also fail."""
        value = self.value(m, "name", path, STRING)
        if value is not None and not _NAME.fullmatch(value):
            self.problem(
                join(path, "name"),
                f"invalid name {value!r}: use letters, digits and _ . : - "
                "(starting with a letter or digit)",
            )
        return value

    def text(self, m: dict[str, Any], key: str, path: str, default: Any = REQUIRED) -> str | None:
        """A non-empty string that is safe in an HTTP header or a node.cluster."""
        return self.check_text(self.value(m, key, path, STRING, default), join(path, key))

    def check_text(self, value: str | None, path: str) -> str | None:
        if value is None or (value and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)):
            return value
        self.problem(path, f"expected a non-empty string without control characters, got {value!r}")
        return None

    def ip(self, m: dict[str, Any], key: str, path: str, default: Any, hint: str) -> str | None:
        value = self.value(m, key, path, STRING, default)
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            self.problem(join(path, key), f"{value!r} is not an IPv4 or IPv6 address{hint}")
            return None

    def items(self, m: dict[str, Any], key: str, path: str) -> Iterator[tuple[str, Any]]:
        """(path, item) for each entry of an optional list."""
        here = join(path, key)
        entries: list[Any] = self.value(m, key, path, LIST, []) or []
        for index, item in enumerate(entries):
            yield f"{here}[{index}]", item

    def duplicates(self, entries: Iterable[tuple[str, str]], what: str, hint: str = "") -> None:
        first: dict[str, str] = {}
        for path, key in entries:
            if key in first:
                self.problem(path, f"duplicate {what} {key!r} (first at {first[key]}){hint}")
            else:
                first[key] = path


def name_entries(section: object, path: str) -> list[tuple[str, str]]:
    """(path, name) of each entry as written, whether or not the rest of the entry is valid."""
    if not isinstance(section, list):
        return []
    return [
        (f"{path}[{index}].name", item["name"])
        for index, item in enumerate(section)
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]


def declared_names(section: object) -> set[str]:
    """Names as written, so references resolve even when the named entry has other errors."""
    return {name for _, name in name_entries(section, "")}


def unknown(what: str, name: str, known: set[str]) -> str:
    defined = ", ".join(sorted(known)) or "none"
    return f"unknown {what} {name!r}; defined {what}s: {defined}"
