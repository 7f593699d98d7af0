"""SQLite state store (the default; one active replica). WAL mode, one connection, every change
one transaction. Every call runs on the store's own thread (`_on_store_thread`): a database that
another process holds locked blocks that thread for up to the busy timeout, never the event loop
that answers /healthz and /readyz and drains on SIGTERM.

Leadership is an exclusive flock on `<path>.leader`: a second process opening the same file (a
rolling update on a shared volume, an operator's `once`) waits as a standby and cannot write."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import msgspec
import orjson

from service.core.episodes import PatientState
from service.core.observations import LabResult, Rejected
from service.errors import StoreError
from service.live.store import schema
from service.live.store.base import (
    Decided,
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

# The stored version of an Observation: vu, vv, its digest or None, patient, panel, the LabResult,
# and for a rejected version its quarantined Rejected (`base.stored_version`).
_STORED = """SELECT r.ref, r.vu, r.vv, d.digest, r.patient, r.panel, r.data,
                    CASE WHEN r.data IS NULL THEN (SELECT q.record FROM quarantine q
                                                   WHERE q.ref = r.ref AND q.digest = d.digest LIMIT 1) END
             FROM results r LEFT JOIN digests d ON d.ref = r.ref AND d.vu = r.vu AND d.vv = r.vv
             WHERE r.ref IN (SELECT value FROM json_each(?))"""


def _quarantined_copies(db: sqlite3.Connection, refs: str) -> Iterator[tuple[str, bytes, str]]:
    """(ref, digest, reason) of the copies quarantined before of the Observations `refs` (a JSON list)."""
    for ref, content, reason in db.execute(
        "SELECT ref, digest, reason FROM quarantine "
        "WHERE ref IN (SELECT value FROM json_each(?)) AND digest IS NOT NULL",
        (refs,),
    ):
        yield ref, bytes(content), reason


_encode = msgspec.msgpack.Encoder().encode
_decode_result = msgspec.msgpack.Decoder(LabResult).decode
_state_decoder = msgspec.json.Decoder(PatientState)


BUSY_TIMEOUT_SECONDS = 5.0  # how long a statement waits for another process's write lock

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _on_store_thread(
    method: Callable[Concatenate[SqliteStore, _P], _R],
) -> Callable[Concatenate[SqliteStore, _P], Coroutine[Any, Any, _R]]:
    """The store method as a coroutine that runs it on the store's one thread. Calls are serialised
    (one thread, one connection), as they were on the event loop; a caller cancelled meanwhile does
    not cut a transaction short (it commits or rolls back whole). A sqlite3 error that no
    transaction turned into a StoreError (a read of a damaged or vanished file) becomes one."""

    @functools.wraps(method)
    async def call(self: SqliteStore, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, functools.partial(_guarded, method, self, *args, **kwargs)
        )

    return call  # type: ignore[return-value]  # typeshed: wraps gives a _Wrapped, called as declared


def _guarded(method: Callable[..., _R], store: SqliteStore, *args: Any, **kwargs: Any) -> _R:
    try:
        return method(store, *args, **kwargs)
    except sqlite3.Error as err:
        raise StoreError(f"state store {store.path}: {err}") from None


FILE_MODE = 0o600


def _private(path: str) -> None:
    """Create the state file 0600 before SQLite opens it (it would create it 0644 under the usual
    umask: patient references and results readable by every local user). SQLite creates the -wal
    and -shm files with the database file's permissions, so they follow. A file that exists with
    group or other permissions (made by an older release) loses them, and so do its -wal and -shm."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.exists(name) and (mode := os.stat(name).st_mode & 0o777) & 0o077:
                os.chmod(name, mode & 0o700)
    except OSError as err:
        raise StoreError(f"state store {path}: {err.strerror or type(err).__name__}") from None


class SqliteStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._thread: ThreadPoolExecutor | None = None

    # lifecycle -------------------------------------------------------------------------------------

    @_on_store_thread
    def open(self) -> None:
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                _private(self.path)
            # check_same_thread=False: tests read the file through `db` from their own thread
            db = sqlite3.connect(
                self.path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            self._db = db
            self._migrate()
        except sqlite3.Error as err:
            raise StoreError(f"state store {self.path}: {err}") from None

    async def close(self) -> None:
        if self._thread is not None:
            await self._close()  # after every call queued before it
            self._thread.shutdown(wait=False)
            self._thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # frees the flock
            self._lock_fd = None

    @_on_store_thread
    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    # leadership ------------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.path == ":memory:" or self._lock_fd is not None

    async def lead(self) -> bool:
        return self._try_lock()

    async def check_leader(self) -> None:
        if not self._try_lock():
            raise LeadershipLost(f"another process holds {self.path}.leader")

    def _try_lock(self) -> bool:
        if self.is_leader:
            return True  # a flock is held until the descriptor closes
        fd = os.open(self.path + ".leader", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("state store is not open")
        return self._db

    def _migrate(self) -> None:
        db = self.db
        db.execute(schema.meta_table(schema.SQLITE))
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        for version in schema.pending(int(row[0]) if row else 0, self.path):
            with _Transaction(db):  # BEGIN IMMEDIATE serialises migrating processes
                for statement in schema.migration(schema.SQLITE, version):
                    db.execute(statement)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(version),))

    def _tx(self) -> _Transaction:
        """A fenced transaction: only the leader (the holder of the flock) changes state."""
        if not self._try_lock():
            raise LeadershipLost(f"another process holds {self.path}.leader")
        return _Transaction(self.db)

    # cursor ----------------------------------------------------------------------------------------

    @_on_store_thread
    def get_cursor(self) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
        return row[0] if row else None

    @_on_store_thread
    def set_cursor(self, value: str) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (value,))

    # intake ----------------------------------------------------------------------------------------

    @_on_store_thread
    def ingest(self, items: Sequence[Intake], now: float) -> list[Intake]:
        db = self.db
        with self._tx():
            refs = orjson.dumps(list(dict.fromkeys(item.ref for item in items))).decode()
            todo = plans({r[0]: stored_version(*r[1:]) for r in db.execute(_STORED, (refs,))}, items)
            held = any(each.held for each in todo.values())
            rows = ingest_rows(todo, set(_quarantined_copies(db, refs)) if held else set(), now)
            db.executemany(
                "INSERT OR REPLACE INTO results (ref, vu, vv, patient, panel, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows.results,
            )
            db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", rows.digests)
            db.executemany(
                """INSERT INTO panels VALUES (?, ?, ?, 1, ?)
                   ON CONFLICT (patient, panel) DO UPDATE SET dirty = 1, changed_at = excluded.changed_at,
                   first_vu = MIN(panels.first_vu, excluded.first_vu)""",
                rows.touches,
            )
            db.executemany(
                "INSERT INTO quarantine (ref, version, patient, reason, received, record, digest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows.quarantine,
            )
        return rows.new

    @_on_store_thread
    def quarantine(self, rejected: Rejected, now: float) -> None:
        """A rejection with no usable id (it supersedes nothing): kept with its reason."""
        with self._tx():
            self.db.execute(
                "INSERT INTO quarantine (ref, version, patient, reason, received, record) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rejected.ref, None, rejected.patient, rejected.reason, now, _encode(rejected)),
            )

    @_on_store_thread
    def dirty_panels(self, after: PanelKey | None = None, limit: int | None = None) -> list[PanelWork]:
        db = self.db
        out: list[PanelWork] = []
        where, args = ("AND (first_vu, patient, panel) > (?, ?, ?)", after) if after is not None else ("", ())
        for patient, panel, first_vu, changed_at in db.execute(
            f"SELECT patient, panel, first_vu, changed_at FROM panels WHERE dirty = 1 {where} "
            f"ORDER BY first_vu, patient, panel LIMIT {-1 if limit is None else int(limit)}",
            args,
        ).fetchall():
            results = [
                _decode_result(data)
                for (data,) in db.execute(
                    "SELECT data FROM results WHERE patient = ? AND panel = ? "
                    "AND data IS NOT NULL ORDER BY ref",
                    (patient, panel),
                )
            ]
            out.append(PanelWork(patient, panel, first_vu, changed_at, results))
        return out

    # decisions -------------------------------------------------------------------------------------

    @_on_store_thread
    def load_states(self, patients: Sequence[str]) -> dict[str, PatientState]:
        states: dict[str, PatientState] = {}
        for patient in set(patients):
            row = self.db.execute("SELECT state FROM episodes WHERE patient = ?", (patient,)).fetchone()
            if row is not None:
                states[patient] = _state_decoder.decode(row[0])
        return states

    @_on_store_thread
    def commit(self, decided: Sequence[Decided]) -> None:
        db = self.db
        now = time.time()
        with self._tx():
            db.executemany(
                """INSERT INTO episodes (patient, state, open, newest_us) VALUES (?, ?, ?, ?)
                   ON CONFLICT (patient) DO UPDATE SET state = excluded.state, open = excluded.open,
                   newest_us = excluded.newest_us,
                   temperature_cursor = CASE WHEN ? THEN episodes.temperature_cursor END""",
                [
                    (p, msgspec.json.encode(state), is_open, newest, keep)
                    for p, state, is_open, newest, keep in episode_rows(decided)
                ],
            )
            for d in decided:
                db.execute(
                    "UPDATE panels SET dirty = 0 WHERE patient = ? AND panel = ?", (d.patient, d.panel)
                )
                for record, writes in d.records:
                    db.execute(
                        "INSERT INTO decisions (patient, decided_at, record) VALUES (?, ?, ?)",
                        (d.patient, now, to_json(record)),
                    )
                    if writes is not None:
                        db.execute(
                            "INSERT INTO outbox (patient, event, writes, created) VALUES (?, ?, ?, ?)",
                            (d.patient, to_json(record), to_json(writes), now),
                        )

    @_on_store_thread
    def open_patients(self) -> list[OpenEpisode]:
        return [
            OpenEpisode(*row)
            for row in self.db.execute(
                "SELECT patient, temperature_cursor, newest_us FROM episodes WHERE open = 1 ORDER BY patient"
            )
        ]

    @_on_store_thread
    def set_temperature_cursor(self, patient: str, cursor: str) -> None:
        with self._tx():
            self.db.execute("UPDATE episodes SET temperature_cursor = ? WHERE patient = ?", (cursor, patient))

    @_on_store_thread
    def record_decision(self, record: Decision) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO decisions (patient, decided_at, record) VALUES (?, ?, ?)",
                (record.patient, time.time(), to_json(record)),
            )

    # outbox ----------------------------------------------------------------------------------------

    @_on_store_thread
    def pending_outbox(self, limit: int = 100) -> list[OutboxEntry]:
        rows = self.db.execute(
            "SELECT id, patient, event, writes, attempts FROM outbox "
            "WHERE status = 'pending' ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        return [OutboxEntry(i, p, decode_decision(e), decode_outbox_writes(w), a) for i, p, e, w, a in rows]

    @_on_store_thread
    def mark_sent(self, entry_id: int, result: Delivery) -> None:
        with self._tx():
            self.db.execute(
                "UPDATE outbox SET status = 'sent', sent_at = ?, result = ?, "
                "attempts = attempts + 1 WHERE id = ?",
                (time.time(), to_json(result), entry_id),
            )

    @_on_store_thread
    def mark_failed(self, entry_id: int, error: str) -> None:
        with self._tx():
            self.db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                (error[:500], entry_id),
            )

    @_on_store_thread
    def outbox_pending_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()[0])

    # reading back ----------------------------------------------------------------------------------

    @_on_store_thread
    def decisions(self, patient: str | None = None) -> list[Decision]:
        sql = "SELECT record FROM decisions" + (" WHERE patient = ?" if patient else "") + " ORDER BY id"
        return [decode_decision(r) for (r,) in self.db.execute(sql, (patient,) if patient else ())]

    @_on_store_thread
    def counts(self) -> dict[str, int]:
        tables: Iterable[str] = ("results", "panels", "episodes", "decisions", "outbox", "quarantine")
        return {t: int(self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in tables}


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (so no partial state)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise StoreError(f"state store busy or unavailable: {err}") from None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as err:
                self.db.execute("ROLLBACK")
                raise StoreError(f"state store commit failed: {err}") from None
        else:
            self.db.execute("ROLLBACK")
