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
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeVar

import orjson

T = TypeVar("T")

# A whole string literal, or one structural character (a lone quote: a string that never ends).
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}"]', re.S)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# true, false, null, a number, and the non-standard NaN, Infinity and -Infinity some servers emit.
_SCALAR = re.compile(
    r"(?:true|false|null|NaN|-?Infinity|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(?![^\s,\]}])"
)
_WS = re.compile(r"[ \t\n\r]*")


class Broken(Exception):
    """The framing ends (truncated) or breaks (a character no JSON text has there) at `position`."""

    def __init__(self, position: int, what: str) -> None:
        super().__init__(f"{what} at char {position}")
        self.position = position
        self.what = what


def skip_ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()  # type: ignore[union-attr]  # a `*` pattern always matches


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
            raise Broken(
                i, "truncated" if i >= len(text) or text.find('"', i) < 0 else "unexpected character"
            )
        key = text[m.start() + 1 : m.end() - 1]
        i, _ = _expect(text, m.end(), ":")
        start = skip_ws(text, i)
        end = value_end(text, start)
        yield key, start, end
        i, sep = _expect(text, end, ",}")
        if sep == "}":
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
    entries: (
        list[tuple[int, int]] | None
    )  # the elements of the array member `array_key` (None: no such array)
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


# -- the same walk over bytes that arrive in pieces ---------------------------------------------------
#
# `scan_object(text, start, wanted, "entry")` needs the whole document in memory. `scan_stream`
# walks the same framing over blocks of bytes (a file read piece by piece), holding no more than the
# member or array element it is in, and reports each top-level member and each element of the
# top-level "entry" array as it ends. The patterns are those above on bytes: invalid UTF-8 can
# never be a quote, backslash or bracket, so the spans are the ones `scan_object` finds on the text
# decoded with surrogateescape. One difference, on the safe side: after a scalar, only ASCII
# whitespace counts as whitespace (the str pattern's \s also takes Unicode spaces); where that
# matters the walk breaks with "unexpected character" and the caller reads the document whole.

_B_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}"]', re.S)
_B_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_B_SCALAR = re.compile(
    rb"(?:true|false|null|NaN|-?Infinity|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
    rb"(?![^ \t\n\r\x0b\x0c\x1c-\x1f,\]}])"
)
_B_WS = re.compile(rb"[ \t\n\r]*")


class Member(NamedTuple):
    key: bytes  # the raw key literal without its quotes
    value: bytes  # an entry array is not given here: its elements come as `Element`s


class EntryArray(NamedTuple):
    """The top-level member "entry" holds an array: its `Element`s follow."""


class Element(NamedTuple):
    value: bytes  # one element of the top-level "entry" array
    strict: bool = False  # known to be strict JSON (orjson read it while finding its end)


class End(NamedTuple):
    broken: Broken | None  # None: one whole object, nothing but whitespace after it
    entries: int  # elements of the last "entry" array (as `Scan.entries`)


ScanEvent = Member | EntryArray | Element | End


class _Window:
    """The bytes from some position on: refilled from the blocks as far as a step needs."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self.blocks, self.data, self.eof = blocks, b"", False

    def more(self, keep: int) -> None:
        """Drop what lies before `keep`; read at least as much again as is kept (so a large value
        is walked O(log n) times, not once per block)."""
        data, want = self.data[keep:], max(len(self.data) - keep, 1)
        parts, got = [data], 0
        while got < want:
            block = next(self.blocks, None)
            if block is None:
                self.eof = True
                break
            parts.append(block)
            got += len(block)
        self.data = b"".join(parts)


def _bvalue_end(text: bytes, i: int) -> int:
    i = _B_WS.match(text, i).end()  # type: ignore[union-attr]  # a `*` pattern always matches
    if i >= len(text):
        raise Broken(i, "truncated")
    c = text[i]
    if c == 0x22:
        m = _B_STRING.match(text, i)
        if m is None:
            raise Broken(len(text), "truncated")
        return m.end()
    if c in (0x7B, 0x5B):
        depth, pos = 0, i
        while True:
            m = _B_TOKEN.search(text, pos)
            if m is None:
                raise Broken(len(text), "truncated")
            token, pos = m.group(), m.end()
            if token == b'"':
                raise Broken(len(text), "truncated")
            if token[0] == 0x22:
                continue
            if token in (b"{", b"["):
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return pos
    m = _B_SCALAR.match(text, i)
    if m is None:
        raise Broken(i, "unexpected character")
    return m.end()


def _element_end(text: bytes, i: int, guess: list[int]) -> tuple[int, bool]:
    """`_bvalue_end` of an array element, fast for what is nearly always there: strict JSON. orjson
    (in C) parses a slice from `i` on; a JSON value has one end only, so where it reports "unexpected
    content after document" (the "," or "]" after it), the value it read is the one `_bvalue_end`
    would find. A slice that ends inside the value is doubled (`guess[0]`: twice the last element's
    size); anything else (no strict JSON, the end of what is read so far) is walked token by token."""
    if i >= len(text) or text[i] not in (
        0x7B,
        0x5B,
    ):  # a scalar: orjson's grammar of numbers is not the walk's
        return _bvalue_end(text, i), False
    size = guess[0]
    while True:
        piece = text[i : i + size]
        try:
            orjson.loads(piece)
        except orjson.JSONDecodeError as err:
            if err.msg == "unexpected end of data" and i + size < len(text):
                size *= 2
                continue
            if err.msg == "unexpected content after document" and isinstance(err.pos, int) and err.pos > 0:
                at = err.pos if piece.isascii() else len(err.doc[: err.pos].encode("utf-8", "surrogatepass"))
                end = i + at
                while text[end - 1] in b" \t\n\r":
                    end -= 1
                guess[0] = max(4096, 2 * (end - i))
                return end, True
        else:  # the slice holds the value and at most whitespace after it
            return i + len(piece.rstrip(b" \t\n\r")), True
        break
    return _bvalue_end(text, i), False


def _bexpect(text: bytes, i: int, chars: bytes) -> tuple[int, int]:
    i = _B_WS.match(text, i).end()  # type: ignore[union-attr]  # a `*` pattern always matches
    if i >= len(text):
        raise Broken(i, "truncated")
    if text[i] not in chars:
        raise Broken(i, "unexpected character")
    return i + 1, text[i]


def scan_stream(  # noqa: C901 - one resumable scanner over a moving window: its states share `pos` and `w`
    blocks: Iterable[bytes], array_key: bytes = b"entry"
) -> Iterator[ScanEvent]:
    """`scan_object(text, skip_ws(text, 0), ..., array_key)` over `blocks` (the document's bytes in
    order), as events: each top-level `Member` (but the array), `EntryArray` then each `Element`,
    and last `End` with how the framing ended (the same `Broken.what` and entry count as
    `scan_object`; a document that does not start with "{" ends at once, broken)."""
    w = _Window(iter(blocks))
    pos = 0  # in w.data: everything before it has been reported

    def step(fn: Callable[[bytes, int], T]) -> T:
        """Run one step from `pos`; a break that more input may mend is retried with more."""
        nonlocal pos
        while True:
            try:
                return fn(w.data, pos)
            except Broken:
                if w.eof:
                    raise
                w.more(pos)
                pos = 0

    entries = 0
    guess = [4096]
    try:

        def open_(t: bytes, i: int) -> tuple[int, bool]:
            i, _ = _bexpect(t, i, b"{")
            j = _B_WS.match(t, i).end()  # type: ignore[union-attr]  # a `*` pattern always matches
            if j >= len(t):
                raise Broken(j, "truncated")
            return (j + 1, True) if t[j] == 0x7D else (i, False)

        pos, closed = step(open_)
        while not closed:

            def key_(t: bytes, i: int) -> tuple[int, bytes, int]:
                i = _B_WS.match(t, i).end()  # type: ignore[union-attr]  # a `*` pattern always matches
                m = _B_STRING.match(t, i)
                if m is None:
                    raise Broken(i, "truncated" if t.find(b'"', i) < 0 else "unexpected character")
                key = t[m.start() + 1 : m.end() - 1]
                i, _ = _bexpect(t, m.end(), b":")
                value = _B_WS.match(t, i).end()  # type: ignore[union-attr]  # a `*` pattern always matches
                if value >= len(t):
                    raise Broken(value, "truncated")
                return value, key, t[value]

            value, key, first = step(key_)
            if key == array_key and first == 0x5B:
                pos, entries = value, 0
                yield EntryArray()

                def open_array(t: bytes, i: int) -> tuple[int, bool]:
                    i, _ = _bexpect(t, i, b"[")
                    j = _B_WS.match(t, i).end()  # type: ignore[union-attr]  # a `*` pattern always matches
                    if j >= len(t):
                        raise Broken(j, "truncated")
                    return (j + 1, True) if t[j] == 0x5D else (i, False)

                pos, done = step(open_array)
                while not done:

                    def element(t: bytes, i: int) -> tuple[int, tuple[int, bool]]:
                        start = _B_WS.match(t, i).end()  # type: ignore[union-attr]  # `*` always matches
                        return start, _element_end(t, start, guess)

                    start, (end, strict) = step(element)
                    pos = end  # reported below: a break after it keeps it, as `_elements_into`
                    entries += 1
                    yield Element(w.data[start:end], strict)

                    def separator(t: bytes, i: int) -> tuple[int, int]:
                        return _bexpect(t, i, b",]")

                    pos, sep = step(separator)
                    done = sep == 0x5D
                end = pos
            else:
                pos = value

                def member_value(t: bytes, i: int) -> tuple[int, int]:
                    return i, _bvalue_end(t, i)

                start, end = step(member_value)
                pos = end
                yield Member(key, w.data[start:end])

            def next_(t: bytes, i: int) -> tuple[int, int]:
                return _bexpect(t, i, b",}")

            pos, sep = step(next_)
            closed = sep == 0x7D

        while True:  # nothing but whitespace may follow
            if _B_WS.match(w.data, pos).end() < len(w.data):  # type: ignore[union-attr]  # `*` always matches
                raise Broken(pos, "followed by more data")
            if w.eof:
                break
            w.more(len(w.data))
            pos = 0
    except Broken as err:
        yield End(err, entries)
        return
    yield End(None, entries)
