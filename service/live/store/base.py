"""The state-store protocol. Implementations: sqlite.py (default, one replica), postgres.py (HA).

Every method that changes state is one transaction: a crash leaves the store as it was before the
call or after it, never between.

Leadership: several processes may open one store; only the one for which `lead()` returned True
polls and posts. Every method that changes state is fenced: it fails with `LeadershipLost` (and
changes nothing) once another process has become leader, so a paused old leader cannot write after
a new one began.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import NamedTuple, Protocol

import msgspec

from service.core.arrival import Copy, Stored, VersionRuling, rule
from service.core.copies import content_key, stamped, unplaced_rejection
from service.core.episodes import PatientState
from service.core.observations import LabResult, Rejected, conflict_rejection
from service.errors import StoreError
from service.output.events import Decision
from service.output.transaction import Delivery, OutboxWrites, StoredRecord


class LeadershipLost(StoreError):
    """This process no longer holds the leader lock; the change was not made."""


@dataclass(frozen=True, slots=True)
class Intake:
    """One Observation version read from the server, normalised (or rejected)."""

    ref: str
    updated_us: int  # meta.lastUpdated (-1 when absent)
    version: int  # numeric versionId (-1 when absent or not numeric)
    patient: str | None
    panel: str | None  # None for a rejection
    outcome: LabResult | Rejected


def _release_tag() -> bytes:
    try:
        release = metadata.version("neutrowatch")
    except metadata.PackageNotFoundError:
        release = "unknown"
    return hashlib.sha256(release.encode()).digest()[:4]


DIGEST_TAG = _release_tag()
_encode = msgspec.msgpack.Encoder().encode
_decode_result = msgspec.msgpack.Decoder(LabResult).decode
_decode_rejected = msgspec.msgpack.Decoder(Rejected).decode


def digest(outcome: LabResult | Rejected) -> bytes:
    """The content of one copy of an Observation version, as compared with the stored copy.

    Taken over the normalised outcome (the LabResult or the Rejected), not over the raw JSON: a
    server that sends a version again with other key order, whitespace, number spelling ("0.30") or
    narrative is sending the same version, while a different value, unit (when it changes the
    value), code, subject, status, specimen, time or rejection reason is a different one — replay
    draws the same line (`clinical.copies.content_key` of the same bytes). Prefixed with
    DIGEST_TAG, this release's: another release may normalise the same JSON differently, so its
    digests are not compared (`plan`), lest an upgrade turn every re-read into a conflict."""
    return DIGEST_TAG + content_key(_encode(outcome))


# The digest stored for a version whose copies conflict (no content is in force): every further
# copy of that version is a conflict too (quarantined once per content).
CONFLICTED = DIGEST_TAG + bytes(16)


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """The version of an Observation the store holds (its results and digests rows)."""

    updated_us: int
    version: int
    digest: bytes | None  # None: stored before digests (schema 1, or a release without them)
    patient: str | None
    panel: str | None
    data: bytes | None  # the LabResult (msgpack); None: a rejected version
    record: bytes | None = None  # a rejected version's quarantined Rejected (msgpack), when at hand

    @property
    def stamp(self) -> tuple[int, int]:
        return (self.updated_us, self.version)

    @property
    def outcome(self) -> LabResult | Rejected | None:
        """The stored copy (decoded only when `plan` needs it: a conflict, a copy without meta
        replaced); None: a rejection whose record is not at hand (it is not reported again)."""
        if self.data is not None:
            return _decode_result(self.data)
        return _decode_rejected(self.record) if self.record is not None else None


def stored_version(
    vu: int,
    vv: int,
    content: bytes | None,
    patient: str | None,
    panel: str | None,
    data: bytes | None,
    record: bytes | None,
) -> StoredVersion:
    """A stored row as `plan` takes it: `data` the LabResult of the results row, `record` the
    quarantined Rejected of a rejected version (the quarantine row with its digest)."""
    return StoredVersion(
        vu,
        vv,
        bytes(content) if content is not None else None,
        patient,
        panel,
        bytes(data) if data is not None else None,
        bytes(record) if record is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Write:
    """A row `ingest` writes as the Observation's version in force."""

    item: Intake  # the version; for a conflict, its CONFLICT rejection (no panel)
    content: bytes  # its digest; CONFLICTED for a conflict
    before: (
        tuple[str | None, str | None] | None
    )  # patient and panel of the version it replaces (marked dirty)


@dataclass
class Plan:
    """What `ingest` does with the copies of one Observation read in one batch."""

    writes: list[Write] = field(default_factory=list)  # in order: the last one is in force
    held: list[tuple[Intake, bytes]] = field(
        default_factory=list
    )  # (rejection, digest of the copy): quarantined once


def by_ref(items: Sequence[Intake]) -> dict[str, list[Intake]]:
    """The items of a batch by Observation, in order of first appearance."""
    out: dict[str, list[Intake]] = {}
    for item in items:
        out.setdefault(item.ref, []).append(item)
    return out


def plan(stored: StoredVersion | None, items: Sequence[Intake]) -> Plan:
    """The copies of one Observation in a batch (`items`, as read), next to its stored version, as
    `clinical.copies` rules them (what replay's `settle` applies to the whole input), so that what
    is in force after a batch does not depend on the order of its copies, nor (see below) on which
    batch each copy came in:

    - versions newer than the stored one are written, oldest first; a version older than the stored
      one, or the stored one read again alike, is skipped (the overlap window re-reads);
    - copies of one version that do not read alike, in the batch or next to the stored copy, make
      it a conflict: the version in force becomes a rejected version (CONFLICTED; its panel, and
      that of the version it replaces, decided again: an alert that rested on the first copy read
      is withdrawn, as replay, which sees all copies at once, never raises it), and every distinct
      content is held back as CONFLICT — the stored copy too (it was taken before the other was
      seen); a further copy of a CONFLICTED version is held back as CONFLICT;
    - a copy with neither lastUpdated nor a numeric versionId is held back (UNPLACED, or its own
      reason when rejected) once a version of the Observation with them is read, and a stored
      readable one is held back when such a version replaces it: it changes nothing.

    A stored digest that is missing (stored before schema 2, or by a release without digests) or
    from another release cannot be compared: a copy of that version counts as read before."""
    if (
        stored is not None
        and not stamped(*stored.stamp)
        and stored.digest != CONFLICTED
        and stored.data is None
    ):
        stored = None  # a rejection without lastUpdated or versionId, stored by an older release: no version
    ref = items[0].ref if items else ""
    copies = [
        Copy(i.updated_us, i.version, digest(i.outcome), isinstance(i.outcome, Rejected), i) for i in items
    ]
    ruling = rule(copies, _comparable(stored))
    out = Plan()
    where = (stored.patient, stored.panel) if stored is not None else None  # of the version in force
    for version in ruling.versions:
        if version.kept is not None:
            out.writes.append(Write(version.kept.item, version.kept.content, where))
            where = (version.kept.item.patient, version.kept.item.panel)
            continue
        held = [(_conflict(copy), content) for content, copy in _conflicting(version, stored, ref)]
        out.held += held
        if version.new:
            out.writes.append(Write(held[0][0], CONFLICTED, where))
            where = (held[0][0].patient, None)
    out.held += [
        (replace(c.item, panel=None, outcome=unplaced_rejection(c.item.outcome)), c.content)
        for c in ruling.unplaced
    ]
    if (
        stored is not None
        and stored.data is not None
        and not stamped(*stored.stamp)
        and any(stamped(*version.stamp) for version in ruling.versions if version.new)
    ):
        readable = stored.outcome
        assert readable is not None
        out.held.append(
            (Intake(ref, *stored.stamp, stored.patient, None, unplaced_rejection(readable)), digest(readable))
        )
    return out


def _comparable(stored: StoredVersion | None) -> Stored | None:
    """The stored version as `arrival.rule` compares copies with it: a digest that is missing or of
    another release cannot be compared."""
    if stored is None:
        return None
    content = stored.digest if stored.digest is not None and stored.digest.startswith(DIGEST_TAG) else None
    return Stored(*stored.stamp, content, stored.digest == CONFLICTED)


def _conflicting(
    version: VersionRuling[Intake], stored: StoredVersion | None, ref: str
) -> Iterator[tuple[bytes, Intake]]:
    """The copies of a conflicting version, one per content: the stored copy (item None) too, taken
    before the other was seen, when its content is at hand."""
    for copy in version.conflicting:
        if copy.item is not None:
            yield copy.content, copy.item
        elif stored is not None and (taken := stored.outcome) is not None:
            yield copy.content, Intake(ref, *stored.stamp, stored.patient, None, taken)


def _conflict(copy: Intake) -> Intake:
    return replace(copy, panel=None, outcome=conflict_rejection(copy.outcome))


class ResultRow(NamedTuple):
    """A `results` row: an Observation version as stored."""

    ref: str
    vu: int  # meta.lastUpdated (µs; -1: none)
    vv: int  # versionId as a number (-1: none)
    patient: str | None
    panel: str | None
    data: bytes | None  # the LabResult (msgpack); None: a rejected version


class DigestRow(NamedTuple):
    """A `digests` row: the content digest of a version (what tells copies apart)."""

    ref: str
    vu: int
    vv: int
    digest: bytes


class TouchRow(NamedTuple):
    """A `dirty_panels` row: a panel to decide again."""

    patient: str | None
    panel: str
    updated_us: int  # lastUpdated of the version that touched it
    received: float  # local time


class QuarantineRow(NamedTuple):
    """A `quarantine` row: a rejected copy kept with its reason."""

    ref: str | None
    version: int
    patient: str | None
    reason: str
    received: float
    record: bytes  # the Rejected (msgpack)
    digest: bytes


QuarantineKey = tuple[str, bytes, str]  # (ref, digest, reason): a copy quarantined once


@dataclass
class IngestRows:
    """What one `ingest` writes, in order (`ingest_rows`): each store only runs its statements."""

    results: list[ResultRow] = field(default_factory=list)
    digests: list[DigestRow] = field(default_factory=list)
    touches: list[TouchRow] = field(default_factory=list)
    quarantine: list[QuarantineRow] = field(default_factory=list)
    new: list[Intake] = field(default_factory=list)  # what `ingest` returns

    def store(self, write: Write, now: float, quarantined: set[QuarantineKey]) -> None:
        """A new version, or a conflict: its row, its digest, its panel and the panel of the version
        it replaces marked dirty, a rejected version's rejection quarantined."""
        item, content, before = write.item, write.content, write.before
        outcome = item.outcome
        self.results.append(
            ResultRow(
                ref=item.ref,
                vu=item.updated_us,
                vv=item.version,
                patient=item.patient,
                panel=item.panel,
                data=_encode(outcome) if isinstance(outcome, LabResult) else None,
            )
        )
        self.digests.append(DigestRow(item.ref, item.updated_us, item.version, content))
        touched: set[tuple[str, str]] = set()
        if item.patient is not None and item.panel is not None:
            touched.add((item.patient, item.panel))
        if before is not None and before[0] is not None and before[1] is not None:
            touched.add((before[0], before[1]))  # the older version's panel changes too
        self.touches.extend(
            TouchRow(patient, panel, item.updated_us, now) for patient, panel in sorted(touched)
        )
        if (
            isinstance(outcome, Rejected) and content != CONFLICTED
        ):  # (a conflict's copies are quarantined each)
            self._quarantine(item, outcome, content, now, quarantined)
        if content != CONFLICTED:
            self.new.append(item)

    def hold(self, item: Intake, content: bytes, now: float, quarantined: set[QuarantineKey]) -> None:
        """A copy held back: quarantined (and returned by `ingest`) unless that content was
        quarantined with that reason before."""
        outcome = item.outcome
        assert isinstance(outcome, Rejected)
        if (item.ref, content, outcome.reason) not in quarantined:
            self._quarantine(item, outcome, content, now, quarantined)
            self.new.append(item)

    def _quarantine(
        self, item: Intake, outcome: Rejected, content: bytes, now: float, quarantined: set[QuarantineKey]
    ) -> None:
        quarantined.add((item.ref, content, outcome.reason))
        self.quarantine.append(
            QuarantineRow(
                item.ref, item.version, item.patient, outcome.reason, now, _encode(outcome), content
            )
        )


def plans(known: Mapping[str, StoredVersion], items: Sequence[Intake]) -> dict[str, Plan]:
    """The plan of each Observation of a batch (`plan`), by reference in order of first appearance."""
    return {ref: plan(known.get(ref), copies) for ref, copies in by_ref(items).items()}


def ingest_rows(todo: Mapping[str, Plan], quarantined: set[QuarantineKey], now: float) -> IngestRows:
    """The rows `ingest` writes for the plans of a batch; `quarantined`: the (ref, digest, reason) of
    the copies of its Observations quarantined before (added to as rows are planned)."""
    out = IngestRows()
    for each in todo.values():
        for write in each.writes:
            out.store(write, now, quarantined)
        for held, content in each.held:
            out.hold(held, content, now, quarantined)
    return out


PanelKey = tuple[int, str, str]  # (first available, patient, panel): the order panels are decided in


@dataclass(frozen=True, slots=True)
class PanelWork:
    patient: str
    panel: str
    first_available: int  # smallest meta.lastUpdated of its members (µs)
    changed_at: float  # local time the newest member arrived
    results: list[LabResult]

    @property
    def key(self) -> PanelKey:
        return (self.first_available, self.patient, self.panel)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    patient: str
    event: Decision  # the decision record the write announces
    writes: OutboxWrites  # the FHIR writes
    attempts: int


@dataclass(frozen=True, slots=True)
class Decided:
    """What one assessment changes, committed together."""

    patient: str
    panel: str
    state: PatientState
    records: list[StoredRecord]


class OpenEpisode(NamedTuple):
    """A patient whose episode is open, as the temperature search needs it."""

    patient: str
    temperature_cursor: str | None  # the newest temperature read for this episode
    newest_us: int | None  # collection time of the newest ANC


class EpisodeRow(NamedTuple):
    """An `episodes` row: a patient's state after a commit."""

    patient: str
    state: PatientState
    is_open: bool
    newest_us: int | None  # newest collection time
    keep_temperature_cursor: bool


def episode_rows(decided: Sequence[Decided]) -> list[EpisodeRow]:
    """One episodes row per patient however many of its panels one commit holds. The temperature
    cursor is kept only when the episode stayed open through every state of the batch (it belongs
    to that episode)."""
    rows: dict[str, EpisodeRow] = {}
    for d in decided:
        is_open = d.state.machine.episode is not None
        kept = rows[d.patient].keep_temperature_cursor if d.patient in rows else True
        rows[d.patient] = EpisodeRow(d.patient, d.state, is_open, d.state.machine.newest_us, kept and is_open)
    return list(rows.values())


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    @property
    def is_open(self) -> bool: ...
    @property
    def is_leader(self) -> bool: ...
    async def lead(self) -> bool:
        """Become leader if no one is (or confirm this process still is). True when leader now.
        Called every store.failover_check_seconds; cheap."""
        ...

    async def check_leader(self) -> None:
        """Raise LeadershipLost unless this process is the leader of record (before an external write)."""
        ...

    async def get_cursor(self) -> str | None: ...
    async def set_cursor(self, value: str) -> None: ...
    async def ingest(self, items: Sequence[Intake], now: float) -> list[Intake]:
        """Store new versions (skip (id, version) already seen or older); mark their panels, and
        those of the versions they replace, dirty; quarantine rejections. The copies of each
        Observation are taken together (`plan`): copies of one version that conflict make it a
        rejected version and are quarantined, and a copy that is no version is quarantined, each
        once per (content, reason) however often it is read again. Returns the items that were new,
        and the rejections quarantined (the caller counts, logs and records them as it does any
        rejection): there may be more of these than items (a stored copy turned out to conflict)."""
        ...

    async def quarantine(self, rejected: Rejected, now: float) -> None:
        """A rejection with no usable id (it supersedes nothing): kept with its reason."""
        ...

    async def record_decision(self, record: Decision) -> None: ...
    async def dirty_panels(self, after: PanelKey | None = None, limit: int | None = None) -> list[PanelWork]:
        """Panels with results not yet assessed, in order of first availability (then patient, panel:
        byte order), from just after the key `after`, at most `limit` of them (a backlog is taken in
        batches, so memory does not grow with it)."""
        ...

    async def load_states(self, patients: Sequence[str]) -> dict[str, PatientState]: ...
    async def commit(self, decided: Sequence[Decided]) -> None:
        """Episode states, panels marked assessed, decision log and outbox rows — one transaction."""
        ...

    async def open_patients(self) -> list[OpenEpisode]:
        """Each patient whose episode is open, by patient reference."""
        ...

    async def set_temperature_cursor(self, patient: str, cursor: str) -> None: ...
    async def pending_outbox(self, limit: int = 100) -> list[OutboxEntry]:
        """Claim pending writes for this leader, oldest first (fenced)."""
        ...

    async def mark_sent(self, entry_id: int, result: Delivery) -> None: ...
    async def mark_failed(self, entry_id: int, error: str) -> None: ...
    async def outbox_pending_count(self) -> int: ...
    async def decisions(self, patient: str | None = None) -> list[Decision]: ...
    async def counts(self) -> dict[str, int]: ...
