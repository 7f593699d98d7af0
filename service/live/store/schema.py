"""The state store's tables, described once and rendered for each SQL dialect (sqlite.py, postgres.py).

Types are written as placeholders a dialect fills in: `{key}` a text column that is compared and
ordered (byte order: PostgreSQL's "C" collation, SQLite's default), `{text}`, `{int}` (64 bits),
`{int32}`, `{real}`, `{bool}`, `{bytes}`, `{json}` (a JSON document), `{id}` (an increasing row id,
the primary key), `{false}`. `{keyed}` ends a table looked up by its primary key only (SQLite
stores it WITHOUT ROWID). The indexes differ where the dialects do (PostgreSQL has partial ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import StoreError

SCHEMA_VERSION = 2


@dataclass(frozen=True, slots=True)
class Dialect:
    types: dict[str, str]
    # What one dialect has that the other does not: its own tables, outbox columns and indexes, per migration.
    extra_tables: dict[int, tuple[str, ...]]
    outbox_columns: str
    indexes: dict[int, tuple[str, ...]]


_TABLES: dict[int, tuple[str, ...]] = {
    1: (
        # latest version of each Observation read, data NULL when that version was rejected
        """CREATE TABLE results (ref {key} PRIMARY KEY, vu {int} NOT NULL, vv {int} NOT NULL,
                                 patient {key}, panel {key}, data {bytes}){keyed}""",
        """CREATE TABLE panels (patient {key} NOT NULL, panel {key} NOT NULL, first_vu {int} NOT NULL,
                                dirty {bool} NOT NULL, changed_at {real} NOT NULL,
                                PRIMARY KEY (patient, panel)){keyed}""",
        """CREATE TABLE episodes (patient {key} PRIMARY KEY, state {bytes} NOT NULL,
                                  open {bool} NOT NULL DEFAULT {false}, newest_us {int},
                                  temperature_cursor {text}){keyed}""",
        "CREATE TABLE decisions (id {id}, patient {key}, decided_at {real} NOT NULL, record {json} NOT NULL)",
        """CREATE TABLE outbox (id {id}, patient {key} NOT NULL, event {json} NOT NULL,
                                writes {json} NOT NULL, status {text} NOT NULL DEFAULT 'pending',
                                attempts {int32} NOT NULL DEFAULT 0, last_error {text},
                                created {real} NOT NULL{outbox_columns}, sent_at {real}, result {json})""",
        """CREATE TABLE quarantine (id {id}, ref {text}, version {int}, patient {text},
                                    reason {text} NOT NULL, received {real} NOT NULL,
                                    record {bytes} NOT NULL)""",
    ),
    # The digest (base.digest) of the version each results row holds, for telling a copy sent again
    # from a conflicting one. A table of its own, keyed by the version it belongs to, so that a row
    # written by a replica or release without digests is never compared with a digest of an older
    # version. quarantine.digest: the content of each quarantined copy, so that a copy read again
    # is not quarantined again.
    2: (
        """CREATE TABLE digests (ref {key} PRIMARY KEY, vu {int} NOT NULL, vv {int} NOT NULL,
                                 digest {bytes} NOT NULL){keyed}""",
        "ALTER TABLE quarantine ADD COLUMN digest {bytes}",
        "CREATE INDEX quarantine_copy ON quarantine (ref, digest)",
    ),
}
META = "CREATE TABLE IF NOT EXISTS meta (key {key} PRIMARY KEY, value {text} NOT NULL){keyed}"

SQLITE = Dialect(
    types={
        "key": "TEXT",
        "text": "TEXT",
        "int": "INTEGER",
        "int32": "INTEGER",
        "real": "REAL",
        "bool": "INTEGER",
        "bytes": "BLOB",
        "json": "BLOB",
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "false": "0",
        "keyed": " WITHOUT ROWID",
    },
    extra_tables={},
    outbox_columns="",
    indexes={
        1: (
            "CREATE INDEX results_panel ON results (patient, panel)",
            "CREATE INDEX panels_dirty ON panels (dirty, first_vu)",
            "CREATE INDEX episodes_open ON episodes (open)",
            "CREATE INDEX decisions_patient ON decisions (patient)",
            "CREATE INDEX outbox_pending ON outbox (status, id)",
        )
    },
)

POSTGRES = Dialect(
    types={
        "key": 'text COLLATE "C"',
        "text": "text",
        "int": "bigint",
        "int32": "integer",
        "real": "double precision",
        "bool": "boolean",
        "bytes": "bytea",
        "json": "jsonb",
        "id": "bigserial PRIMARY KEY",
        "false": "false",
        "keyed": "",
    },
    # leader: the epoch of the replica that holds the leader lock (postgres.py)
    extra_tables={
        1: (
            "CREATE TABLE leader (id integer PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL, "
            "holder text, since timestamptz)",
            "INSERT INTO leader VALUES (1, 0, NULL, NULL)",
        )
    },
    outbox_columns=", claimed_epoch {int}",
    indexes={
        1: (
            "CREATE INDEX results_panel ON results (patient, panel)",
            "CREATE INDEX panels_dirty ON panels (first_vu, patient, panel) WHERE dirty",
            "CREATE INDEX episodes_open ON episodes (patient) WHERE open",
            "CREATE INDEX decisions_patient ON decisions (patient, id)",
            "CREATE INDEX outbox_pending ON outbox (id) WHERE status = 'pending'",
        )
    },
)


def meta_table(dialect: Dialect) -> str:
    """The table that holds the schema version (created before any migration runs)."""
    return META.format(**dialect.types)


def migration(dialect: Dialect, version: int) -> list[str]:
    """The statements that take a store of schema `version - 1` to `version`, in this dialect."""
    fill = {**dialect.types, "outbox_columns": dialect.outbox_columns.format(**dialect.types)}
    return [
        *dialect.extra_tables.get(version, ()),
        *(sql.format(**fill) for sql in _TABLES[version]),
        *dialect.indexes.get(version, ()),
    ]


def pending(current: int, where: str) -> range:
    """The schema versions a store at `current` migrates through; StoreError when the store was
    written by a newer release (its schema cannot be read)."""
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"state store {where} has schema {current}, newer than this version ({SCHEMA_VERSION})"
        )
    return range(current + 1, SCHEMA_VERSION + 1)
