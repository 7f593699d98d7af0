"""The state-store contract, run against both implementations: SQLite (a file) and PostgreSQL (the
machine's real server, a fresh schema per test). Same calls, same answers."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import msgspec
import orjson
import pytest

from service.config import Settings
from service.core.copies import UNPLACED
from service.core.episodes import PatientState
from service.core.observations import CONFLICT, Rejected
from service.core.panels import decide
from service.errors import StoreError
from service.fhir import raw
from service.fhir.model import Resource
from service.live.store import Decided, Intake, LeadershipLost, Store
from service.live.store.base import DIGEST_TAG, Plan, StoredVersion, digest, plan
from service.live.store.postgres import PostgresStore
from service.live.store.sqlite import SqliteStore
from service.live.worker import intake
from service.output.events import NotAssessedRecord, event_record
from service.output.transaction import Delivery, OutboxWrites
from tests import store_tables
from tests.builders import observation

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the async fixtures' loop
RULES = Settings().rules
T0 = "2026-01-05T08:00:00Z"


def _intake(obs: dict) -> Intake:
    item = intake(msgspec.convert(obs, Resource))
    assert isinstance(item, Intake), item
    return item


def _read(data: bytes) -> Intake:
    """An Observation as the live loop takes it from a page: raw bytes, decoded, normalised."""
    (resource,) = raw.decode(data)
    item = intake(resource)
    assert isinstance(item, Intake), item
    return item


def _note(reason: object) -> NotAssessedRecord:
    """A decision record that is not an alert."""
    return NotAssessedRecord(
        patient="Patient/a",
        effective="2026-01-05T09:00:00Z",
        observations=[],
        reason=reason,  # any object: one test makes a record that cannot be encoded
    )


def _writes() -> OutboxWrites:
    """An outbox write as one stored before Provenance existed (no fullUrls, no Provenance)."""
    return OutboxWrites(
        event="new", flag={}, communication=None, flag_identifier=("s", "v"), communication_identifier=None
    )


def _panel(
    patient: str, specimen: str, anc: float, *, updated: str, version: str = "1", ids: str = ""
) -> list[Intake]:
    """A WBC and an absolute neutrophil count on one specimen."""
    ids = ids or specimen.split("/")[-1]
    return [
        _intake(
            observation(
                "6690-2",
                3.0,
                id=f"{ids}-wbc",
                patient=patient,
                specimen=specimen,
                updated=updated,
                version=version,
            )
        ),
        _intake(
            observation(
                "751-8",
                anc,
                id=f"{ids}-anc",
                patient=patient,
                specimen=specimen,
                updated=updated,
                version=version,
            )
        ),
    ]


Factory = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Makes store instances on one location (two calls = two processes' views of one store)."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "state.sqlite3")
    dsn = request.getfixturevalue("pg_dsn")
    schema = request.getfixturevalue("pg_schema")
    return lambda: PostgresStore(dsn, schema, pool_size=3, lease_seconds=10)


@pytest.fixture
async def store(make: Factory) -> AsyncIterator[Store]:
    s = make()
    await s.open()
    assert await s.lead()
    yield s
    await s.close()


async def test_cursor_round_trip_and_survives_reopen(store: Store, make: Factory) -> None:
    assert await store.get_cursor() is None
    await store.set_cursor("2026-01-05T08:00:00.000Z")
    await store.set_cursor("2026-01-05T09:00:00.000Z")
    await store.close()
    again = make()
    await again.open()
    try:
        assert await again.get_cursor() == "2026-01-05T09:00:00.000Z"
    finally:
        await again.close()


async def test_ingest_keeps_the_newest_version_only(store: Store) -> None:
    first = _panel("Patient/a", "Specimen/s1", 0.4, updated="2026-01-05T09:00:00Z")
    assert await store.ingest(first, now=100.0) == first
    # The overlap window reads the same versions again: nothing new.
    assert await store.ingest(first, now=101.0) == []
    # A newer version of one member is new; an older one is not.
    newer = _intake(
        observation(
            "751-8",
            0.9,
            id="s1-anc",
            patient="Patient/a",
            specimen="Specimen/s1",
            updated="2026-01-05T10:00:00Z",
            version="2",
        )
    )
    older = _intake(
        observation(
            "751-8",
            0.1,
            id="s1-anc",
            patient="Patient/a",
            specimen="Specimen/s1",
            updated="2026-01-05T08:30:00Z",
            version="1",
        )
    )
    assert await store.ingest([newer, older], now=102.0) == [newer]
    (work,) = await store.dirty_panels()
    assert (work.patient, work.panel, work.changed_at) == ("Patient/a", first[0].panel, 102.0)
    values = sorted((r.code, r.value) for r in work.results)
    assert values == [("6690-2", 3000.0), ("751-8", 900.0)]  # 10*3/uL -> cells/uL, version 2's value
    assert (await store.counts())["results"] == 2


async def test_a_result_moved_to_another_specimen_dirties_both_panels(store: Store) -> None:
    a = _panel("Patient/a", "Specimen/s1", 0.4, updated="2026-01-05T09:00:00Z")
    await store.ingest(a, now=1.0)
    await store.commit([Decided("Patient/a", a[0].panel, PatientState(), [])])
    assert await store.dirty_panels() == []
    moved = _intake(
        observation(
            "751-8",
            0.4,
            id="s1-anc",
            patient="Patient/a",
            specimen="Specimen/s2",
            updated="2026-01-05T11:00:00Z",
            version="2",
        )
    )
    await store.ingest([moved], now=2.0)
    dirty = {(w.panel, tuple(r.ref for r in w.results)) for w in await store.dirty_panels()}
    assert dirty == {(a[0].panel, ("Observation/s1-wbc",)), (moved.panel, ("Observation/s1-anc",))}


async def test_dirty_panels_come_in_order_of_first_availability_then_byte_order(store: Store) -> None:
    # Patients whose names sort differently under a linguistic collation and under byte order.
    await store.ingest(_panel("Patient/b", "Specimen/x", 0.4, updated="2026-01-05T09:00:00Z"), now=1.0)
    await store.ingest(_panel("Patient/a", "Specimen/y", 0.4, updated="2026-01-05T10:00:00Z"), now=1.0)
    await store.ingest(_panel("Patient/Z", "Specimen/z", 0.4, updated="2026-01-05T10:00:00Z"), now=1.0)
    await store.ingest(_panel("Patient/B", "Specimen/w", 0.4, updated="2026-01-05T10:00:00Z"), now=1.0)
    order = [w.patient for w in await store.dirty_panels()]
    # first_vu first; at equal times byte order, "B" < "Z" < "a", as SQLite's BINARY (a linguistic
    # collation would give a, B, Z).
    assert order == ["Patient/b", "Patient/B", "Patient/Z", "Patient/a"]


async def test_dirty_panels_in_batches_from_a_key(store: Store) -> None:
    for i in range(7):
        await store.ingest(
            _panel(f"Patient/{i % 3}", f"Specimen/b{i}", 0.4, updated=f"2026-01-05T09:0{i % 4}:00Z"), now=1.0
        )
    everything = await store.dirty_panels()
    batches, after = [], None
    while batch := await store.dirty_panels(after=after, limit=3):
        batches.append(batch)
        after = batch[-1].key
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [w for b in batches for w in b] == everything
    assert [w.key for w in everything] == sorted(w.key for w in everything)


async def test_rejections_are_quarantined_with_their_reason(store: Store) -> None:
    bad = _intake(observation("751-8", 0.4, unit="furlongs", id="bad", updated="2026-01-05T09:00:00Z"))
    assert await store.ingest([bad], now=1.0) == [bad]
    quarantined = await store_tables.quarantined(store)
    assert len(quarantined) == 1 and quarantined[0][0] == "Observation/bad" and "unit" in quarantined[0][1]
    assert await store.dirty_panels() == []
    counts = await store.counts()
    assert (counts["results"], counts["quarantine"]) == (1, 1)  # kept, so a later version supersedes it


async def test_commit_saves_state_decisions_and_outbox_in_one_transaction(store: Store) -> None:
    items = _panel("Patient/a", "Specimen/s1", 0.3, updated="2026-01-05T09:00:00Z")
    await store.ingest(items, now=1.0)
    (work,) = await store.dirty_panels()
    d = decide(PatientState(), work.patient, work.panel, work.results, RULES)
    assert d.events and d.state.machine.episode is not None  # 300/uL: a new severe episode
    record = event_record(d.events[0], RULES.scheme)
    writes = OutboxWrites(
        event="new",
        flag={"resourceType": "Flag", "status": "active"},
        communication=None,
        flag_identifier=("urn:x", "e1"),
        communication_identifier=None,
    )
    await store.commit([Decided("Patient/a", work.panel, d.state, [(record, writes), (_note("a"), None)])])
    assert await store.dirty_panels() == []
    assert (await store.load_states(["Patient/a", "Patient/none"]))["Patient/a"] == d.state
    assert await store.decisions() == [record, _note("a")]
    assert await store.decisions("Patient/a") == [record, _note("a")]
    (entry,) = await store.pending_outbox()
    assert (entry.patient, entry.event, entry.writes, entry.attempts) == ("Patient/a", record, writes, 0)
    assert [p for p, _, _ in await store.open_patients()] == ["Patient/a"]
    await store.set_temperature_cursor("Patient/a", "2026-01-05T10:00:00.000Z")
    assert (await store.open_patients())[0][1] == "2026-01-05T10:00:00.000Z"
    # The episode closes: the temperature cursor is dropped with it.
    await store.commit([Decided("Patient/a", work.panel, PatientState(), [])])
    assert await store.open_patients() == []


async def test_one_commit_with_several_panels_of_a_patient_keeps_the_last_state(store: Store) -> None:
    """Episode rows are written once per patient per commit (the last state); the temperature cursor
    survives only when the episode stayed open through the whole batch."""
    await store.ingest(_panel("Patient/a", "Specimen/s1", 0.3, updated="2026-01-05T09:00:00Z"), now=1.0)
    (work,) = await store.dirty_panels()
    opened = decide(PatientState(), work.patient, work.panel, work.results, RULES).state
    await store.commit([Decided("Patient/a", work.panel, opened, [])])
    await store.set_temperature_cursor("Patient/a", "2026-01-05T10:00:00.000Z")
    await store.commit(
        [Decided("Patient/a", work.panel, opened, []), Decided("Patient/a", work.panel, opened, [])]
    )
    assert await store.open_patients() == [
        ("Patient/a", "2026-01-05T10:00:00.000Z", opened.machine.newest_us)
    ]
    # closed, then open again within one batch: a new episode, whose temperatures start afresh
    await store.commit(
        [Decided("Patient/a", work.panel, PatientState(), []), Decided("Patient/a", work.panel, opened, [])]
    )
    assert await store.open_patients() == [("Patient/a", None, opened.machine.newest_us)]
    await store.commit(
        [Decided("Patient/a", work.panel, opened, []), Decided("Patient/a", work.panel, PatientState(), [])]
    )
    assert await store.open_patients() == []
    assert (await store.load_states(["Patient/a"]))["Patient/a"] == PatientState()


async def test_a_failed_commit_changes_nothing(store: Store) -> None:
    await store.ingest(_panel("Patient/a", "Specimen/s1", 0.3, updated="2026-01-05T09:00:00Z"), now=1.0)
    (work,) = await store.dirty_panels()
    unserialisable = _note(object())  # (a struct is not checked when it is made: encoding fails)
    with pytest.raises(TypeError):
        await store.commit(
            [Decided("Patient/a", work.panel, PatientState(), [(_note("ok"), None), (unserialisable, None)])]
        )
    assert len(await store.dirty_panels()) == 1
    assert await store.decisions() == []


async def test_outbox_failures_retry_and_sent_entries_leave(store: Store) -> None:
    await store.ingest(_panel("Patient/a", "Specimen/s1", 0.3, updated="2026-01-05T09:00:00Z"), now=1.0)
    (work,) = await store.dirty_panels()
    writes = _writes()
    await store.commit(
        [Decided("Patient/a", work.panel, PatientState(), [(_note("1"), writes), (_note("2"), writes)])]
    )
    first, second = await store.pending_outbox()
    assert first.id < second.id and await store.outbox_pending_count() == 2
    await store.mark_failed(first.id, "server answered 503")
    assert [(e.id, e.attempts) for e in await store.pending_outbox()] == [(first.id, 1), (second.id, 0)]
    await store.mark_sent(first.id, Delivery(["201 Created"], ["Flag/1"], {"Flag": "1"}))
    assert [e.id for e in await store.pending_outbox()] == [second.id]
    assert await store.outbox_pending_count() == 1


async def test_reopening_migrates_nothing_and_a_newer_schema_is_refused(store: Store, make: Factory) -> None:
    await store.set_cursor("c1")
    await store.close()
    again = make()
    await again.open()  # migrations already applied: a no-op
    assert await again.get_cursor() == "c1"
    if isinstance(again, SqliteStore):
        again.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    else:
        assert isinstance(again, PostgresStore)
        await again.pool.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    await again.close()
    newer = make()
    with pytest.raises(StoreError, match="schema 99, newer than this version"):
        await newer.open()
    await newer.close()


async def test_one_leader_at_a_time_and_a_standby_cannot_write(store: Store, make: Factory) -> None:
    standby = make()
    await standby.open()
    try:
        assert not await standby.lead() and not standby.is_leader
        with pytest.raises(LeadershipLost):
            await standby.set_cursor("standby wrote")
        with pytest.raises(LeadershipLost):
            await standby.check_leader()
        assert await standby.get_cursor() is None  # reads are fine, and nothing was written
        await store.set_cursor("leader wrote")
        await store.close()  # the leader stops: its lock is freed at once
        assert await standby.lead() and standby.is_leader
        await standby.set_cursor("new leader wrote")
        assert await standby.get_cursor() == "new leader wrote"
    finally:
        await standby.close()


# PostgreSQL only: fencing of a leader that lost its lock without knowing it, and the lease. ----------


async def test_sqlite_locked_by_another_process_fails_clearly_and_never_blocks_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the database's write lock (an operator's sqlite3 shell, a backup
    tool): a write waits out the busy timeout on the store's thread and fails with a StoreError
    naming the cause, nothing of it is kept, and meanwhile the event loop keeps running (it answers
    /healthz and SIGTERM). After the lock is gone the same call succeeds."""
    import service.live.store.sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_SECONDS", 0.6)
    store = SqliteStore(tmp_path / "state.sqlite3")
    await store.open()
    try:
        assert await store.lead()
        await store.set_cursor("2026-01-05T08:00:00.000Z")
        other = sqlite3.connect(str(tmp_path / "state.sqlite3"), isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        with pytest.raises(StoreError, match="state store busy or unavailable: database is locked"):
            await store.set_cursor("2026-01-05T09:00:00.000Z")
        waited = time.monotonic() - started
        ticker.cancel()
        assert waited >= 0.5  # it did wait for the lock ...
        assert ticks >= 0.5 * waited / 0.02  # ... and the loop ran all the while (a blocked loop: 0 ticks)
        other.execute("ROLLBACK")
        other.close()
        assert await store.get_cursor() == "2026-01-05T08:00:00.000Z"  # nothing half-written
        await store.set_cursor("2026-01-05T09:00:00.000Z")
        assert await store.get_cursor() == "2026-01-05T09:00:00.000Z"
    finally:
        await store.close()


@pytest.fixture
def pg(pg_dsn: str, pg_schema: str) -> Callable[..., PostgresStore]:
    return lambda lease=10.0: PostgresStore(pg_dsn, pg_schema, pool_size=3, lease_seconds=lease)


async def _terminate_lock_session(dsn: str, schema: str) -> None:
    """What a network partition or a DBA does to the leader's lock connection."""
    conn = await asyncpg.connect(dsn)
    try:
        killed = await conn.fetchval(
            """SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l
               WHERE l.locktype = 'advisory' AND l.classid = $1 AND l.objid = ($2::bigint & x'ffffffff'::bigint)::oid
               AND l.granted""",  # noqa: E501 - the SQL text stays byte-identical
            0x4E57,
            __import__("service.live.store.postgres", fromlist=["lock_key"]).lock_key(schema),
        )
        assert killed == 1
    finally:
        await conn.close()


async def test_postgres_old_leader_is_fenced_after_a_new_one_began(pg, pg_dsn: str, pg_schema: str) -> None:
    old, new = pg(), pg()
    await old.open()
    await new.open()
    try:
        assert await old.lead()
        await old.ingest(_panel("Patient/a", "Specimen/s1", 0.3, updated="2026-01-05T09:00:00Z"), now=1.0)
        (work,) = await old.dirty_panels()
        await old.commit([Decided("Patient/a", work.panel, PatientState(), [(_note("1"), _writes())])])
        (claimed,) = await old.pending_outbox()  # the old leader claimed a write, then "paused"
        await _terminate_lock_session(pg_dsn, pg_schema)
        assert await new.lead()
        assert old.is_leader  # it has not noticed yet...
        with pytest.raises(LeadershipLost, match="leadership passed"):
            await old.mark_sent(claimed.id, Delivery(["201"], [None], {}))  # ...but cannot write
        assert not old.is_leader
        with pytest.raises(LeadershipLost):
            await old.check_leader()
        (again,) = await new.pending_outbox()  # the new leader re-claims and delivers it
        assert again.id == claimed.id
        await new.mark_sent(again.id, Delivery(["201"], [None], {}))
        assert await new.outbox_pending_count() == 0
    finally:
        await old.close()
        await new.close()


async def test_postgres_a_stalled_leader_loses_the_lock_after_its_lease(pg) -> None:
    stalled, standby = pg(lease=1.0), pg(lease=1.0)
    await stalled.open()
    await standby.open()
    try:
        assert await stalled.lead()
        assert not await standby.lead()
        await asyncio.sleep(2.0)  # the leader renews nothing for longer than its lease
        assert await standby.lead()
        assert not await stalled.lead()  # its renewal finds the session gone
        with pytest.raises(LeadershipLost):
            await stalled.set_cursor("late")
    finally:
        await stalled.close()
        await standby.close()


async def test_postgres_errors_never_show_the_dsn(pg_dsn: str, pg_schema: str) -> None:
    store = PostgresStore("postgresql://neutrowatch:s3cret-pass@127.0.0.1:1/none", pg_schema)
    with pytest.raises(StoreError) as err:
        await store.open()
    assert "s3cret-pass" not in str(err.value) and "127.0.0.1:1/none" in str(err.value)
    assert "s3cret" not in repr(store)


# Copies of one version: sent again, re-serialised, conflicting. ------------------------------------

ANC = observation(
    "751-8", 0.4, id="s1-anc", patient="Patient/a", specimen="Specimen/s1", updated="2026-01-05T09:00:00Z"
)
WBC = observation(
    "6690-2", 3.0, id="s1-wbc", patient="Patient/a", specimen="Specimen/s1", updated="2026-01-05T09:00:00Z"
)
V2 = {"versionId": "2", "lastUpdated": "2026-01-05T10:00:00Z"}
ANC_US = 1767603600000000  # 2026-01-05T09:00:00Z


def _with(obs: dict, **changes: object) -> dict:
    copy = orjson.loads(orjson.dumps(obs))
    copy.update(changes)
    return copy


async def _stored_anc(store: Store) -> float | None:
    (work,) = await store.dirty_panels()
    return {r.code: r.value for r in work.results}.get("751-8")


async def test_a_copy_sent_again_is_seen_before_not_a_conflict(store: Store) -> None:
    first = [_read(orjson.dumps(WBC)), _read(orjson.dumps(ANC))]
    assert await store.ingest(first, now=1.0) == first
    assert await store.ingest([_read(orjson.dumps(ANC)), _read(orjson.dumps(WBC))], now=2.0) == []
    assert await store_tables.quarantined(store) == []


async def test_the_same_content_serialised_differently_is_not_a_conflict(store: Store) -> None:
    await store.ingest([_read(orjson.dumps(WBC)), _read(orjson.dumps(ANC))], now=1.0)
    reordered = dict(reversed(list(ANC.items())))  # other key order ...
    spaced = (
        json.dumps(reordered, indent=2).encode().replace(b'"value": 0.4', b'"value": 0.40')
    )  # ... whitespace, number spelling
    assert spaced != orjson.dumps(ANC)
    # ... and narrative and a note: the service reads neither, so they cannot change a decision.
    annotated = _with(ANC, text={"status": "generated", "div": "<div>ANC</div>"}, note=[{"text": "re-sent"}])
    assert await store.ingest([_read(spaced), _read(orjson.dumps(annotated))], now=2.0) == []
    assert await store_tables.quarantined(store) == []
    assert await _stored_anc(store) == 400.0


CONFLICTING = {
    "value": _with(ANC, valueQuantity={**ANC["valueQuantity"], "value": 0.1}),
    "unit": _with(
        ANC, valueQuantity={**ANC["valueQuantity"], "unit": "/uL", "code": "/uL"}
    ),  # 0.4/uL, not 400/uL
    "code": _with(
        ANC, code={"coding": [{"system": "http://loinc.org", "code": "26499-4"}]}
    ),  # another ANC term
    "subject": _with(ANC, subject={"reference": "Patient/b"}),
    "status": _with(ANC, status="entered-in-error"),
}


@pytest.mark.parametrize("change", CONFLICTING)
async def test_other_content_under_the_same_version_withdraws_it_and_every_copy_is_quarantined_once(
    store: Store, change: str
) -> None:
    """The first copy was stored and decided on; a copy of the same version with other content makes
    the version a conflict: both copies are returned and quarantined as CONFLICT (the first one
    too: which one is right cannot be told), the version in force is rejected (it contributes
    nothing) and its panel is decided again (what rested on the first copy is withdrawn, as replay
    never raises it). Read again, either copy changes nothing; a newer version supersedes."""
    first = [_read(orjson.dumps(WBC)), _read(orjson.dumps(ANC))]
    await store.ingest(first, now=1.0)
    (work,) = await store.dirty_panels()
    await store.commit([Decided("Patient/a", work.panel, PatientState(), [])])
    other = _read(orjson.dumps(CONFLICTING[change]))
    held = await store.ingest([other], now=2.0)
    assert sorted(h.outcome.patient for h in held) == sorted([first[1].patient, other.patient])  # type: ignore[union-attr,type-var]  # held: outcomes set, patients str
    assert [h.outcome.reason for h in held] == [CONFLICT, CONFLICT]  # type: ignore[union-attr]  # a held row carries its outcome
    assert {(h.ref, h.updated_us, h.version, h.panel) for h in held} == {
        (other.ref, other.updated_us, other.version, None)
    }
    assert await store_tables.quarantined(store) == [("Observation/s1-anc", CONFLICT)] * 2
    (work,) = await store.dirty_panels()  # decided again, without the conflicting version
    assert (work.panel, [r.ref for r in work.results]) == (first[1].panel, ["Observation/s1-wbc"])
    await store.commit([Decided("Patient/a", work.panel, PatientState(), [])])
    for now in (3.0, 4.0):  # the overlap window reads both again
        assert await store.ingest([other, first[1]], now=now) == []
    assert await store_tables.quarantined(store) == [("Observation/s1-anc", CONFLICT)] * 2
    assert await store.dirty_panels() == []
    assert (await _in_force(store))["Observation/s1-anc"] == (first[1].updated_us, 1, False)
    newer = _read(orjson.dumps(_with(ANC, meta=V2)))
    assert await store.ingest([newer], now=5.0) == [newer]  # a new version supersedes as usual
    assert await _stored_anc(store) == 400.0


async def test_a_stored_rejected_version_found_to_conflict_is_quarantined_as_a_conflict_too(
    store: Store,
) -> None:
    """The copy read first was rejected (an unknown unit) and stored as such; a readable copy of the
    same version makes it a conflict: both are returned as CONFLICT, the first one rebuilt from its
    quarantine record (its code and collection time kept), and the readable one is not used."""
    rejected = _read(
        orjson.dumps(
            CONFLICTING["unit"]
            | {"valueQuantity": {**ANC["valueQuantity"], "unit": "bananas/uL", "code": "bananas/uL"}}
        )
    )
    assert isinstance(rejected.outcome, Rejected)
    await store.ingest([_read(orjson.dumps(WBC)), rejected], now=1.0)
    held = await store.ingest([_read(orjson.dumps(ANC))], now=2.0)
    assert [(h.outcome.reason, h.outcome.code, h.outcome.effective) for h in held] == [
        (CONFLICT, "751-8", ANC["effectiveDateTime"])
    ] * 2  # type: ignore[union-attr]  # a held row carries its outcome
    assert [r for _, r in await store_tables.quarantined(store)] == [
        rejected.outcome.reason,
        CONFLICT,
        CONFLICT,
    ]
    assert (await _in_force(store))["Observation/s1-anc"] == (ANC_US, 1, False)


async def test_a_third_content_of_a_conflicting_version_is_quarantined_too(store: Store) -> None:
    await store.ingest([_read(orjson.dumps(WBC)), _read(orjson.dumps(ANC))], now=1.0)
    one, two = _read(orjson.dumps(CONFLICTING["value"])), _read(orjson.dumps(CONFLICTING["unit"]))
    assert len(await store.ingest([one, one], now=2.0)) == 2  # the stored copy and `one`
    assert len(await store.ingest([two, one, two], now=3.0)) == 1
    assert [r for _, r in await store_tables.quarantined(store)] == [CONFLICT] * 3


async def _in_force(store: Store) -> dict[str, tuple[int, int, bool]]:
    """Each Observation's version in force: (meta.lastUpdated, versionId, usable)."""
    sql = "SELECT ref, vu, vv, data IS NOT NULL FROM results"
    if isinstance(store, SqliteStore):
        rows = store.db.execute(sql).fetchall()
    else:
        assert isinstance(store, PostgresStore)
        rows = await store.pool.fetch(sql)
    return {r[0]: (r[1], r[2], bool(r[3])) for r in rows}


async def _outcome(
    store: Store, run: int
) -> tuple[list[tuple[str, tuple[int, int, bool]]], list[tuple[str, str]], list[str]]:
    """What one run (its Observations' ids end in `-r<run>`) left: the versions in force, the
    quarantine, and the results a decision of its panel would take (ids without the suffix)."""
    tag = f"-r{run}"
    force = sorted(
        (ref.removesuffix(tag), v) for ref, v in (await _in_force(store)).items() if ref.endswith(tag)
    )
    quarantine = sorted(
        (ref.removesuffix(tag), reason)
        for ref, reason in await store_tables.quarantined(store)
        if ref and ref.endswith(tag)
    )
    panels = [w for w in await store.dirty_panels() if w.patient == f"Patient/a{tag}"]
    usable = sorted(r.ref.removesuffix(tag) for w in panels for r in w.results)
    return force, quarantine, usable


def _run_copies(run: int) -> list[Intake]:
    """The WBC and three copies of its ANC partner: version 1 normal, version 1 severe (a conflict)
    and a copy without meta (severe), of run `run`'s own Observations and patient."""

    def own(obs: dict) -> Intake:
        return _read(
            orjson.dumps(_with(obs, id=obs["id"] + f"-r{run}", subject={"reference": f"Patient/a-r{run}"}))
        )

    no_meta = {k: v for k, v in CONFLICTING["value"].items() if k != "meta"}
    return [own(WBC), own(ANC), own(CONFLICTING["value"]), own(no_meta)]


async def test_the_store_outcome_does_not_depend_on_the_order_or_batching_of_copies(store: Store) -> None:
    """Every order of the copies, split into batches at every possible place (one ingest each, as
    successive poll cycles read them): the same versions in force (the ANC's version rejected as a
    conflict, the WBC usable), the same quarantine (both copies of version 1 as CONFLICT, the copy
    without meta as no version of it) and the same panel content. Each run on its own Observations."""
    expected = None
    run = 0
    for order in itertools.permutations(range(4)):
        for cuts in itertools.product((False, True), repeat=3):
            run += 1
            items = [_run_copies(run)[i] for i in order]
            batches: list[list[Intake]] = [[items[0]]]
            for item, cut in zip(items[1:], cuts, strict=True):
                if cut:
                    batches.append([])
                batches[-1].append(item)
            for n, batch in enumerate(batches):
                await store.ingest(batch, now=float(n))
            got = await _outcome(store, run)
            if expected is None:
                expected = got
                assert got[0] == [
                    ("Observation/s1-anc", (ANC_US, 1, False)),
                    ("Observation/s1-wbc", (ANC_US, 1, True)),
                ]
                assert got[1] == sorted(
                    [("Observation/s1-anc", CONFLICT)] * 2 + [("Observation/s1-anc", UNPLACED)]
                )
                assert got[2] == ["Observation/s1-wbc"]
            assert got == expected, (order, cuts)


async def test_a_copy_without_meta_never_overrides_a_stamped_version(store: Store) -> None:
    """A copy with neither versionId nor lastUpdated, of an Observation whose version was read, is
    no version of it: returned and quarantined once (UNPLACED), and it changes nothing (no panel to
    decide again, the version in force stays), however often it is read again."""
    await store.ingest([_read(orjson.dumps(WBC)), _read(orjson.dumps(ANC))], now=1.0)
    (work,) = await store.dirty_panels()
    await store.commit([Decided("Patient/a", work.panel, PatientState(), [])])
    severe = {k: v for k, v in CONFLICTING["value"].items() if k != "meta"}
    copy = _read(orjson.dumps(severe))
    assert (copy.updated_us, copy.version) == (-1, -1)
    (held,) = await store.ingest([copy], now=2.0)
    assert (held.ref, held.panel, held.outcome.reason) == ("Observation/s1-anc", None, UNPLACED)  # type: ignore[union-attr]  # a held row carries its outcome
    for now in (3.0, 4.0):
        assert await store.ingest([copy], now=now) == []
    assert await store_tables.quarantined(store) == [("Observation/s1-anc", UNPLACED)]
    assert await store.dirty_panels() == []
    assert (await _in_force(store))["Observation/s1-anc"] == (ANC_US, 1, True)


async def test_a_digest_of_another_release_is_never_compared() -> None:
    """Another release may normalise the same JSON differently: after an upgrade a re-read is not a
    conflict, whatever its digest."""
    anc, other = _read(orjson.dumps(ANC)), _read(orjson.dumps(CONFLICTING["value"]))

    def stored(content: bytes) -> StoredVersion:
        return StoredVersion(
            anc.updated_us, anc.version, content, anc.patient, anc.panel, msgspec.msgpack.encode(anc.outcome)
        )

    conflict = plan(stored(digest(anc.outcome)), [other])
    assert [h.outcome.reason for h, _ in conflict.held] == [CONFLICT, CONFLICT]  # type: ignore[union-attr]  # a held row carries its outcome
    assert plan(stored(digest(anc.outcome)), [anc]) == Plan()
    foreign = bytes(b ^ 0xFF for b in DIGEST_TAG) + digest(anc.outcome)[len(DIGEST_TAG) :]
    assert plan(stored(foreign), [other]) == Plan()


# An entry that cannot be decoded, with an id (intake: updated -1, version -1). -----------------------

UNDECODABLE = orjson.dumps(ANC).replace(b'"value":0.4', b'"value":0.4,,')


async def test_an_undecodable_copy_is_quarantined_once_and_a_readable_version_supersedes_it(
    store: Store,
) -> None:
    broken = _read(UNDECODABLE)
    assert (broken.ref, broken.updated_us, broken.version, broken.panel) == (
        "Observation/s1-anc",
        -1,
        -1,
        None,
    )
    assert await store.ingest([_read(orjson.dumps(WBC)), broken], now=1.0) != []
    for now in (2.0, 3.0):  # read again every cycle while it lies in the overlap window
        assert await store.ingest([broken], now=now) == []
    ((ref, reason),) = await store_tables.quarantined(store)
    assert ref == "Observation/s1-anc" and reason.startswith("invalid JSON")
    # The server's next version is readable: it is newer than the undecodable copy, never shadowed.
    readable = _read(orjson.dumps(_with(ANC, meta=V2)))
    assert await store.ingest([readable], now=4.0) == [readable]
    assert await _stored_anc(store) == 400.0
    assert await store.ingest([broken, readable], now=5.0) == []  # still only once, and still in force
    assert len(await store_tables.quarantined(store)) == 1


async def test_an_undecodable_copy_behind_a_stored_version_is_quarantined_once_and_changes_nothing(
    store: Store,
) -> None:
    """It has no meta to order it by: it neither supersedes the stored version (no alert withdrawn on
    an unreadable copy) nor is dropped unseen (it used to be: "seen before")."""
    await store.ingest([_read(orjson.dumps(WBC)), _read(orjson.dumps(ANC))], now=1.0)
    (work,) = await store.dirty_panels()
    await store.commit([Decided("Patient/a", work.panel, PatientState(), [])])
    broken = _read(UNDECODABLE)
    (held,) = await store.ingest([broken], now=2.0)
    assert held == broken
    for now in (3.0, 4.0):
        assert await store.ingest([broken], now=now) == []
    ((ref, reason),) = await store_tables.quarantined(store)
    assert ref == "Observation/s1-anc" and reason.startswith("invalid JSON")
    assert await store.dirty_panels() == []
    assert (await store.counts())["results"] == 2


# Schema 1 -> 2 in place. -----------------------------------------------------------------------------


async def test_a_schema_1_store_upgrades_in_place(make: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written before digests: its rows stay, a copy of a version stored then cannot be
    compared (it counts as read before, as it did), versions stored after the upgrade can."""
    anc = _read(orjson.dumps(ANC))
    legacy = make()
    with monkeypatch.context() as m:
        m.setattr("service.live.store.schema.SCHEMA_VERSION", 1)
        await legacy.open()
        assert await legacy.lead()
        row = (
            anc.ref,
            anc.updated_us,
            anc.version,
            anc.patient,
            anc.panel,
            msgspec.msgpack.encode(anc.outcome),
        )
        if isinstance(legacy, SqliteStore):
            legacy.db.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?)", row)
            legacy.db.execute(
                "INSERT INTO quarantine (ref, version, patient, reason, received, record) "
                "VALUES ('Observation/x', 1, 'Patient/x', 'no value', 1.0, x'00')"
            )
        else:
            assert isinstance(legacy, PostgresStore)
            await legacy.pool.execute("INSERT INTO results VALUES ($1, $2, $3, $4, $5, $6)", *row)
            await legacy.pool.execute(
                "INSERT INTO quarantine (ref, version, patient, reason, received, record) "
                "VALUES ('Observation/x', 1, 'Patient/x', 'no value', 1.0, '\\x00')"
            )
        await legacy.close()
    store = make()
    await store.open()
    try:
        assert await store.lead()
        assert await store_tables.quarantined(store) == [("Observation/x", "no value")]
        assert await store.ingest([anc, _read(orjson.dumps(CONFLICTING["value"]))], now=1.0) == []
        newer = _read(orjson.dumps(_with(ANC, meta=V2)))
        assert await store.ingest([newer], now=2.0) == [newer]
        conflicting = _read(orjson.dumps(_with(CONFLICTING["value"], meta=V2)))
        held = await store.ingest([conflicting], now=3.0)  # both copies of version 2
        assert [h.outcome.reason for h in held] == [CONFLICT, CONFLICT]  # type: ignore[union-attr]  # a held row carries its outcome
    finally:
        await store.close()
