"""Find the spans of JSON values without building them: the salvage path of `raw`.

A document that a strict parser refuses as a whole (a NaN token, bytes that are not UTF-8, one
entry nested 100 000 levels deep, a syntax error inside one entry) is usually still well framed:
its brackets balance and its strings end. This module walks that framing iteratively (no
recursion, so any depth is safe) to find where each member of an object and each element of an
array begins and ends, so each Bundle entry can be parsed on its own and one bad entry does not
take its neighbours with it. It never interprets values; `raw` parses the spans it returns.

Works on `str` (bytes decoded with ``errors="surrogateescape"``, so invalid bytes survive as lone
surrogates and positions stay meaningful).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

# A whole string literal, or one structural character (a lone quote: a string that never ends).
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}"]', re.S)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# true, false, null, a number, and the non-standard NaN, Infinity and -Infinity some servers emit.
_SCALAR = re.compile(r"(?:true|false|null|NaN|-?Infinity|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(?![^\s,\]}])")
_WS = re.compile(r"[ \t\n\r]*")


class Broken(Exception):
    """The framing ends (truncated) or breaks (a character no JSON text has there) at `position`."""

    def __init__(self, position: int, what: str) -> None:
        super().__init__(f"{what} at char {position}")
        self.position = position
        self.what = what


def skip_ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()  # type: ignore[union-attr]


def value_end(text: str, i: int) -> int:
    """The index just past the value that starts at `i` (after optional whitespace)."""
    i = skip_ws(text, i)
    if i >= len(text):
        raise Broken(i, "truncated")
    c = text[i]
    if c == '"':
        m = _STRING.match(text, i)
        if m is None:
            raise Broken(len(text), "truncated")
        return m.end()
    if c in "{[":
        depth = 0
        pos = i
        while True:
            m = _TOKEN.search(text, pos)
            if m is None:
                raise Broken(len(text), "truncated")
            token = m.group()
            pos = m.end()
            if token == '"':
                raise Broken(len(text), "truncated")  # a string that never ends
            if token[0] == '"':
                continue
            if token in "{[":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return pos
    m = _SCALAR.match(text, i)
    if m is None:
        raise Broken(i, "unexpected character")
    return m.end()


def _expect(text: str, i: int, chars: str) -> tuple[int, str]:
    i = skip_ws(text, i)
    if i >= len(text):
        raise Broken(i, "truncated")
    if text[i] not in chars:
        raise Broken(i, "unexpected character")
    return i + 1, text[i]


def members(text: str, i: int) -> Iterator[tuple[str, int, int]]:
    """(raw key literal without quotes, value start, value end) of the object starting at `i`."""
    i, _ = _expect(text, i, "{")
    j = skip_ws(text, i)
    if j < len(text) and text[j] == "}":
        return
    while True:
        i = skip_ws(text, i)
        m = _STRING.match(text, i)
        if m is None:
            raise Broken(i, "truncated" if i >= len(text) or text.find('"', i) < 0 else "unexpected character")
        key = text[m.start() + 1 : m.end() - 1]
        i, _ = _expect(text, m.end(), ":")
        start = skip_ws(text, i)
        end = value_end(text, start)
        yield key, start, end
        i, sep = _expect(text, end, ",}")
        if sep == "}":
            return


def elements(text: str, i: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each element of the array starting at `i`."""
    i, _ = _expect(text, i, "[")
    j = skip_ws(text, i)
    if j < len(text) and text[j] == "]":
        return
    while True:
        start = skip_ws(text, i)
        end = value_end(text, start)
        yield start, end
        i, sep = _expect(text, end, ",]")
        if sep == "]":
            return


def object_members(text: str, i: int, wanted: frozenset[str]) -> dict[str, tuple[int, int]]:
    """The spans of the `wanted` members of the object at `i` (the last one wins, as parsers do)."""
    found: dict[str, tuple[int, int]] = {}
    for key, start, end in members(text, i):
        if key in wanted:
            found[key] = (start, end)
    return found


def single_document(text: str) -> bool:
    """True when `text` is one value (well framed) with nothing but whitespace after it."""
    try:
        end = value_end(text, 0)
    except Broken:
        return False
    return skip_ws(text, end) == len(text)


class Scan(NamedTuple):
    spans: dict[str, tuple[int, int]]  # the wanted top-level members seen
    entries: list[tuple[int, int]] | None  # the elements of the array member `array_key` (None: no such array)
    broken: Broken | None  # where the framing ended or broke (None: one whole document)


def scan_object(text: str, start: int, wanted: frozenset[str], array_key: str) -> Scan:
    """Walk the object at `start`: the spans of its `wanted` members and of each element of its
    array member `array_key`, as far as the framing goes (a truncated Bundle still gives the
    entries before the cut)."""
    spans: dict[str, tuple[int, int]] = {}
    entries: list[tuple[int, int]] | None = None
    try:
        i, _ = _expect(text, start, "{")
        j = skip_ws(text, i)
        if j < len(text) and text[j] == "}":
            i = j + 1
        else:
            while True:
                i = skip_ws(text, i)
                m = _STRING.match(text, i)
                if m is None:
                    raise Broken(i, "truncated" if text.find('"', i) < 0 else "unexpected character")
                key = text[m.start() + 1 : m.end() - 1]
                i, _ = _expect(text, m.end(), ":")
                value = skip_ws(text, i)
                if key == array_key and value < len(text) and text[value] == "[":
                    entries = []  # the last one wins, as parsers do
                    end = _elements_into(text, value, entries)
                else:
                    end = value_end(text, value)
                    if key in wanted:
                        spans[key] = (value, end)
                i, sep = _expect(text, end, ",}")
                if sep == "}":
                    break
        if skip_ws(text, i) != len(text):
            raise Broken(i, "followed by more data")
    except Broken as err:
        return Scan(spans, entries, err)
    return Scan(spans, entries, None)


def _elements_into(text: str, i: int, out: list[tuple[int, int]]) -> int:
    """Append the spans of the array's elements to `out` as they are found; the array's end."""
    i, _ = _expect(text, i, "[")
    j = skip_ws(text, i)
    if j < len(text) and text[j] == "]":
        return j + 1
    while True:
        start = skip_ws(text, i)
        end = value_end(text, start)
        out.append((start, end))
        i, sep = _expect(text, end, ",]")
        if sep == "]":
            return i
