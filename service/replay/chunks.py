"""The partitioned replay engine's input (service/replay/parallel.py), cut for step 1: NDJSON files
in byte ranges of whole lines, anything else (gzip, a pretty-printed document) whole, read as the
SQLite engine reads it (`file_documents`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from service.replay.documents import (
    BLOCK,
    READ_ERRORS,
    StreamedBundle,
    file_documents,
    first_line,
    line_documents,
    unreadable,
)


@dataclass(frozen=True)
class Chunk:
    """What one step-1 task reads."""

    number: int  # position in the input: resources are numbered (number << 32) + 1, + 2, ...
    path: str
    start: int | None  # byte range [start, end) of whole lines; None: the whole file (`file_documents`)
    end: int | None


def input_size(path: Path) -> int:
    """How much input a file is (the number of chunks and partitions grows with it)."""
    size = path.stat().st_size
    return size * 8 if path.suffix == ".gz" else size  # a rough guess at the uncompressed size


def plan(paths: Iterable[Path], chunk_bytes: int) -> list[Chunk]:
    """Byte ranges of whole lines for NDJSON files; one whole-file chunk for anything else (gzip, a
    pretty-printed document), which `file_documents` then reads as the SQLite engine does. Lines are
    found by reading at most a block of them at a time: a long line is never held whole here."""
    chunks: list[Chunk] = []
    for path in paths:
        if path.suffix == ".gz":
            chunks.append(Chunk(len(chunks), str(path), None, None))
            continue
        try:
            with open(path, "rb") as fh:
                if (
                    first_line(fh).document is not False
                ):  # a document, or a long line only `file_documents` can tell
                    chunks.append(Chunk(len(chunks), str(path), None, None))
                    continue
                size = fh.seek(0, os.SEEK_END)
                start = 0
                while start < size:
                    fh.seek(min(start + chunk_bytes, size) - 1)
                    while (part := fh.readline(BLOCK)) and not part.endswith(b"\n"):
                        pass  # to the end of the line that holds the byte before the target
                    end = fh.tell()
                    chunks.append(Chunk(len(chunks), str(path), start, end))
                    start = end
        except READ_ERRORS as err:
            raise unreadable(path, err) from None
    return chunks


def documents(chunk: Chunk) -> Iterator[bytes | StreamedBundle]:
    """The documents of a chunk: its lines, or the whole file's documents."""
    if chunk.start is None:
        yield from file_documents(Path(chunk.path))
        return
    assert chunk.end is not None
    try:
        with open(chunk.path, "rb") as fh:
            fh.seek(chunk.start)
            yield from line_documents(Path(chunk.path), fh, chunk.start, chunk.end)
    except READ_ERRORS as err:
        raise unreadable(chunk.path, err) from None
