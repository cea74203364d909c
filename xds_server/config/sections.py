"""The snapshot file parsed section by section, each section's parse kept by its text.

Parsing the YAML is most of a reload's cost (about 60-110 ms for 100 pools of 20
endpoints with libyaml, before validation), and an edit usually touches one pool. So the
text is cut where the document's own structure says a part ends: at each top-level key
(a line starting in column 0), and in `pools:` and `listeners:` at each item of their
block sequence (a line `- ` at the items' indentation). Each part is parsed on its own,
and a part whose text is the same as in the last document is not parsed again. The
reader uses the items' texts the same way, to skip validating a pool or a listener
whose text did not change (`Memo`).

The parts must give exactly what parsing the whole text gives, or the cut is not used
(`split` answers None and the whole text is parsed as before):

* Only a plain document is cut: no directives, no `---` or `...` markers, no line breaks
  other than `\\n` and `\\r\\n`, no byte-order mark, the top level a block mapping.
* A part that does not parse on its own, or not to the expected shape (a mapping for a
  top-level part, a one-item list for an item), sends the whole text to the full parse,
  which also words the problem with the file's own line numbers. That covers a cut
  inside a quoted or flow scalar (the first part is left unterminated) and an alias to
  an anchor in another part (undefined in the part). An alias whose anchor is in the
  same part means the same thing in the part and in the whole: in YAML an alias names
  the closest anchor before it, and that one is in the part.
* An anchor defined in two parts (PyYAML refuses a document that defines one twice, while
  each part alone would parse) sends the whole text to the full parse too.
* Block scalars, comments and blank lines stay with the part they are in: a line at a
  lower indentation ends a block scalar in the whole document too.

The parsed values are shared between documents, so nothing may change them: the reader
only reads its input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from xds_server.config.types import Listener, Pool

__all__ = ["Document", "Memo", "split"]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: Top-level sections whose block-sequence items are parsed and validated one by one.
ITEM_SECTIONS: Final = ("pools", "listeners")
_ITEM_HEADER: Final = re.compile(r"(pools|listeners)[ \t]*:[ \t]*(#.*)?\r?\n?")
_FOREIGN_BREAKS: Final = ("\x85", "\u2028", "\u2029", "\ufeff")


@dataclass(frozen=True, slots=True)
class Part:
    """One top-level section's text; for a cut section, its header (the key line and the
    comments before the first item) and each item's text as well."""

    text: str
    header: str = ""
    items: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Document:
    """The parsed document and, per cut section, the source text of each item."""

    value: dict[Any, Any]
    items: Mapping[str, tuple[str, ...]]


def _is_blank_or_comment(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_item(line: str, indent: int) -> bool:
    rest = line[indent:]
    return _indent(line) == indent and (rest.startswith("- ") or rest.rstrip("\r\n") == "-")


def _cut(lines: list[str]) -> Part:
    """A section, its items cut apart when its body is a plain block sequence."""
    text = "".join(lines)
    content = [i for i, line in enumerate(lines) if not _is_blank_or_comment(line)]
    if not _ITEM_HEADER.fullmatch(lines[content[0]]):  # comments may come before the key
        return Part(text)
    body = content[1:]
    if not body or not _is_item(lines[body[0]], indent := _indent(lines[body[0]])):
        return Part(text)
    starts: list[int] = []
    for i in body:
        if _is_item(lines[i], indent):
            starts.append(i)
        elif _indent(lines[i]) <= indent:
            return Part(text)  # something at the items' level that is not an item
    ends = [*starts[1:], len(lines)]
    items = tuple("".join(lines[a:b]) for a, b in zip(starts, ends, strict=True))
    return Part(text, "".join(lines[: starts[0]]), items)


def split(text: str) -> list[Part] | None:
    """The document's top-level parts, items cut where possible; None: parse it whole."""
    if any(mark in text for mark in _FOREIGN_BREAKS) or text.count("\r") != text.count("\r\n"):
        return None
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    starts: list[int] = []
    for i, line in enumerate(lines):
        if _is_blank_or_comment(line):
            continue
        if line.startswith(" "):
            if not starts:
                return None  # indented content before the first key
            continue
        if line.startswith(("---", "...", "%", "\t")):
            return None  # directives, several documents, a tab where indentation goes
        if line.startswith("-"):
            if not starts or not _is_item(line, 0):
                return None  # a sequence at the top, or a key starting with '-'
            continue
        starts.append(i)
    if not starts:
        return None
    starts[0] = 0  # comments before the first key go with the first part
    ends = [*starts[1:], len(lines)]
    return [_cut(lines[a:b]) for a, b in zip(starts, ends, strict=True)]


_MISSING: Final = object()
#: An anchor as the scanner sees one (also matches some text in quoted scalars: that only
#: sends a document to the whole-text parse).
_ANCHOR: Final = re.compile(r"(?:^|[\s\[\]{},:?-])&([^\s\[\]{},]+)", re.MULTILINE)


def _chunks(parts: list[Part]) -> list[str]:
    return [c for p in parts for c in ([p.text] if p.items is None else [p.header, *p.items])]


def _shared_anchors(parts: list[Part]) -> bool:
    """Whether two parts define the same anchor: the whole document is then refused (PyYAML
    allows an anchor name once per document), while each part alone would parse."""
    owner: dict[str, int] = {}
    for index, chunk in enumerate(_chunks(parts)):
        for name in set(_ANCHOR.findall(chunk)):
            if owner.setdefault(name, index) != index:
                return True
    return False


def _parse(text: str) -> object:
    return yaml.load(text, Loader=_Loader)


@dataclass(slots=True)
class Memo:
    """What the last document's parts parsed and validated to, kept by their text.

    Holds only the parts of the latest document, so it never grows past one file's worth.
    `pools` and `listeners` keep the validated object of each item that read without a
    problem, by its text and what else its reading depends on (the policy modules
    allowed; the pool names a listener's routes may name).
    """

    parsed: dict[str, object] = field(default_factory=dict)
    pools: dict[tuple[str, tuple[str, ...]], Pool] = field(default_factory=dict)
    listeners: dict[tuple[str, frozenset[str]], Listener] = field(default_factory=dict)
    #: How many parts the last load parsed, and how many it took from the memo.
    last_parsed: int = 0
    last_reused: int = 0

    def load(self, text: str) -> Document | None:
        """The document parsed part by part (None: it cannot be cut, or a part does not
        parse on its own; then the caller parses the whole text)."""
        parts = split(text)
        if parts is None or ("&" in text and _shared_anchors(parts)):
            return None
        fresh: dict[str, object] = {}
        counts = [0, 0]

        def parse(chunk: str) -> object:
            value = self.parsed.get(chunk, _MISSING)
            if value is _MISSING:
                counts[0] += 1
                value = _parse(chunk)
            else:
                counts[1] += 1
            fresh[chunk] = value
            return value

        try:
            document, items = _assemble(parts, parse)
        except Exception:  # the whole text's parse words the problem, with its line numbers
            return None
        if document is None:
            return None
        self.parsed = fresh
        self.last_parsed, self.last_reused = counts
        return Document(document, items)

    def keep_only(self, items: Mapping[str, tuple[str, ...]]) -> None:
        """Forget validated items that the latest document no longer has."""
        pools = set(items.get("pools", ()))
        listeners = set(items.get("listeners", ()))
        self.pools = {k: v for k, v in self.pools.items() if k[0] in pools}
        self.listeners = {k: v for k, v in self.listeners.items() if k[0] in listeners}


def _assemble(
    parts: list[Part], parse: Callable[[str], object]
) -> tuple[dict[Any, Any] | None, dict[str, tuple[str, ...]]]:
    """The document from its parts (later keys win, as in one parse); None if a part does
    not have the shape its place asks for."""
    document: dict[Any, Any] = {}
    items: dict[str, tuple[str, ...]] = {}
    for part in parts:
        if part.items is None:
            value = parse(part.text)
            if not isinstance(value, dict) or not value:
                return None, {}
            for key in value:
                items.pop(key, None)
            document.update(value)
            continue
        header = parse(part.header)
        if not isinstance(header, dict) or len(header) != 1:
            return None, {}
        [(key, empty)] = header.items()
        if empty is not None or key not in ITEM_SECTIONS:
            return None, {}
        values = []
        for chunk in part.items:
            value = parse(chunk)
            if not isinstance(value, list) or len(value) != 1:
                return None, {}
            values.append(value[0])
        document[key] = values
        items[key] = part.items
    return document, items
