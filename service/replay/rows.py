"""Replay's pass 1, shared by both engines: each document of the input decoded and sorted into rows
(`read_document`), the copies read of each Observation ruled (`settle`, by `core.arrival`), and the
rows and stream items the engines hand on, as named structs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from service.core.arrival import Copy, rule
from service.core.context import PatientContext, care_team_members, patient_context, requester
from service.core.copies import content_key, unplaced_rejection
from service.core.observations import (
    DEFAULT_READ,
    LabResult,
    ReadPolicy,
    Rejected,
    conflict_rejection,
    version_number,
)
from service.core.panels import collection_key, report_key, specimen_key
from service.core.rules import Rules
from service.core.triage import PatientFact, ReportMembers, Triaged, triage
from service.core.undecided import REASONS, ignored_unassessed
from service.fhir import model, raw
from service.replay.documents import StreamedBundle

_BATCH = 5_000
encode = msgspec.msgpack.Encoder().encode
decode_result = msgspec.msgpack.Decoder(LabResult).decode
decode_rejected = msgspec.msgpack.Decoder(Rejected).decode
_decode_resource = msgspec.msgpack.Decoder(model.Resource).decode
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


class ObsRow(NamedTuple):
    """One version read of an Observation (a row of the SQLite engine's obs table)."""

    ref: str
    vu: int  # meta.lastUpdated (µs; -1: absent)
    vv: int  # numeric versionId (-1: absent or not numeric)
    seq: int  # input position
    patient: str | None
    pkey: str | None  # the specimen panel key
    fkey: str | None  # the collection-instant panel key
    data: bytes | None  # the LabResult (msgpack); None: a rejected version
    rej: bytes | None  # the Rejected of a rejected version (msgpack)


class RejectedRow(NamedTuple):
    """A rejection that is no version of an Observation (a row of the rejected table)."""

    ref: str | None
    vu: int
    vv: int
    seq: int
    data: bytes  # the Rejected (msgpack)


class Membership(NamedTuple):
    """An Observation named by a DiagnosticReport (a row of the member table)."""

    ref: str
    report: str  # the DiagnosticReport's panel key


class ContextRow(NamedTuple):
    """A resource that says something of a patient beyond its Observations."""

    patient: str
    kind: str  # resourceType
    data: bytes  # the Resource (msgpack)


class PanelVersion(NamedTuple):
    """One version of a panel's member, as pass 2 reads it."""

    akey: str  # availability key (`core.arrival.availability_key`)
    ref: str  # the Observation
    result: LabResult | None  # None: a rejected version


class Available(NamedTuple):
    """What becomes available at one point of the order of availability: a panel (`payload`: its
    versions in order of availability) or a rejection (patient and panel ""; `payload`: it)."""

    akey: str
    patient: str
    panel: str
    payload: list[PanelVersion] | Rejected


@dataclass
class Rows:
    """What pass 1 makes of a stretch of input."""

    obs: list[ObsRow] = field(default_factory=list)
    member: list[Membership] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    context: list[ContextRow] = field(default_factory=list)

    def size(self) -> int:
        return len(self.obs) + len(self.context) + len(self.rejected) + len(self.member)

    def clear(self) -> None:
        self.obs.clear()
        self.member.clear()
        self.rejected.clear()
        self.context.clear()


@dataclass(frozen=True, slots=True)
class PatientFacts:
    """What the input says of a patient beyond its Observations (the live loop reads the same from
    the server): age and individual threshold, the requesters of its orders, its care team."""

    context: PatientContext = PatientContext()
    requesters: Mapping[str, str | None] = field(default_factory=dict)
    care_team: tuple[str, ...] = ()


def patient_facts(rows: Iterable[tuple[str, str, bytes]], rules: Rules) -> dict[str, PatientFacts]:
    by_kind: dict[str, dict[str, list[model.Resource]]] = {}
    for patient, kind, data in rows:
        by_kind.setdefault(patient, {}).setdefault(kind, []).append(_decode_resource(data))
    facts: dict[str, PatientFacts] = {}
    for patient, kinds in by_kind.items():
        records = kinds.get("Patient")
        record = records[-1] if records else None
        orders = {f"ServiceRequest/{r.id}": requester(r) for r in kinds.get("ServiceRequest", ()) if r.id}
        facts[patient] = PatientFacts(
            patient_context(patient, record, kinds.get("Condition", ()), rules),
            orders,
            tuple(care_team_members(kinds.get("CareTeam", ()))),
        )
    return facts


def read_document(
    document: bytes | StreamedBundle,
    seq: int,
    stats: ReplayStats,
    rows: Rows,
    flush: Callable[[Rows], None] | None = None,
    batch: int = _BATCH,
    policy: ReadPolicy = DEFAULT_READ,
) -> int:
    """Decode and sort one document into `rows`, numbering its resources from `seq` + 1 (the
    input position that breaks ties in the order of availability). Returns the last number used.
    `flush`: called (to empty `rows`) whenever they hold `batch` rows, so that one large document
    does not pile up in memory."""
    stats.documents += 1
    for item in raw.decode(document) if isinstance(document, bytes) else document:
        if flush is not None and rows.size() >= batch:
            flush(rows)
        seq += 1
        stats.resources += 1
        triaged = triage(item, policy)
        if isinstance(item, model.Resource) and item.resourceType == "Observation":
            stats.observations += 1
            updated = getattr(triaged, "updated_us", None)
            if updated is not None and (stats.newest_updated_us is None or updated > stats.newest_updated_us):
                stats.newest_updated_us = updated
        _row(triaged, seq, stats, rows)
    return seq


def _row(triaged: Triaged, seq: int, stats: ReplayStats, rows: Rows) -> None:
    """Where one triaged resource goes among the rows of pass 1."""
    if isinstance(triaged, LabResult):
        rows.obs.append(
            ObsRow(
                triaged.ref,
                triaged.updated_us or -1,
                version_number(triaged.version),
                seq,
                triaged.patient,
                specimen_key(triaged.specimen),
                collection_key(triaged),
                encode(triaged),
                None,
            )
        )
    elif isinstance(triaged, Rejected):
        _reject(triaged, seq, rows)
    elif isinstance(triaged, PatientFact):
        rows.context.append(
            ContextRow(triaged.patient, triaged.resource.resourceType, encode(triaged.resource))
        )
    elif isinstance(triaged, ReportMembers):
        rows.member.extend(Membership(ref, report_key(report)) for ref, report in triaged.members)
    else:
        stats.ignored[triaged.reason] += 1


def _reject(rejected: Rejected, seq: int, rows: Rows) -> None:
    vu, vv = rejected.updated_us or -1, version_number(rejected.version)
    data = encode(rejected)
    if rejected.ref is None:
        rows.rejected.append(RejectedRow(None, vu, vv, seq, data))
    else:
        # A rejected version still supersedes older versions: an Observation whose newest
        # version is unusable contributes nothing. Its rejection is reported from this row (rej),
        # unless it is a second copy of a version already read (`settle`).
        rows.obs.append(ObsRow(rejected.ref, vu, vv, seq, rejected.patient, None, None, None, data))


@dataclass
class Settled:
    """What `settle` makes of the rows of one Observation (pass 1, both engines)."""

    keep: set[int] = field(default_factory=set)  # seq of each row that stays as it was read
    versions: list[ObsRow] = field(default_factory=list)  # rows added as rejected versions (a conflict)
    reported: list[RejectedRow] = field(default_factory=list)  # reported, no version
    identical: int = 0  # copies dropped as a content already read


def settle(rows: Sequence[ObsRow]) -> Settled:
    """The rows read of one Observation, in input order, as `core.arrival.rule` rules them (the
    rule the live stores apply, `store.base.plan`): copies of one version that read alike are one
    row (the others counted, IDENTICAL_COPY); copies that do not are one rejected version
    (CONFLICT) and a CONFLICT rejection per further content; a copy that is no version is reported
    once per content and is no row. Where order would show (which rejection first), contents are
    taken in order of content key and given the smallest input positions of their copies, so the
    events are the same for every order of the copies."""
    ruling = rule([Copy(r.vu, r.vv, _content(r), r.data is None, r) for r in rows])
    out = Settled(identical=ruling.duplicates)
    seqs = sorted(c.item.seq for c in ruling.unplaced_read)
    for seq, copy in zip(seqs, ruling.unplaced, strict=False):
        row = copy.item
        rejection = unplaced_rejection(_outcome(row))
        out.reported.append(RejectedRow(row.ref, row.vu, row.vv, seq, encode(rejection)))
    for version in ruling.versions:
        if version.kept is not None:
            out.keep.add(version.kept.item.seq)
            continue
        vu, vv = version.stamp
        seqs = sorted(c.item.seq for c in version.copies)
        for n, (seq, content) in enumerate(zip(seqs, version.conflicting, strict=False)):
            read = content.item
            assert read is not None  # (no stored copy in replay)
            rejection = conflict_rejection(_outcome(read))
            if n == 0:  # the version, rejected: it supersedes older versions as any rejected version does
                out.versions.append(
                    ObsRow(read.ref, vu, vv, seq, rejection.patient, None, None, None, encode(rejection))
                )
            else:
                out.reported.append(RejectedRow(read.ref, vu, vv, seq, encode(rejection)))
    return out


def _content(row: ObsRow) -> bytes:
    return content_key(row.data if row.data is not None else row.rej)  # type: ignore[arg-type]  # one is set


def _outcome(row: ObsRow) -> LabResult | Rejected:
    if row.data is not None:
        return decode_result(row.data)
    return decode_rejected(row.rej)  # type: ignore[arg-type]  # a row without data holds its rejection
