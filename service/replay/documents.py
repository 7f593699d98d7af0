"""Replay's input: the JSON documents of input files (NDJSON lines, or one pretty-printed document),
a large Bundle read entry by entry (`StreamedBundle`) so that memory does not grow with it. Shared by
both replay engines (the partitioned one reads byte ranges of lines: `line_documents`)."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

import orjson

from service.errors import InputError
from service.fhir import jsonscan, model, raw


def files(inputs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"cannot read input {item}: no such file or directory")
    return files


LARGE_DOCUMENT = (
    4 << 20
)  # a document (file or line) at least this large is read entry by entry (whole: ~6x its size)
BLOCK = 1 << 20
READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip: a cut (EOFError) or corrupt (zlib.error) stream


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]  # typeshed: a GzipFile is no IO[bytes]
    return open(path, "rb")


def unreadable(path: Path | str, err: BaseException) -> InputError:
    if isinstance(err, EOFError):
        why = "compressed data ends early (truncated)"
    elif isinstance(err, zlib.error | gzip.BadGzipFile):
        why = f"compressed data is corrupt ({err})"
    else:
        why = getattr(err, "strerror", None) or str(err)
    return InputError(f"cannot read input {path}: {why}")


def file_documents(path: Path) -> Iterator[bytes | StreamedBundle]:
    """NDJSON lines, or the whole file when it is one (pretty-printed) JSON document. A document of
    LARGE_DOCUMENT bytes or more (a whole file, or one line) that is a Bundle comes as a
    `StreamedBundle`: read entry by entry, to the same items as `raw.decode` of its bytes."""
    try:
        with _open(path) as fh:
            first = first_line(fh)
            if first.document is None:  # a long first line that neither closes nor opens like an object
                fh.seek(0)
                line = fh.readline()
                first = FirstLine(line, len(line), _starts_document(line))
            if first.document:
                yield from _whole_document(path, fh, first.line)
                return
            if _partial(first.line):
                yield from _large_line(path, 0, first.end)
            elif first.line.strip():
                yield first.line
            yield from line_documents(path, fh, first.end, None)
    except READ_ERRORS as err:
        raise unreadable(path, err) from None


def documents(inputs: Sequence[str | Path]) -> Iterator[bytes]:
    """Every JSON document of the inputs (files or directories), in input order: what pass 1 reads
    (a large Bundle read whole here: callers want its bytes)."""
    for path in files(inputs):
        for document in file_documents(path):
            yield document if isinstance(document, bytes) else document.data()


class FirstLine(NamedTuple):
    line: bytes  # the first line, or its first LARGE_DOCUMENT bytes
    end: int  # the offset just past it
    document: (
        bool | None
    )  # `_starts_document` of it (None: a long line that cannot tell without reading it whole)


def _partial(line: bytes) -> bool:
    return len(line) >= LARGE_DOCUMENT and not line.endswith(b"\n")


def first_line(fh: IO[bytes]) -> FirstLine:
    """The first line and whether it starts a multi-line document, told without holding a long
    first line whole: one that closes like a JSON value ("}", "]") is an NDJSON line as
    `_starts_document` says; one that opens an object or array and does not close it cannot be
    JSON, so it starts a document. `fh` is left just past the line."""
    first = fh.readline(LARGE_DOCUMENT)
    if not _partial(first):
        return FirstLine(first, len(first), _starts_document(first))
    end, tail = len(first), first.rstrip()[-1:]
    while more := fh.readline(BLOCK):
        end += len(more)
        if more.strip():
            tail = more.rstrip()[-1:]
        if more.endswith(b"\n"):
            break
    head = first.lstrip()[:1]
    return FirstLine(first, end, False if tail in (b"}", b"]") else True if head in (b"{", b"[") else None)


def _whole_document(path: Path, fh: IO[bytes], first: bytes) -> Iterator[bytes | StreamedBundle]:
    """A file that starts a multi-line document. A pretty-printed document; if the whole file is
    not one document either, fall back to lines so that one corrupt line does not hide the good
    ones. A document that is one whole but not strict JSON (a NaN token, bytes that are not UTF-8,
    one entry nested too deeply) is read entry by entry (`raw.read`)."""
    if not _partial(first):
        whole = first + fh.read(LARGE_DOCUMENT)
        if not fh.read(1):  # small: read as it always was
            yield from _whole_or_lines(whole)
            return
        del whole
    streamed = _streamed(path, 0, None)
    if streamed is not None and (
        streamed.cut is None or streamed.has_items()
    ):  # a Bundle cut short: `_cut_bundle`
        yield streamed
        return
    with _open(path) as again:  # not a Bundle that can be walked: as it always was, whole
        yield from _whole_or_lines(again.read())


def _whole_or_lines(whole: bytes) -> Iterator[bytes]:
    if _is_json(whole) or _one_document(whole) or _cut_bundle(whole):
        yield whole
        return
    for line in whole.splitlines():
        if line.strip():
            yield line


def line_documents(path: Path, fh: IO[bytes], pos: int, stop: int | None) -> Iterator[bytes | StreamedBundle]:
    """The non-blank lines from `pos` (where `fh` is) to `stop` (a line boundary; None: the end);
    a line of LARGE_DOCUMENT bytes or more is read as `_large_line`, never whole."""
    while stop is None or pos < stop:
        line = fh.readline(LARGE_DOCUMENT)
        if not line:
            return
        start, pos = pos, pos + len(line)
        if _partial(line):
            while more := fh.readline(BLOCK):
                pos += len(more)
                if more.endswith(b"\n"):
                    break
            yield from _large_line(path, start, pos)
        elif not line.isspace():  # as `line.strip()`: lines are never empty
            yield line


def _large_line(path: Path, start: int, end: int) -> Iterator[bytes | StreamedBundle]:
    streamed = _streamed(path, start, end - start)
    if streamed is not None:
        yield streamed
        return
    with _open(path) as fh:
        fh.seek(start)
        line = fh.read(end - start)
    if line.strip():
        yield line


def _blocks(fh: IO[bytes], length: int | None) -> Iterator[bytes]:
    while length is None or length > 0:
        block = fh.read(BLOCK if length is None else min(BLOCK, length))
        if not block:
            return
        if length is not None:
            length -= len(block)
        yield block


def _streamed(path: Path, start: int, length: int | None) -> StreamedBundle | None:
    """The document at [start, start + length) as a `StreamedBundle`, or None when it is not a
    Bundle that can be walked entry by entry to the same items as `raw.decode` of it whole: not
    an object, one "resourceType" other than "Bundle" or not exactly one, not exactly one "entry"
    array, a key with an escape in it, or framing broken other than by ending early. This first
    walk also tells which path `raw.read` of the whole would take (`raw.Checks`)."""
    checks, members, types, arrays, targets = raw.Checks(), [], [], 0, {}
    end: jsonscan.End | None = None
    with _open(path) as fh:
        fh.seek(start)
        for event in jsonscan.scan_stream(_blocks(fh, length)):
            if isinstance(event, jsonscan.Element):
                checks.add_entry(event.value, event.strict)
                if (target := raw.streamed_target(event.value)) is not None:
                    targets[target[0]] = target[1]
            elif isinstance(event, jsonscan.Member):
                if b"\\" in event.key or event.key == b"entry":
                    return None
                if event.key == b"resourceType":
                    if event.value != b'"Bundle"':
                        return None  # a single resource (a large note, say): read whole
                    types.append(event.value)
                members.append((event.key, event.value))
            elif isinstance(event, jsonscan.EntryArray):
                arrays += 1
            else:
                end = event
    if (
        end is None
        or arrays != 1
        or types != [b'"Bundle"']
        or (end.broken is not None and end.broken.what != "truncated")
    ):
        return None
    checks.add_members(members)
    cut = None if end.broken is None else end.entries
    return StreamedBundle(path, start, length, checks.path(end.broken is None), cut, targets)


@dataclass(frozen=True)
class StreamedBundle:
    """A large Bundle document of a file (bytes [start, start + length); length None: to the end),
    whose resources are read entry by entry: the second walk (`_streamed` made the first)."""

    path: Path
    start: int
    length: int | None
    how: str  # the path `raw.read` of the whole takes (raw.TYPED, ...)
    cut: int | None  # the framing ends early after this many entries (None: whole)
    targets: Mapping[str, str] = field(default_factory=dict)  # entries by urn: fullUrl (raw.entry_target)

    def entries(self) -> Iterator[bytes]:
        try:
            with _open(self.path) as fh:
                fh.seek(self.start)
                for event in jsonscan.scan_stream(_blocks(fh, self.length)):
                    if isinstance(event, jsonscan.Element):
                        yield event.value
        except READ_ERRORS as err:
            raise unreadable(self.path, err) from None

    def __iter__(self) -> Iterator[model.Resource | model.Undecodable]:
        """The items of `raw.decode` of the whole document, in order."""
        for entry in self.entries():
            yield from raw.entry_items(entry, self.how, self.targets)
        if self.cut is not None:
            yield raw.cut_short(self.cut)

    def has_items(self) -> bool:
        return any(raw.entry_items(entry, self.how) for entry in self.entries())

    def data(self) -> bytes:
        with _open(self.path) as fh:
            fh.seek(self.start)
            return fh.read() if self.length is None else fh.read(self.length)


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def _starts_document(first: bytes) -> bool:
    """Whether a file whose first line is `first` may be one multi-line JSON document. A first line
    that is a JSON value, or that closes like one (a damaged NDJSON line), starts NDJSON: then the
    file is read line by line and never held in memory as a whole."""
    line = first.strip()
    return bool(line) and not line.endswith((b"}", b"]")) and not _is_json(first)


def _cut_bundle(data: bytes) -> bool:
    """A Bundle cut short (a transfer or a copy that ended early): its entries before the cut are
    read, and the cut is one rejection (rather than every later line of it one)."""
    doc = raw.read(data)
    return (
        doc.resource_type == "Bundle"
        and bool(doc.items)
        and doc.remainder is not None
        and "truncated" in doc.remainder.reason
    )


def _one_document(data: bytes) -> bool:
    """One well-framed JSON document (perhaps not strict JSON inside), nothing after it."""
    return jsonscan.single_document(data.removeprefix(raw.BOM).decode("utf-8", "surrogateescape"))
