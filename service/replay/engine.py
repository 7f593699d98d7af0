"""`replay`: run the clinical core over FHIR files and write its decisions (the project's oracle).

Memory stays flat as input grows: pass 1 streams the input into a temporary SQLite file
(latest version of each Observation, DiagnosticReport membership, rejections); pass 2 reads panels
back in order of their first available member and runs the core. Only per-patient episode state is
held in memory.

That is the "sqlite" engine, kept as the reference. The default "partitioned" engine
(service/replay/parallel.py) computes the same bytes from the same pass-1 rows (`read_document`) and the same
pass-2 loop (service/replay/decisions.py), in partitions spread over worker processes.
"""

from __future__ import annotations

import heapq
import itertools
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import orjson

from service.config import AlertSettings
from service.core.observations import DEFAULT_READ, ReadPolicy, Rejected
from service.core.rules import Rules
from service.output.encoding import to_json
from service.replay import parallel
from service.replay.decisions import Judging, PanelTrace, ReplayRecord, decide
from service.replay.documents import documents, file_documents, files
from service.replay.rows import (
    IDENTICAL_COPY,
    Available,
    ObsRow,
    PanelVersion,
    PatientFacts,
    RejectedRow,
    ReplayStats,
    Rows,
    decode_rejected,
    decode_result,
    patient_facts,
    read_document,
    settle,
)

__all__ = ["IDENTICAL_COPY", "PatientFacts", "Replay", "ReplayStats", "documents"]


# -- the run ---------------------------------------------------------------------------------------

# Order of availability: `core.arrival.availability_key` in SQL, for the generated akey columns.
_AVAILABILITY = (
    """CASE WHEN vu >= 0
    THEN printf('%020d', vu) || char(31) || ifnull(ref, '') || char(31) || vv || char(31) """
    """|| printf('%012d', seq)
    ELSE '~' || printf('%012d', seq) END"""
)

# obs holds every version read; pass 2 keeps the latest of each (by lastUpdated, versionId, input
# position). pkey: the specimen panel key; fkey: the collection-instant key; member.pkey: the
# DiagnosticReport's key. COALESCE(pkey, member.pkey, fkey) is `core.arrival.panel_key`.
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
SELECT rowid, ref, vu, vv, seq, patient, pkey, fkey, data, rej FROM obs
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


class Replay:
    """`engine`: "partitioned" (service/replay/parallel.py: all cores, the default) or "sqlite" (one process,
    the reference the partitioned engine is tested against; both give the same bytes).
    `workers`: processes for the partitioned engine; None: one per core when the input is large
    enough to gain from them."""

    def __init__(
        self,
        rules: Rules,
        alert_settings: AlertSettings,
        workdir: str | Path | None = None,
        *,
        engine: str = "partitioned",
        workers: int | None = None,
        provenance: bool = False,
        read_policy: ReadPolicy = DEFAULT_READ,
    ):
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

    def run(
        self, inputs: Sequence[str | Path], events: IO[bytes], alerts: IO[bytes] | None = None
    ) -> ReplayStats:
        if self.engine == "partitioned":
            job = parallel.Job(
                tmp=self._tmp.name,
                rules=self.rules,
                alert_settings=self.alert_settings,
                with_alerts=alerts is not None,
                provenance=self.provenance,
                read_policy=self.read_policy,
                clock_us=self.clock_us,
            )
            return parallel.run(job, inputs, events, alerts, self.workers, self.stats, self.progress)
        self.load(inputs)
        for _akey, record, resources in self.decide(with_alerts=alerts is not None):
            events.write(to_json(record) + b"\n")
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
        for document in (d for path in files(inputs) for d in file_documents(path)):
            seq = read_document(document, seq, self.stats, rows, self._flush, policy=self.read_policy)
        self._flush(rows)
        self._dedupe()
        self.db.execute("COMMIT")

    def _dedupe(self) -> None:
        """Copies of a version, and copies that are no version, as `settle` rules."""
        assert self.db is not None
        db = self.db
        dropped: list[tuple[int]] = []
        versions: list[ObsRow] = []
        reported: list[RejectedRow] = []
        for _ref, group in itertools.groupby(db.execute(_COPIES).fetchall(), key=lambda r: r[1]):
            members = list(group)
            rowids = {row[4]: row[0] for row in members}  # by seq
            settled = settle([ObsRow(*row[1:]) for row in members])
            if settled.identical:
                self.stats.ignored[IDENTICAL_COPY] += settled.identical
            dropped += [(rowid,) for seq, rowid in rowids.items() if seq not in settled.keep]
            versions += settled.versions
            reported += settled.reported
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

    def _panels(self) -> Iterator[Available]:
        assert self.db is not None
        current: tuple[str, str, str] | None = None
        versions: list[PanelVersion] = []
        for patient, panel, first, akey, ref, data in self.db.execute(_PANELS):
            if current is None or current[2] != first:
                if current is not None:
                    yield Available(current[2], current[0], current[1], versions)
                current, versions = (patient, panel, first), []
            versions.append(PanelVersion(akey, ref, decode_result(data) if data is not None else None))
        if current is not None:
            yield Available(current[2], current[0], current[1], versions)

    def _rejections(self) -> Iterator[Available]:
        assert self.db is not None
        query = """SELECT akey, data FROM rejected UNION ALL SELECT akey, rej FROM obs WHERE rej IS NOT NULL
                   ORDER BY akey"""
        for akey, data in self.db.execute(query):
            yield Available(akey, "", "", decode_rejected(data))

    def stream(self, patient: str | None = None) -> Iterator[Available]:
        """(availability key, patient, panel key, the panel's versions or a Rejected) in order of
        availability, from the SQLite engine's tables; `patient`: only that subject reference's
        (a patient's decisions depend on its own inputs only, so they are the same either way)."""
        merged = heapq.merge(self._panels(), self._rejections(), key=lambda t: t.akey)
        if patient is None:
            return merged
        return (
            t
            for t in merged
            if (t.payload.patient if isinstance(t.payload, Rejected) else t.patient) == patient
        )

    def facts(self) -> dict[str, PatientFacts]:
        """What the loaded input says of each patient (the SQLite engine's context table)."""
        assert self.db is not None
        return patient_facts(self.db.execute("SELECT patient, kind, data FROM context"), self.rules)

    def decide(
        self,
        *,
        with_alerts: bool = True,
        stream: Iterable[Available] | None = None,
        facts: Mapping[str, PatientFacts] | None = None,
        trace: Callable[[PanelTrace], None] | None = None,
    ) -> Iterator[ReplayRecord]:
        """The decisions of the loaded input (`decisions.decide`); `stream` and `facts` by default
        from the SQLite engine's tables."""
        how = Judging(
            self.rules,
            self.alert_settings,
            clock_us=self.clock_us if self.clock_us is not None else self.stats.newest_updated_us,
            with_alerts=with_alerts,
            provenance=self.provenance,
        )
        return decide(
            self.stream() if stream is None else stream,
            self.facts() if facts is None else facts,
            how,
            self.stats,
            trace,
        )
