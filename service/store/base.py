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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from importlib import metadata
from typing import Any, Protocol

import msgspec

from ..clinical.episodes import PatientState
from ..clinical.observations import LabResult, Rejected, conflict_rejection
from ..errors import StoreError


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


def digest(outcome: LabResult | Rejected) -> bytes:
    """The content of one copy of an Observation version, as compared with the stored copy.

    Taken over the normalised outcome (the LabResult or the Rejected), not over the raw JSON: a
    server that sends a version again with other key order, whitespace, number spelling ("0.30") or
    narrative is sending the same version, while a different value, unit (when it changes the
    value), code, subject, status, specimen, time or rejection reason is a different one — replay
    draws the same line (`replay.copies` compares the same bytes). Prefixed with DIGEST_TAG, this
    release's: another release may normalise the same JSON differently, so its digests are not
    compared (`classify`), lest an upgrade turn every re-read into a conflict."""
    return DIGEST_TAG + hashlib.sha256(_encode(outcome)).digest()[:16]


class Copy(Enum):
    """What one read copy is, next to the stored version of its Observation (`classify`)."""

    NEW = "new"  # a newer version (or the first): stored, supersedes the stored one
    SEEN = "seen"  # read before, or older than the stored version: skipped
    CONFLICT = "conflict"  # the stored version again, with other content: quarantined once, never stored
    UNPLACED = "unplaced"  # a rejection without version (an undecodable entry) behind a stored version: quarantined once


Stored = tuple[int, int, bytes | None]  # (meta.lastUpdated, versionId, digest or None) of the stored version


def classify(stored: Stored | None, item: Intake, content: bytes) -> Copy:
    """`content`: digest(item.outcome). A stored digest that is missing (stored before schema 2, or
    by a release without digests) or from another release cannot be compared: the copy counts as
    read before, as it did before digests."""
    read = (item.updated_us, item.version)
    if stored is None or stored[:2] < read:
        return Copy.NEW
    if stored[:2] > read:
        return Copy.UNPLACED if unplaced(item) else Copy.SEEN
    known = stored[2]
    if known is None or known == content or not known.startswith(DIGEST_TAG):
        return Copy.SEEN
    return Copy.CONFLICT


def unplaced(item: Intake) -> bool:
    """A rejection with neither meta.lastUpdated nor a numeric versionId (an undecodable entry):
    it cannot be ordered among versions, so it never supersedes a stored version that has them."""
    return item.updated_us < 0 and item.version < 0 and isinstance(item.outcome, Rejected)


def held_back(item: Intake, copy: Copy) -> Intake:
    """What `ingest` quarantines and returns for a copy it does not store (CONFLICT, UNPLACED).

    The stored copy stays in force: it was read first and may already have been decided on (an
    alert sent, or none). A FHIR version is immutable, so two contents under one version are a
    server or interface fault, and which one is right cannot be told from here; acting on the
    second would let an alert, or its absence, flip on that fault (and flip again whenever the
    overlap window reads the copies in another order). The conflict is made visible instead
    (rejection counter, log line, decision log, quarantine) for a person to resolve; a newer
    version supersedes as usual. The same holds for an UNPLACED copy: nothing of it is usable, and
    it may be a damaged re-send of the very version stored."""
    outcome = conflict_rejection(item.outcome) if copy is Copy.CONFLICT else item.outcome
    return replace(item, panel=None, outcome=outcome)


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
    event: dict[str, Any]  # the decision record (events.py)
    writes: dict[str, Any]  # the FHIR writes (alerts.AlertWrites as a dict)
    attempts: int


@dataclass(frozen=True, slots=True)
class Decided:
    """What one assessment changes, committed together."""

    patient: str
    panel: str
    state: PatientState
    records: list[tuple[dict[str, Any], dict[str, Any] | None]]  # (decision record, FHIR writes for the outbox or None)


def episode_rows(decided: Sequence[Decided]) -> list[tuple[str, PatientState, bool, int | None, bool]]:
    """One episodes row per patient however many of its panels one commit holds: (patient, last
    state, open, newest collection time, keep the temperature cursor). The cursor is kept only when
    the episode stayed open through every state of the batch (it belongs to that episode)."""
    rows: dict[str, tuple[str, PatientState, bool, int | None, bool]] = {}
    for d in decided:
        is_open = d.state.machine.episode is not None
        kept = rows[d.patient][4] if d.patient in rows else True
        rows[d.patient] = (d.patient, d.state, is_open, d.state.machine.newest_us, kept and is_open)
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
        """Store new versions (skip (id, version) already seen or older); mark their panels dirty;
        quarantine rejections. A copy of the stored version with other content (CONFLICT), or an
        undecodable copy behind a stored version (UNPLACED), is not stored: it is quarantined, once
        per distinct content however often it is read again (`held_back`). Returns the items that
        were new, and those held back as rejections (the caller counts, logs and records them as
        it does any rejection)."""
        ...
    async def quarantine(self, rejected: Rejected, now: float) -> None:
        """A rejection with no usable id (it supersedes nothing): kept with its reason."""
        ...
    async def record_decision(self, record: dict[str, Any]) -> None: ...
    async def dirty_panels(self, after: PanelKey | None = None, limit: int | None = None) -> list[PanelWork]:
        """Panels with results not yet assessed, in order of first availability (then patient, panel:
        byte order), from just after the key `after`, at most `limit` of them (a backlog is taken in
        batches, so memory does not grow with it)."""
        ...
    async def load_states(self, patients: Sequence[str]) -> dict[str, PatientState]: ...
    async def commit(self, decided: Sequence[Decided]) -> None:
        """Episode states, panels marked assessed, decision log and outbox rows — one transaction."""
        ...
    async def open_patients(self) -> list[tuple[str, str | None, int | None]]:
        """(patient, temperature cursor, collection time of the newest ANC) for each open episode."""
        ...
    async def set_temperature_cursor(self, patient: str, cursor: str) -> None: ...
    async def pending_outbox(self, limit: int = 100) -> list[OutboxEntry]:
        """Claim pending writes for this leader, oldest first (fenced)."""
        ...
    async def mark_sent(self, entry_id: int, result: dict[str, Any]) -> None: ...
    async def mark_failed(self, entry_id: int, error: str) -> None: ...
    async def outbox_pending_count(self) -> int: ...
    async def decisions(self, patient: str | None = None) -> list[dict[str, Any]]: ...
    async def quarantined(self) -> list[tuple[str | None, str]]: ...
    async def counts(self) -> dict[str, int]: ...
