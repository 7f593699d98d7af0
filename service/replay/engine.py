"""`replay`: run the clinical core over FHIR files and write its decisions (the project's oracle).

Memory stays flat as input grows: pass 1 streams the input into a temporary SQLite file
(latest version of each Observation, DiagnosticReport membership, rejections); pass 2 reads panels
back in order of their first available member and runs the core. Only per-patient episode state is
held in memory.

That is the "sqlite" engine, kept as the reference. The default "partitioned" engine
(service/replay/parallel.py) computes the same bytes from the same pass-1 rows (`read_document`) and the same
pass-2 loop (`Replay.decide`), in partitions spread over worker processes.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import itertools
import re
import sqlite3
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgspec
import orjson

from service.fhir import jsonscan, raw
from service.core.context import PatientContext, care_team_members, patient_context, requester
from service.core.copies import content_key, distinct, one_version, placed, stamped, unplaced_rejection
from service.core.episodes import PatientState
from service.fhir.fhirtime import from_epoch_us
from service.core.observations import (
    DEFAULT_READ,
    LabResult,
    ReadPolicy,
    Rejected,
    canonical_reference,
    conflict_rejection,
    literal_reference,
    normalise,
    undecodable_rejection,
    version_number,
)
from service.core.panels import (
    PanelDecision,
    collection_key,
    decide,
    report_key,
    report_members,
    specimen_key,
)
from service.core.recipients import choose
from service.core.references import Resolved
from service.core.rules import Rules
from service.core.undecided import REASONS, ignored_unassessed, panel_unassessed, rejection_unassessed
from service.config import AlertSettings
from service.errors import InputError
from service.output.events import rejected_record
from service.output.outcomes import QUARANTINED, failure_record, panel_outcome

_BATCH = 5_000
_encode = msgspec.msgpack.Encoder().encode
_decode_result = msgspec.msgpack.Decoder(LabResult).decode
_decode_rejected = msgspec.msgpack.Decoder(Rejected).decode
_decode_resource = msgspec.msgpack.Decoder(raw.Resource).decode
IDENTICAL_COPY = "identical copy of a version already read"  # ReplayStats.ignored key


@dataclass
class ReplayStats:
    documents: int = 0
    resources: int = 0
    observations: int = 0
    panels: int = 0
    stale_panels: int = 0
    newest_updated_us: int | None = None  # the newest meta.lastUpdated read: replay's reading clock
    ignored: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    unassessed: Counter[str] = field(default_factory=Counter)  # results of pass 2 that reached no assessment

    def not_decided(self) -> dict[str, int]:
        """Every result that reached no assessment, by reason (service/core/undecided.py): what
        pass 2 counted and what pass 1 ignored."""
        counts = Counter(self.unassessed)
        for reason, n in self.ignored.items():
            if (why := ignored_unassessed(reason)) is not None:
                counts[why] += n
        return {reason: counts[reason] for reason in REASONS if counts[reason]}


# -- input ---------------------------------------------------------------------------------------


def _files(inputs: Sequence[str | Path]) -> list[Path]:
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


LARGE_DOCUMENT = 4 << 20  # a document (file or line) at least this large is read entry by entry (whole: ~6x its size)
_BLOCK = 1 << 20
_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip: a cut (EOFError) or corrupt (zlib.error) stream


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def _unreadable(path: Path | str, err: BaseException) -> InputError:
    if isinstance(err, EOFError):
        why = "compressed data ends early (truncated)"
    elif isinstance(err, zlib.error | gzip.BadGzipFile):
        why = f"compressed data is corrupt ({err})"
    else:
        why = getattr(err, "strerror", None) or str(err)
    return InputError(f"cannot read input {path}: {why}")


def _documents(path: Path) -> Iterator[bytes | StreamedBundle]:
    """NDJSON lines, or the whole file when it is one (pretty-printed) JSON document. A document of
    LARGE_DOCUMENT bytes or more (a whole file, or one line) that is a Bundle comes as a
    `StreamedBundle`: read entry by entry, to the same items as `raw.decode` of its bytes."""
    try:
        with _open(path) as fh:
            first = _first_line(fh)
            if first.document is None:  # a long first line that neither closes nor opens like an object
                fh.seek(0)
                line = fh.readline()
                first = _FirstLine(line, len(line), _starts_document(line))
            if first.document:
                yield from _whole_document(path, fh, first.line)
                return
            if _partial(first.line):
                yield from _large_line(path, 0, first.end)
            elif first.line.strip():
                yield first.line
            yield from _line_documents(path, fh, first.end, None)
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None


def documents(inputs: Sequence[str | Path]) -> Iterator[bytes]:
    """Every JSON document of the inputs (files or directories), in input order: what pass 1 reads
    (a large Bundle read whole here: callers want its bytes)."""
    for path in _files(inputs):
        for document in _documents(path):
            yield document if isinstance(document, bytes) else document.data()


class _FirstLine(NamedTuple):
    line: bytes  # the first line, or its first LARGE_DOCUMENT bytes
    end: int  # the offset just past it
    document: bool | None  # `_starts_document` of it (None: a long line that cannot tell without reading it whole)


def _partial(line: bytes) -> bool:
    return len(line) >= LARGE_DOCUMENT and not line.endswith(b"\n")


def _first_line(fh: IO[bytes]) -> _FirstLine:
    """The first line and whether it starts a multi-line document, told without holding a long
    first line whole: one that closes like a JSON value ("}", "]") is an NDJSON line as
    `_starts_document` says; one that opens an object or array and does not close it cannot be
    JSON, so it starts a document. `fh` is left just past the line."""
    first = fh.readline(LARGE_DOCUMENT)
    if not _partial(first):
        return _FirstLine(first, len(first), _starts_document(first))
    end, tail = len(first), first.rstrip()[-1:]
    while more := fh.readline(_BLOCK):
        end += len(more)
        if more.strip():
            tail = more.rstrip()[-1:]
        if more.endswith(b"\n"):
            break
    head = first.lstrip()[:1]
    return _FirstLine(first, end, False if tail in (b"}", b"]") else True if head in (b"{", b"[") else None)


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
    if streamed is not None and (streamed.cut is None or streamed.has_items()):  # a Bundle cut short: `_cut_bundle`
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


def _line_documents(path: Path, fh: IO[bytes], pos: int, stop: int | None) -> Iterator[bytes | StreamedBundle]:
    """The non-blank lines from `pos` (where `fh` is) to `stop` (a line boundary; None: the end);
    a line of LARGE_DOCUMENT bytes or more is read as `_large_line`, never whole."""
    while stop is None or pos < stop:
        line = fh.readline(LARGE_DOCUMENT)
        if not line:
            return
        start, pos = pos, pos + len(line)
        if _partial(line):
            while more := fh.readline(_BLOCK):
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
        block = fh.read(_BLOCK if length is None else min(_BLOCK, length))
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
    if end is None or arrays != 1 or types != [b'"Bundle"'] or (end.broken is not None and end.broken.what != "truncated"):
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
        except _READ_ERRORS as err:
            raise _unreadable(self.path, err) from None

    def __iter__(self) -> Iterator[raw.Resource | raw.Undecodable]:
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
    return (doc.resource_type == "Bundle" and bool(doc.items) and doc.remainder is not None
            and "truncated" in doc.remainder.reason)


def _one_document(data: bytes) -> bool:
    """One well-framed JSON document (perhaps not strict JSON inside), nothing after it."""
    return jsonscan.single_document(data.removeprefix(raw.BOM).decode("utf-8", "surrogateescape"))


# -- ordering ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # versionIds repeat ("1", "2", ...)
def availability_key(ref: str | None, vu: int, vv: int, seq: int) -> str:
    """`_AVAILABILITY` in Python, for the partitioned engine: the same order (seq is zero-padded
    wider because that engine numbers resources (chunk << 32) + position)."""
    if vu >= 0:
        return f"{vu:020d}\x1f{ref or ''}\x1f{vv}\x1f{seq:020d}"
    return f"~{seq:020d}"


# -- pass 1: documents -> rows (shared by both engines) ----------------------------------------


@dataclass
class Rows:
    """What pass 1 makes of a stretch of input: rows of the obs, member and rejected tables."""

    obs: list[tuple[Any, ...]] = field(default_factory=list)  # ref, vu, vv, seq, patient, pkey, fkey, data, rej
    member: list[tuple[str, str]] = field(default_factory=list)  # Observation ref, its DiagnosticReport's key
    rejected: list[tuple[Any, ...]] = field(default_factory=list)  # ref, vu, vv, seq, data
    context: list[tuple[str, str, bytes]] = field(default_factory=list)  # patient, resourceType, Resource


@dataclass(frozen=True, slots=True)
class PatientFacts:
    """What the input says of a patient beyond its Observations (the live loop reads the same from
    the server): age and individual threshold, the requesters of its orders, its care team."""

    context: PatientContext = PatientContext()
    requesters: Mapping[str, str | None] = field(default_factory=dict)
    care_team: tuple[str, ...] = ()


def patient_facts(rows: Iterable[tuple[str, str, bytes]], rules: Rules) -> dict[str, PatientFacts]:
    by_kind: dict[str, dict[str, list[raw.Resource]]] = {}
    for patient, kind, data in rows:
        by_kind.setdefault(patient, {}).setdefault(kind, []).append(_decode_resource(data))
    facts: dict[str, PatientFacts] = {}
    for patient, kinds in by_kind.items():
        record = (kinds.get("Patient") or [None])[-1]
        orders = {f"ServiceRequest/{r.id}": requester(r) for r in kinds.get("ServiceRequest", ()) if r.id}
        facts[patient] = PatientFacts(
            patient_context(patient, record, kinds.get("Condition", ()), rules), orders,
            tuple(care_team_members(kinds.get("CareTeam", ()))),
        )
    return facts


def read_document(document: bytes | StreamedBundle, seq: int, stats: ReplayStats, rows: Rows,
                  flush: Callable[[Rows], None] | None = None, batch: int = _BATCH, policy: ReadPolicy = DEFAULT_READ) -> int:
    """Decode and sort one document into `rows`, numbering its resources from `seq` + 1 (the
    input position that breaks ties in the order of availability). Returns the last number used.
    `flush`: called (to empty `rows`) whenever they hold `batch` rows, so that one large document
    does not pile up in memory."""
    stats.documents += 1
    for item in raw.decode(document) if isinstance(document, bytes) else document:
        if flush is not None and len(rows.obs) + len(rows.context) + len(rows.rejected) + len(rows.member) >= batch:
            flush(rows)
        seq += 1
        stats.resources += 1
        if isinstance(item, raw.Undecodable):
            if item.resource_type in (None, "Observation"):
                _reject(undecodable_rejection(item, policy), seq, rows)
            else:
                stats.ignored[f"undecodable {_kind(item.resource_type)}"] += 1
            continue
        kind = item.resourceType
        if kind == "Observation":
            stats.observations += 1
            outcome = normalise(item, policy)
            updated = getattr(outcome, "updated_us", None)
            if updated is not None and (stats.newest_updated_us is None or updated > stats.newest_updated_us):
                stats.newest_updated_us = updated
            if isinstance(outcome, LabResult):
                rows.obs.append((outcome.ref, outcome.updated_us or -1, version_number(outcome.version),
                                 seq, outcome.patient, specimen_key(outcome.specimen),
                                 collection_key(outcome), _encode(outcome), None))
            elif isinstance(outcome, Rejected):
                _reject(outcome, seq, rows)
            else:
                stats.ignored[outcome.reason] += 1
        elif kind == "Patient" and item.id:
            rows.context.append((f"Patient/{item.id}", kind, _encode(item)))
        elif kind in ("Condition", "ServiceRequest", "CareTeam") and item.subject is not None and item.subject.reference:
            # Keyed by the patient's canonical reference, as its results are. A subject on another
            # server gives no facts: the live loop never looks a foreign patient up on its server.
            subject = canonical_reference(item.subject.reference, "Patient", policy)
            if isinstance(subject, Resolved) and not subject.foreign:
                rows.context.append((subject.key, kind, _encode(item)))
            else:
                stats.ignored[f"{kind} of a patient not on the server"] += 1
        elif kind == "DiagnosticReport" and item.id:
            specimens = item.specimen if isinstance(item.specimen, list) else ()
            for ref, report in report_members(
                item.id, (literal_reference(r.reference, policy) for r in item.result or ()),
                (literal_reference(s.reference, policy) for s in specimens),
            ):
                rows.member.append((ref, report_key(report)))
        else:
            stats.ignored[f"{_kind(kind) if kind else 'untyped'} not used"] += 1
    return seq


_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


def _kind(resource_type: str) -> str:
    """A resourceType as the summary log shows it: a type name, or "unknown type" (never text)."""
    return resource_type if _RESOURCE_TYPE.fullmatch(resource_type) else "unknown type"


def _reject(rejected: Rejected, seq: int, rows: Rows) -> None:
    vu, vv = rejected.updated_us or -1, version_number(rejected.version)
    data = _encode(rejected)
    if rejected.ref is None:
        rows.rejected.append((None, vu, vv, seq, data))
    else:
        # A rejected version still supersedes older versions: an Observation whose newest
        # version is unusable contributes nothing. Its rejection is reported from this row (rej),
        # unless it is a second copy of a version already read (`Replay._dedupe`).
        rows.obs.append((rejected.ref, vu, vv, seq, rejected.patient, None, None, None, data))


@dataclass
class Settled:
    """What `settle` makes of the rows of one Observation (pass 1, both engines)."""

    keep: set[int] = field(default_factory=set)  # seq of each row that stays as it was read
    # (seq, vu, vv, patient, Rejected): rows added as rejected versions (a conflict)
    versions: list[tuple[int, int, int, str | None, bytes]] = field(default_factory=list)
    reported: list[tuple[int, int, int, bytes]] = field(default_factory=list)  # (seq, vu, vv, Rejected): reported, no version
    identical: int = 0  # copies dropped as a content already read


ObsRow = tuple[int, int, int, bytes | None, bytes | None]  # (seq, vu, vv, LabResult, Rejected) of an obs row


def settle(rows: Sequence[ObsRow]) -> Settled:
    """The rows read of one Observation, in input order, as `clinical.copies` rules (the rule the
    live stores apply, `store.base.plan`): copies of one version that read alike are one row (the
    others counted, IDENTICAL_COPY); copies that do not are one rejected version (CONFLICT) and a
    CONFLICT rejection per further content; a copy that is no version (not `placed`) is reported
    once per content and is no row. Where order would show (which rejection first), contents are
    taken in order of content key and given the smallest input positions of their copies, so the
    events are the same for every order of the copies."""
    stamped_read = any(stamped(vu, vv) for _seq, vu, vv, _data, _rej in rows)
    out = Settled()
    groups: dict[tuple[int, int], list[ObsRow]] = {}
    unplaced: list[ObsRow] = []
    for row in rows:
        _seq, vu, vv, data, _rej = row
        if placed(vu, vv, data is None, stamped_read):
            groups.setdefault((vu, vv), []).append(row)
        else:
            unplaced.append(row)
    if unplaced:
        firsts, again = distinct([(_content(r), r) for r in unplaced])
        out.identical += again
        for seq, (_key, (_s, vu, vv, data, rej)) in zip(sorted(r[0] for r in unplaced), firsts, strict=False):
            out.reported.append((seq, vu, vv, _encode(unplaced_rejection(_outcome(data, rej)))))
    for (vu, vv), group in groups.items():
        if len(group) == 1:
            out.keep.add(group[0][0])
            continue
        verdict = one_version([(_content(r), r) for r in group])
        out.identical += len(verdict.duplicates)
        if verdict.kept is not None:
            out.keep.add(verdict.kept[1][0])
            continue
        for n, (seq, (_key, row)) in enumerate(zip(sorted(r[0] for r in group), verdict.conflicting, strict=False)):
            rejection = conflict_rejection(_outcome(row[3], row[4]))
            if n == 0:  # the version, rejected: it supersedes older versions as any rejected version does
                out.versions.append((seq, vu, vv, rejection.patient, _encode(rejection)))
            else:
                out.reported.append((seq, vu, vv, _encode(rejection)))
    return out


def _content(row: ObsRow) -> bytes:
    return content_key(row[3] if row[3] is not None else row[4])  # type: ignore[arg-type]


def _outcome(data: bytes | None, rej: bytes | None) -> LabResult | Rejected:
    return _decode_result(data) if data is not None else _decode_rejected(rej)  # type: ignore[arg-type]


# -- the run ---------------------------------------------------------------------------------------

# Order of availability: resources with meta.lastUpdated first, in that order, ties broken by id and
# version (so the order of files does not matter); resources without it follow in input order.
_AVAILABILITY = """CASE WHEN vu >= 0
    THEN printf('%020d', vu) || char(31) || ifnull(ref, '') || char(31) || vv || char(31) || printf('%012d', seq)
    ELSE '~' || printf('%012d', seq) END"""

# obs holds every version read; pass 2 keeps the latest of each (by lastUpdated, versionId, input
# position). pkey: the specimen panel key; fkey: the collection-instant key; member.pkey: the
# DiagnosticReport's key. COALESCE(pkey, member.pkey, fkey) is `panels.panel_key`'s precedence.
_SCHEMA = f"""
CREATE TABLE obs (ref TEXT, vu INTEGER, vv INTEGER, seq INTEGER, patient TEXT, pkey TEXT, fkey TEXT,
                  data BLOB, rej BLOB, akey TEXT GENERATED ALWAYS AS ({_AVAILABILITY}) STORED);
CREATE TABLE member (ref TEXT PRIMARY KEY, pkey TEXT) WITHOUT ROWID;
CREATE TABLE context (patient TEXT, kind TEXT, data BLOB);
CREATE TABLE rejected (ref TEXT, vu INTEGER, vv INTEGER, seq INTEGER, data BLOB,
                       akey TEXT GENERATED ALWAYS AS ({_AVAILABILITY}) STORED);
"""
_INSERT = "INSERT INTO obs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
# The rows of each Observation `settle` may change: one read more than once with the same
# (lastUpdated, versionId), or read both with and without them (a prefilter: `settle` decides).
_COPIES = """
SELECT rowid, ref, vu, vv, seq, data, rej FROM obs
WHERE ref IN (SELECT ref FROM (SELECT ref, vu, vv, COUNT(*) AS n FROM obs GROUP BY ref, vu, vv)
              GROUP BY ref HAVING MAX(n) > 1 OR (MIN(vu < 0 AND vv < 0) = 0 AND MAX(vu < 0 AND vv < 0) = 1))
ORDER BY ref, seq
"""
# Every version of every Observation, grouped by panel. A version's panel and patient are those of
# the newest usable version of its Observation (a rejected version has none of its own).
# Each panel's versions in order of availability. A rejection with neither lastUpdated nor a
# versionId (an undecodable entry) cannot be placed among versions: it is reported (`_rejections`)
# but is no version of its panel, so it never withdraws a readable one (clinical.copies.placed).
_PANELS = """
SELECT patient, panel, MIN(akey) OVER (PARTITION BY patient, panel) AS first, akey, ref, data FROM (
    SELECT ref, akey, data,
           FIRST_VALUE(own_panel) OVER newest AS panel, FIRST_VALUE(own_patient) OVER newest AS patient
    FROM (SELECT o.ref, o.akey, o.data, o.vu, o.vv, o.seq,
                 CASE WHEN o.data IS NOT NULL THEN COALESCE(o.pkey, m.pkey, o.fkey) END AS own_panel,
                 CASE WHEN o.data IS NOT NULL THEN o.patient END AS own_patient
          FROM obs o LEFT JOIN member m ON m.ref = o.ref
          WHERE o.data IS NOT NULL OR o.vu >= 0 OR o.vv >= 0)
    WINDOW newest AS (PARTITION BY ref ORDER BY own_panel IS NULL, vu DESC, vv DESC, seq DESC
                      ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING))
WHERE panel IS NOT NULL
ORDER BY first, akey
"""

Version = tuple[str, str, "LabResult | None"]  # (availability key, Observation reference, the result; None: rejected)


@dataclass(frozen=True, slots=True)
class PanelTrace:
    """One panel as `Replay.decide` judged it, for `explain`: what went in (the members as they
    stood at that arrival), the patient's state before, the core's decision, and the event records
    it produced (exactly those `decide` yields for it)."""

    akey: str  # availability key of the arrival that made the panel be judged
    patient: str
    panel: str
    members: tuple[LabResult, ...]
    before: PatientState
    decision: PanelDecision | None  # None: the panel could not be decided (its record says why)
    context: PatientContext
    records: tuple[dict[str, Any], ...]


def snapshots(versions: Sequence[Version]) -> tuple[list[LabResult], list[tuple[str, list[LabResult]]]]:
    """A panel as it was first available (each member's first version) and as it stood after each
    later version arrived: (availability key, members). `versions` in order of availability."""
    first: dict[str, LabResult | None] = {}
    later: list[Version] = []
    for version in versions:
        if version[1] in first:
            later.append(version)
        else:
            first[version[1]] = version[2]
    initial = [r for r in first.values() if r is not None]
    current = dict(first)
    out: list[tuple[str, list[LabResult]]] = []
    for akey, ref, result in later:
        current[ref] = result
        out.append((akey, [r for r in current.values() if r is not None]))
    return initial, out


class Replay:
    """`engine`: "partitioned" (service/replay/parallel.py: all cores, the default) or "sqlite" (one process,
    the reference the partitioned engine is tested against; both give the same bytes).
    `workers`: processes for the partitioned engine; None: one per core when the input is large
    enough to gain from them."""

    def __init__(self, rules: Rules, alert_settings: AlertSettings, workdir: str | Path | None = None, *,
                 engine: str = "partitioned", workers: int | None = None, provenance: bool = False,
                 read_policy: ReadPolicy = DEFAULT_READ):
        if engine not in ("partitioned", "sqlite"):
            raise ValueError(f"unknown replay engine {engine!r}")
        self.engine = engine
        self.provenance = provenance  # the alert resources include each write's Provenance (--provenance)
        self.workers = workers
        self.rules = rules
        self.read_policy = read_policy
        self.scheme = rules.scheme
        self.alert_settings = alert_settings
        self.stats = ReplayStats()
        self.progress: Callable[[str, int, int], None] | None = None  # (stage, done, total): replay.progress
        # The reading clock (bounds the collection time of a result without meta.lastUpdated); by
        # default the newest meta.lastUpdated of the input, as the live loop's is the server's now.
        self.clock_us: int | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="neutrowatch-replay-", dir=workdir)
        self.db: sqlite3.Connection | None = None
        if engine == "sqlite":
            self._connect()

    def _connect(self) -> None:
        self.db = db = sqlite3.connect(Path(self._tmp.name) / "replay.sqlite3", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-16384"):
            db.execute(f"PRAGMA {pragma}")
        db.executescript(_SCHEMA)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self._tmp.cleanup()

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, inputs: Sequence[str | Path], events: IO[bytes], alerts: IO[bytes] | None = None) -> ReplayStats:
        if self.engine == "partitioned":
            from service.replay import parallel

            return parallel.run(self, inputs, events, alerts, self.workers)
        self.load(inputs)
        for _akey, record, resources in self.decide(with_alerts=alerts is not None):
            events.write(orjson.dumps(record) + b"\n")
            if alerts is not None and resources is not None:
                for resource in resources:
                    alerts.write(orjson.dumps(resource) + b"\n")
        return self.stats

    # pass 1 ------------------------------------------------------------------------------------

    def load(self, inputs: Sequence[str | Path]) -> None:
        if self.db is None:
            self._connect()
        assert self.db is not None
        rows = Rows()
        seq = 0
        self.db.execute("BEGIN")
        for document in (d for path in _files(inputs) for d in _documents(path)):
            seq = read_document(document, seq, self.stats, rows, self._flush, policy=self.read_policy)
        self._flush(rows)
        self._dedupe()
        self.db.execute("COMMIT")

    def _dedupe(self) -> None:
        """Copies of a version, and copies that are no version, as `settle` rules."""
        assert self.db is not None
        db = self.db
        dropped: list[tuple[int]] = []
        versions: list[tuple[Any, ...]] = []
        reported: list[tuple[Any, ...]] = []
        for ref, group in itertools.groupby(db.execute(_COPIES).fetchall(), key=lambda r: r[1]):
            members = list(group)
            settled = settle([(seq, vu, vv, data, rej) for _rowid, _ref, vu, vv, seq, data, rej in members])
            if settled.identical:
                self.stats.ignored[IDENTICAL_COPY] += settled.identical
            dropped += [(r[0],) for r in members if r[4] not in settled.keep]
            versions += [(ref, vu, vv, seq, patient, None, None, None, rej) for seq, vu, vv, patient, rej in settled.versions]
            reported += [(ref, vu, vv, seq, rej) for seq, vu, vv, rej in settled.reported]
        db.executemany("DELETE FROM obs WHERE rowid = ?", dropped)
        db.executemany(_INSERT, versions)
        db.executemany("INSERT INTO rejected VALUES (?, ?, ?, ?, ?)", reported)

    def _flush(self, rows: Rows) -> None:
        db = self.db
        assert db is not None
        if rows.obs:
            db.executemany(_INSERT, rows.obs)
            rows.obs.clear()
        if rows.member:
            db.executemany("INSERT OR IGNORE INTO member VALUES (?, ?)", rows.member)
            rows.member.clear()
        if rows.rejected:
            db.executemany("INSERT INTO rejected VALUES (?, ?, ?, ?, ?)", rows.rejected)
            rows.rejected.clear()
        if rows.context:
            db.executemany("INSERT INTO context VALUES (?, ?, ?)", rows.context)
            rows.context.clear()

    # pass 2 ------------------------------------------------------------------------------------

    def _panels(self) -> Iterator[tuple[str, str, str, list[Version]]]:
        assert self.db is not None
        current: tuple[str, str, str] | None = None
        versions: list[Version] = []
        for patient, panel, first, akey, ref, data in self.db.execute(_PANELS):
            if current is None or current[2] != first:
                if current is not None:
                    yield current[2], current[0], current[1], versions
                current, versions = (patient, panel, first), []
            versions.append((akey, ref, _decode_result(data) if data is not None else None))
        if current is not None:
            yield current[2], current[0], current[1], versions

    def _rejections(self) -> Iterator[tuple[str, str, str, Rejected]]:
        assert self.db is not None
        query = """SELECT akey, data FROM rejected UNION ALL SELECT akey, rej FROM obs WHERE rej IS NOT NULL
                   ORDER BY akey"""
        for akey, data in self.db.execute(query):
            yield akey, "", "", _decode_rejected(data)

    def stream(self, patient: str | None = None) -> Iterator[tuple[str, str, str, Any]]:
        """(availability key, patient, panel key, the panel's versions or a Rejected) in order of
        availability, from the SQLite engine's tables; `patient`: only that subject reference's
        (a patient's decisions depend on its own inputs only, so they are the same either way)."""
        merged = heapq.merge(self._panels(), self._rejections(), key=lambda t: t[0])
        if patient is None:
            return merged
        return (t for t in merged if (t[3].patient if isinstance(t[3], Rejected) else t[1]) == patient)

    def facts(self) -> dict[str, PatientFacts]:
        """What the loaded input says of each patient (the SQLite engine's context table)."""
        assert self.db is not None
        return patient_facts(self.db.execute("SELECT patient, kind, data FROM context"), self.rules)

    def decide(self, *, with_alerts: bool = True, stream: Iterable[tuple[str, str, str, Any]] | None = None,
               facts: Mapping[str, PatientFacts] | None = None, trace: Callable[[PanelTrace], None] | None = None,
               ) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]] | None]]:
        """(availability key, event record, alert resources or None) in order of availability.
        Each Observation version is an arrival: a panel is assessed when its first member is
        available, with each member's first version, and again when a later version of a member
        arrives (a correction, a withdrawal) — as the live loop sees it. Building and validating
        the alert resources is skipped when nobody asked for them. `stream`: (availability key,
        patient, panel key, the panel's versions or a Rejected) in order of availability;
        `facts`: what the input says of each patient (age, threshold, orders, care team); by default
        both from the SQLite engine's tables. `trace`: called with each judged panel (`explain`)
        before its records are yielded; it changes nothing of what is yielded."""
        states: dict[str, PatientState] = {}
        clock = self.clock_us if self.clock_us is not None else self.stats.newest_updated_us
        if stream is None:
            stream = self.stream()
        if facts is None:
            facts = self.facts()
        def no_facts(patient: str) -> PatientFacts:
            """A patient the input says nothing else of: still its configured threshold, as live."""
            return PatientFacts(patient_context(patient, None, (), self.rules))
        pool = self.alert_settings.recipients
        pending: list[tuple[str, str, str, list[LabResult]]] = []  # later versions, re-assessed when they arrive

        def judge(akey: str, patient: str, panel: str, members: list[LabResult]) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]] | None]]:
            self.stats.panels += 1
            known = facts.get(patient) or no_facts(patient)
            before = states.get(patient, PatientState())
            decision: PanelDecision | None = None
            try:
                decision = decide(before, patient, panel, members, self.rules, known.context, clock)
                to = [choose(e.assessment.based_on if e.assessment else (), known.requesters, known.care_team, pool)
                      for e in decision.events]
                sent = _available(members) or next((e.assessment.effective for e in decision.events if e.assessment), "")
                outcome = panel_outcome(decision, members, to, self.scheme, self.alert_settings, sent=sent)
            except Exception as err:  # noqa: BLE001 - contained to this panel (outcomes module docstring)
                self.stats.events[QUARANTINED] += 1
                record = failure_record(patient, panel, members, err)
                if trace is not None:
                    trace(PanelTrace(akey, patient, panel, tuple(members), before, None, known.context, (record,)))
                yield akey, record, None
                return
            states[patient] = decision.state
            self.stats.stale_panels += decision.stale
            self.stats.unassessed.update(panel_unassessed(decision, members))
            out: list[tuple[str, dict[str, Any], list[dict[str, Any]] | None]] = []
            for record, writes in outcome.records:
                self.stats.events[record["event"]] += 1
                resources = None
                if with_alerts and writes is not None:
                    resources = [writes.flag] + ([writes.communication] if writes.communication else [])
                    if self.provenance:
                        resources.append(writes.provenance)
                out.append((akey, record, resources))
            if trace is not None:
                trace(PanelTrace(akey, patient, panel, tuple(members), before, decision, known.context,
                                 tuple(record for _k, record, _r in out)))
            yield from out

        for akey, patient, panel, payload in stream:
            while pending and pending[0][0] < akey:
                yield from judge(*heapq.heappop(pending))
            if isinstance(payload, Rejected):
                self.stats.events["rejected"] += 1
                if (why := rejection_unassessed(payload.reason)) is not None:
                    self.stats.unassessed[why] += 1
                yield akey, rejected_record(payload), None
                continue
            initial, later = snapshots(payload)
            for later_key, members in later:
                heapq.heappush(pending, (later_key, patient, panel, members))
            if initial:
                yield from judge(akey, patient, panel, initial)
        while pending:
            yield from judge(*heapq.heappop(pending))


def _available(members: list[LabResult]) -> str | None:
    stamps = [m.updated_us for m in members if m.updated_us is not None]
    return from_epoch_us(min(stamps)) if stamps else None




