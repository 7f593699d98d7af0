"""PostgreSQL state store (asyncpg): the same protocol and semantics as sqlite.py, for several replicas.

Leadership is a PostgreSQL advisory lock held inside an open transaction on a dedicated connection,
with `idle_in_transaction_session_timeout` as a lease: the leader renews it by running a statement
every store.failover_check_seconds (`lead()`); a leader that dies, is partitioned from the database or
stalls longer than the lease loses its session, and with it the lock. Whoever takes the lock bumps
`leader.epoch`; every transaction that changes state first reads the epoch `FOR SHARE` and fails with
LeadershipLost if it is not its own, so an old leader that wakes up changes nothing.

Text columns use the "C" collation so orderings equal SQLite's (byte order), and therefore so do
the decisions. The DSN is never logged nor put in an error message.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec
import structlog

from service.config import pgdsn
from service.core.episodes import PatientState
from service.core.observations import LabResult, Rejected
from service.errors import StoreError
from service.live.store import schema
from service.live.store.base import (
    Decided,
    IngestRows,
    Intake,
    LeadershipLost,
    OpenEpisode,
    OutboxEntry,
    PanelKey,
    PanelWork,
    episode_rows,
    ingest_rows,
    plans,
    stored_version,
)
from service.output.encoding import to_json
from service.output.events import Decision, decode_decision
from service.output.transaction import Delivery, decode_outbox_writes

log = structlog.get_logger("neutrowatch.store")

LOCK_CLASS = 0x4E57  # "NW": first key of neutrowatch's advisory locks; the second is derived from the schema
# Errors that mean "the database is unreachable or refused": reported as StoreError, never with the DSN.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

_encode = msgspec.msgpack.Encoder().encode
_decode_result = msgspec.msgpack.Decoder(LabResult).decode
_state_decoder = msgspec.json.Decoder(PatientState)


def lock_key(schema: str) -> int:
    """The advisory lock's second key: a stable signed 32-bit hash of the schema name."""
    value = zlib.crc32(schema.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


def describe_dsn(dsn: str) -> str:
    """host:port/database of a DSN, for messages, /readyz and logs: built from the parsed host, port
    and database only (never the user, password or options); a DSN of neither libpq form shows
    as "(unparseable DSN)", never as its text."""
    return pgdsn.describe(dsn)


class PostgresStore:
    def __init__(
        self,
        dsn: str,
        schema: str = "neutrowatch",
        *,
        pool_size: int = 4,
        lease_seconds: float = 15.0,
        identity: str | None = None,
    ):
        self._dsn = dsn
        self.schema = schema
        self.where = f"postgres {describe_dsn(dsn)} schema {schema}"
        self.pool_size = pool_size
        self.lease_seconds = lease_seconds
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self._pool: asyncpg.Pool | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self._epoch: int | None = None
        self._leading = asyncio.Lock()

    def __repr__(self) -> str:  # never the DSN
        return f"PostgresStore({self.where})"

    # lifecycle -------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, str]:
        return {"search_path": self.schema, "application_name": "neutrowatch"}

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self.pool_size,
                server_settings=self._settings(),
                timeout=10,
                reset=_no_reset,
            )
            await self._migrate()
        except StoreError:
            await self.close()
            raise
        except (*_DB_ERRORS, ValueError) as err:
            await self.close()
            raise StoreError(f"state store {self.where}: {_reason(err)}") from None

    async def close(self) -> None:
        await self._release()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (*_DB_ERRORS, asyncio.CancelledError):
                pool.terminate()

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("state store is not open")
        return self._pool

    async def _migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            # One replica migrates at a time; the others wait here, then find nothing to do.
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_CLASS, lock_key(self.schema) ^ 1)
            await conn.execute(schema.meta_table(schema.POSTGRES))
            current = int(await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'") or 0)
            for version in schema.pending(current, self.where):
                for statement in schema.migration(schema.POSTGRES, version):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', $1) "
                    "ON CONFLICT (key) DO UPDATE SET value = $1",
                    str(version),
                )
                log.info("state store migrated", schema=self.schema, version=version)

    # leadership ------------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._epoch is not None

    async def lead(self) -> bool:
        """False when another replica holds the lock; StoreError when the database cannot be asked."""
        async with self._leading:
            if self._epoch is not None:
                try:
                    assert self._lock_conn is not None
                    await asyncio.wait_for(self._lock_conn.fetchval("SELECT 1"), self.lease_seconds / 3)
                    return True
                except (*_DB_ERRORS, AssertionError) as err:
                    log.warning(
                        "leader lock lost", schema=self.schema, epoch=self._epoch, reason=_reason(err)
                    )
                    await self._release()
            return await self._acquire()  # at once: only the lock's connection may have died

    async def _acquire(self) -> bool:
        try:
            if self._lock_conn is None or self._lock_conn.is_closed():
                self._lock_conn = await asyncpg.connect(
                    self._dsn, server_settings=self._settings(), timeout=10
                )
            conn = self._lock_conn
            tx = conn.transaction()
            await tx.start()
            await conn.execute(
                f"SET LOCAL idle_in_transaction_session_timeout = {int(self.lease_seconds * 1000)}"
            )
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock($1, $2)", LOCK_CLASS, lock_key(self.schema)
            ):
                await tx.rollback()
                return False
            epoch = await self.pool.fetchval(
                "UPDATE leader SET epoch = epoch + 1, holder = $1, since = now() "
                "WHERE id = 1 RETURNING epoch",
                self.identity,
            )
        except _DB_ERRORS as err:
            await self._release()
            raise StoreError(f"state store {self.where}: {_reason(err)}") from None
        self._epoch = int(epoch)
        log.info("leader lock taken", schema=self.schema, epoch=self._epoch)
        return True

    async def _release(self) -> None:
        self._epoch = None
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)  # ends the transaction: the lock is freed at once
            except (*_DB_ERRORS, asyncio.CancelledError):
                conn.terminate()

    async def check_leader(self) -> None:
        if self._epoch is None:
            raise LeadershipLost("this replica is not the leader")
        try:
            epoch = await self.pool.fetchval("SELECT epoch FROM leader WHERE id = 1")
        except _DB_ERRORS as err:
            raise StoreError(f"state store {self.where}: {_reason(err)}") from None
        self._check_epoch(epoch)

    def _check_epoch(self, epoch: int | None) -> None:
        if epoch != self._epoch:
            mine, self._epoch = self._epoch, None
            raise LeadershipLost(f"leadership passed from epoch {mine} to {epoch}; nothing was written")

    @asynccontextmanager
    async def _tx(self, *, fenced: bool = True) -> AsyncIterator[asyncpg.Connection]:
        """One transaction; `fenced` ones first prove this process is still the leader of record."""
        if fenced and self._epoch is None and not await self.lead():
            raise LeadershipLost("another replica holds the leader lock")
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if fenced:
                    self._check_epoch(await conn.fetchval("SELECT epoch FROM leader WHERE id = 1 FOR SHARE"))
                yield conn
        except StoreError:
            raise
        except _DB_ERRORS as err:
            raise StoreError(f"state store {self.where}: {_reason(err)}") from None

    async def _read(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            rows: list[asyncpg.Record] = await self.pool.fetch(sql, *args)  # asyncpg is unannotated
            return rows
        except _DB_ERRORS as err:
            raise StoreError(f"state store {self.where}: {_reason(err)}") from None

    # cursor ----------------------------------------------------------------------------------------

    async def get_cursor(self) -> str | None:
        rows = await self._read("SELECT value FROM meta WHERE key = 'cursor'")
        return rows[0][0] if rows else None

    async def set_cursor(self, value: str) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO meta VALUES ('cursor', $1) ON CONFLICT (key) DO UPDATE SET value = $1", value
            )

    # intake ----------------------------------------------------------------------------------------

    async def ingest(self, items: Sequence[Intake], now: float) -> list[Intake]:
        if not items:
            return []
        async with self._tx() as conn:
            refs = list(dict.fromkeys(item.ref for item in items))
            todo = plans({r[0]: stored_version(*r[1:]) for r in await conn.fetch(_STORED, refs)}, items)
            held = any(each.held for each in todo.values())
            rows = ingest_rows(todo, await _quarantined_copies(conn, refs) if held else set(), now)
            await _write(conn, rows)
        return rows.new

    async def quarantine(self, rejected: Rejected, now: float) -> None:
        async with self._tx() as conn:
            await conn.execute(
                _QUARANTINE, rejected.ref, None, rejected.patient, rejected.reason, now, _encode(rejected)
            )

    async def dirty_panels(self, after: PanelKey | None = None, limit: int | None = None) -> list[PanelWork]:
        first_vu, patient, panel = after if after is not None else (None, None, None)
        panels = await self._read(
            """SELECT patient, panel, first_vu, changed_at FROM panels
               WHERE dirty AND ($1::bigint IS NULL OR (first_vu, patient, panel) > ($1, $2::text, $3::text))
               ORDER BY first_vu, patient, panel LIMIT $4""",
            first_vu,
            patient,
            panel,
            limit,
        )
        if not panels:
            return []
        rows = await self._read(
            """SELECT r.patient, r.panel, r.data FROM results r
               JOIN unnest($1::text[], $2::text[]) AS p (patient, panel) """
            """ON p.patient = r.patient AND p.panel = r.panel
               WHERE r.data IS NOT NULL ORDER BY r.ref""",
            [p[0] for p in panels],
            [p[1] for p in panels],
        )
        results: dict[tuple[str, str], list[LabResult]] = {}
        for patient, panel, data in rows:
            results.setdefault((patient, panel), []).append(_decode_result(data))
        return [PanelWork(p, k, f, c, results.get((p, k), [])) for p, k, f, c in panels]

    # decisions -------------------------------------------------------------------------------------

    async def load_states(self, patients: Sequence[str]) -> dict[str, PatientState]:
        rows = await self._read(
            "SELECT patient, state FROM episodes WHERE patient = ANY($1::text[])", list(set(patients))
        )
        return {patient: _state_decoder.decode(state) for patient, state in rows}

    async def commit(self, decided: Sequence[Decided]) -> None:
        if not decided:
            return
        now = time.time()
        episodes = [
            (p, msgspec.json.encode(state), is_open, newest, keep)
            for p, state, is_open, newest, keep in episode_rows(decided)
        ]
        panels, decisions, outbox = [], [], []
        for d in decided:
            panels.append((d.patient, d.panel))
            for record, writes in d.records:
                text = to_json(record).decode()
                decisions.append((d.patient, now, text))
                if writes is not None:
                    outbox.append((d.patient, text, to_json(writes).decode(), now))
        async with self._tx() as conn:
            await conn.executemany(
                """INSERT INTO episodes (patient, state, open, newest_us) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (patient) DO UPDATE SET state = excluded.state, open = excluded.open,
                   newest_us = excluded.newest_us,
                   temperature_cursor = CASE WHEN $5 THEN episodes.temperature_cursor END""",
                episodes,
            )
            await conn.executemany(
                "UPDATE panels SET dirty = false WHERE patient = $1 AND panel = $2", panels
            )
            if decisions:
                await conn.executemany(
                    "INSERT INTO decisions (patient, decided_at, record) VALUES ($1, $2, $3::jsonb)",
                    decisions,
                )
            if outbox:
                await conn.executemany(
                    "INSERT INTO outbox (patient, event, writes, created) "
                    "VALUES ($1, $2::jsonb, $3::jsonb, $4)",
                    outbox,
                )

    async def open_patients(self) -> list[OpenEpisode]:
        rows = await self._read(
            "SELECT patient, temperature_cursor, newest_us FROM episodes WHERE open ORDER BY patient"
        )
        return [OpenEpisode(*r) for r in rows]

    async def set_temperature_cursor(self, patient: str, cursor: str) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE episodes SET temperature_cursor = $1 WHERE patient = $2", cursor, patient
            )

    async def record_decision(self, record: Decision) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO decisions (patient, decided_at, record) VALUES ($1, $2, $3::jsonb)",
                record.patient,
                time.time(),
                to_json(record).decode(),
            )

    # outbox ----------------------------------------------------------------------------------------

    async def pending_outbox(self, limit: int = 100) -> list[OutboxEntry]:
        """Claims the oldest pending writes for this leader's epoch, in the fenced transaction."""
        async with self._tx() as conn:
            rows = await conn.fetch(
                """UPDATE outbox SET claimed_epoch = $1 WHERE id IN
                     (SELECT id FROM outbox WHERE status = 'pending' ORDER BY id LIMIT $2)
                   RETURNING id, patient, event::text, writes::text, attempts""",
                self._epoch,
                limit,
            )
        return sorted(
            (OutboxEntry(i, p, decode_decision(e), decode_outbox_writes(w), a) for i, p, e, w, a in rows),
            key=lambda e: e.id,
        )

    async def mark_sent(self, entry_id: int, result: Delivery) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE outbox SET status = 'sent', sent_at = $1, result = $2::jsonb, "
                "attempts = attempts + 1 WHERE id = $3",
                time.time(),
                to_json(result).decode(),
                entry_id,
            )

    async def mark_failed(self, entry_id: int, error: str) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $1 WHERE id = $2",
                error[:500],
                entry_id,
            )

    async def outbox_pending_count(self) -> int:
        return int((await self._read("SELECT count(*) FROM outbox WHERE status = 'pending'"))[0][0])

    # reading back ----------------------------------------------------------------------------------

    async def decisions(self, patient: str | None = None) -> list[Decision]:
        if patient is None:
            rows = await self._read("SELECT record::text FROM decisions ORDER BY id")
        else:
            rows = await self._read(
                "SELECT record::text FROM decisions WHERE patient = $1 ORDER BY id", patient
            )
        return [decode_decision(r[0]) for r in rows]

    async def counts(self) -> dict[str, int]:
        tables = ("results", "panels", "episodes", "decisions", "outbox", "quarantine")
        rows = await self._read(" UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in tables))
        return {t: int(n) for t, n in rows}


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """Pool connections carry no session state of ours (search_path is set at connect), so asyncpg's
    default reset on release (advisory unlock, RESET ALL, ...) would only cost a round trip per call."""


_QUARANTINE = (
    "INSERT INTO quarantine (ref, version, patient, reason, received, record) VALUES ($1, $2, $3, $4, $5, $6)"
)
_QUARANTINE_COPY = """INSERT INTO quarantine (ref, version, patient, reason, received, record, digest)
                      VALUES ($1, $2, $3, $4, $5, $6, $7)"""
# The stored version of each Observation: ref, then as sqlite.py's _STORED (`base.stored_version`).
_STORED = (
    """SELECT r.ref, r.vu, r.vv, d.digest, r.patient, r.panel, r.data,
                    CASE WHEN r.data IS NULL THEN (SELECT q.record FROM quarantine q
                                                   WHERE q.ref = r.ref AND q.digest = d.digest LIMIT 1) END
             FROM results r LEFT JOIN digests d ON d.ref = r.ref AND d.vu = r.vu AND d.vv = r.vv """
    "WHERE r.ref = ANY($1::text[])"
)


async def _write(conn: asyncpg.Connection, rows: IngestRows) -> None:
    """The rows of one `ingest`, in batches."""
    if rows.results:
        await conn.executemany(
            """INSERT INTO results (ref, vu, vv, patient, panel, data) VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (ref) DO UPDATE SET vu = excluded.vu, vv = excluded.vv, patient = excluded.patient,
               panel = excluded.panel, data = excluded.data""",
            rows.results,
        )
        await conn.executemany(
            """INSERT INTO digests VALUES ($1, $2, $3, $4) ON CONFLICT (ref) DO UPDATE SET
               vu = excluded.vu, vv = excluded.vv, digest = excluded.digest""",
            rows.digests,
        )
    if rows.touches:
        await conn.executemany(
            """INSERT INTO panels VALUES ($1, $2, $3, true, $4) ON CONFLICT (patient, panel) DO UPDATE SET
               dirty = true, changed_at = excluded.changed_at, """
            "first_vu = LEAST(panels.first_vu, excluded.first_vu)",
            rows.touches,
        )
    if rows.quarantine:
        await conn.executemany(_QUARANTINE_COPY, rows.quarantine)


async def _quarantined_copies(conn: asyncpg.Connection, refs: list[str]) -> set[tuple[str, bytes, str]]:
    rows = await conn.fetch(
        "SELECT ref, digest, reason FROM quarantine WHERE ref = ANY($1::text[]) AND digest IS NOT NULL", refs
    )
    return {(r[0], bytes(r[1]), r[2]) for r in rows}


def _reason(err: BaseException) -> str:
    """A one-line reason from a driver error. asyncpg's messages name the server's complaint, not the DSN."""
    if isinstance(err, asyncpg.ClientConfigurationError | ValueError):
        return "invalid DSN (its text is not repeated here: it may hold a password)"
    if isinstance(err, asyncpg.PostgresError | asyncpg.InterfaceError):
        return f"{type(err).__name__}: {err.args[0] if err.args else ''}".strip()
    return type(err).__name__ + (f": {err.strerror}" if isinstance(err, OSError) and err.strerror else "")
