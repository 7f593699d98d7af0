"""The partitioned replay engine: the SQLite engine's output, byte for byte, computed on all cores
in memory bounded by the size of one partition.

1. read (parallel over byte ranges of the input files): decode and normalise into the SQLite
   engine's rows (`replay.read_document`). Observation versions and DiagnosticReport memberships go
   to a partition chosen by the Observation reference, so everything about one Observation meets
   in one partition; rejections go straight to step 3.
2. latest (parallel over reference partitions): keep the newest version of each Observation (by
   lastUpdated, versionId, input position), give it its panel key (specimen, else
   DiagnosticReport, else collection instant) and its availability key, and pass it on to a
   partition chosen by patient.
3. judge (parallel over patient partitions): group panels, order them and the rejections by
   availability and run the core (`decisions.decide`, the loop the SQLite engine runs). A patient's
   panels are all in one partition, so each patient sees its panels in the global order. Each
   partition writes a run of output lines sorted by availability key.
4. merge: the parent merges the runs into the events and alerts files.

Partitions are chosen with the built-in `hash`, which is the same in every process only because the
workers are forked from one parent (without fork, everything runs in this process).

Steps hand rows on through files in the run's temporary directory (msgpack segments); only an
index of (file, offset, length) per partition goes between processes. A worker holds one chunk of
input (step 1) or one partition (steps 2 and 3); the number of partitions grows with the input,
so memory stays flat (up to a few GB of input, where chunks and partitions start to grow instead).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgspec
import orjson

from service.config import AlertSettings
from service.core.arrival import availability_key, newest_order, panel_key
from service.core.observations import DEFAULT_READ, ReadPolicy
from service.core.rules import Rules
from service.output.encoding import to_json
from service.replay.chunks import Chunk, documents, input_size, plan
from service.replay.decisions import Judging, decide
from service.replay.documents import files
from service.replay.partition import PatientPart, PatientRow, RejectionRow, arrivals, decode_part, stream
from service.replay.rows import (
    IDENTICAL_COPY,
    ContextRow,
    Membership,
    ObsRow,
    ReplayStats,
    Rows,
    patient_facts,
    read_document,
    settle,
)

CHUNK_BYTES = 8 << 20  # step 1 reads the input in byte ranges of about this size ...
PARTITION_BYTES = 16 << 20  # ... and makes one partition per this much input (about 16k Observations)
MAX_PARTITIONS = MAX_CHUNKS = 256  # beyond 2-4 GB of input, chunks and partitions grow instead
PARALLEL_MIN_BYTES = 16 << 20  # below this much input, worker processes cost more than they save
_RUN_FRAME_BYTES = 64 << 10  # step 3 writes its run in frames of about this size


class Segment(NamedTuple):
    """Where one msgpack value is: the index that goes between processes."""

    path: str
    offset: int
    length: int


class _RunLine(msgspec.Struct, frozen=True, array_like=True, order=True, gc=False):
    """One decision record in a partition's run (step 3 -> step 4), merged by (akey, n)."""

    akey: str
    n: int  # position in its partition's output (a patient's records keep their order)
    kind: str  # the record's event
    line: bytes  # the record's JSON line
    alert_lines: bytes  # its alert resources' lines (b"": none)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


@dataclass(frozen=True)
class Job:
    """What every task needs, from the caller (`Replay.run`); set once per worker process."""

    tmp: str  # the run's temporary directory
    rules: Rules
    alert_settings: AlertSettings
    with_alerts: bool
    provenance: bool = False
    read_policy: ReadPolicy = DEFAULT_READ
    clock_us: int | None = None  # the reading clock when the caller fixed it (Replay.clock_us)
    partitions: int = 1  # set by `run` from the input's size


# The job of this process: set by the pool's initializer (`_start`), once per worker process, and
# around an in-process run. A module global because ProcessPoolExecutor hands a task only what
# `map` pickles for it: passing the job with every task would pickle the rules and the alert
# settings once per chunk and partition, where the initializer gives each worker process its copy
# once. Nothing else writes it; each process runs one job at a time.
_job: Job | None = None


def _start(job: Job | None) -> None:
    """The pool's initializer: this process's job (None: none)."""
    global _job
    _job = job


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- the run ---------------------------------------------------------------------------------------


def run(
    job: Job,
    inputs: Sequence[str | Path],
    events: IO[bytes],
    alerts: IO[bytes] | None,
    workers: int | None,
    stats: ReplayStats,
    progress: Callable[[str, int, int], None] | None = None,
) -> ReplayStats:
    """Replay `inputs` into `events` (and `alerts`), the counts added to `stats`; `progress`:
    (stage, done, total) as the stages go."""
    paths = files(inputs)
    size = sum(input_size(path) for path in paths)
    if workers is None:
        workers = default_workers() if size >= PARALLEL_MIN_BYTES else 1
    # Bounded counts keep the index (chunks x partitions segments) and the number of files small.
    job = replace(job, partitions=min(MAX_PARTITIONS, max(1, math.ceil(size / PARTITION_BYTES))))
    chunks = plan(paths, max(CHUNK_BYTES, math.ceil(size / MAX_CHUNKS)))
    with _collector_tuned():
        if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            try:
                _start(job)
                return _run(stats, _reporting(map, progress), job, chunks, events, alerts)
            finally:
                _start(None)
        # fork: the workers share the parent's imports and its `hash` seed (module docstring).
        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_start, initargs=(job,)
        )
        try:
            return _run(stats, _reporting(pool.map, progress), job, chunks, events, alerts)
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure, the tasks not yet started do not run


_STAGES = {"read_chunk": "reading input", "latest": "ordering versions", "judge": "deciding"}


def _reporting(
    map_: Callable[..., Iterator[Any]], progress: Callable[[str, int, int], None] | None
) -> Callable[..., Iterator[Any]]:
    """`map_` that tells `progress` (stage, done, total) after each task (replay --progress on a terminal)."""
    if progress is None:
        return map_

    def reporting(fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
        args = [list(it) for it in iterables]
        stage = _STAGES.get(fn.__name__, fn.__name__)
        for done, result in enumerate(map_(fn, *args), 1):
            progress(stage, done, len(args[0]))
            yield result

    return reporting


@contextmanager
def _collector_tuned() -> Iterator[None]:
    """The run makes many short-lived containers and few reference cycles: collect the young
    generation less often, and freeze what exists already (imports, mostly) so that collections do
    not walk it again and again (nor copy its pages into forked workers by touching them)."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(20_000, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _run(
    stats: ReplayStats,
    map_: Callable[..., Iterator[Any]],
    job: Job,
    chunks: list[Chunk],
    events: IO[bytes],
    alerts: IO[bytes] | None,
) -> ReplayStats:
    n = job.partitions
    by_ref: list[list[Segment]] = [[] for _ in range(n)]
    by_patient: list[list[Segment]] = [[] for _ in range(n)]
    for chunk_stats, ref_segments, patient_segments in map_(read_chunk, chunks):  # in input order
        _add(stats, chunk_stats)
        for part, segments in ref_segments.items():
            by_ref[part].extend(segments)
        for part, segments in patient_segments.items():
            by_patient[part].extend(segments)
    identical = 0
    for patient_segments, dropped in map_(latest, range(n), by_ref):
        identical += dropped
        for part, segment in patient_segments.items():
            by_patient[part].append(segment)
    if identical:
        stats.ignored[IDENTICAL_COPY] += identical
    _remove({path for segments in by_ref for path, _, _ in segments})
    runs: list[list[Segment]] = []
    counted: Counter[str] = Counter()
    clock = job.clock_us if job.clock_us is not None else stats.newest_updated_us
    for judged in map_(judge, range(n), by_patient, [clock] * n):
        runs.append(judged.run)
        stats.panels += judged.panels
        stats.stale_panels += judged.stale_panels
        stats.unassessed.update(judged.unassessed)
        counted.update(judged.events)
    _remove({path for segments in by_patient for path, _, _ in segments})
    kinds: Counter[str] = Counter()
    for merged in heapq.merge(*map(_frames, runs)):
        events.write(merged.line)
        if alerts is not None and merged.alert_lines:
            alerts.write(merged.alert_lines)
        kinds[merged.kind] += 1
    # The counts come from the core; the merge only puts them in the order the SQLite engine would.
    stats.events.update(kinds if kinds == counted else counted)
    return stats


def _add(total: ReplayStats, part: ReplayStats) -> None:
    total.documents += part.documents
    total.resources += part.resources
    total.observations += part.observations
    if part.newest_updated_us is not None and (
        total.newest_updated_us is None or part.newest_updated_us > total.newest_updated_us
    ):
        total.newest_updated_us = part.newest_updated_us
    total.ignored.update(part.ignored)


def _spill(name: str, parts: Mapping[int, tuple[Sequence[Any], ...]]) -> dict[int, Segment]:
    """Write one msgpack value per partition to a new file; where each one is."""
    assert _job is not None
    path = os.path.join(_job.tmp, name)
    index: dict[int, Segment] = {}
    offset = 0
    with open(path, "wb") as fh:
        for part, value in parts.items():
            blob = _encode(value)
            fh.write(blob)
            index[part] = Segment(path, offset, len(blob))
            offset += len(blob)
    return index


def _load(segments: Iterable[Segment], decode: Callable[[bytes], Any] = _decode) -> Iterator[Any]:
    for path, offset, length in segments:
        with open(path, "rb") as fh:
            fh.seek(offset)
            yield decode(fh.read(length))


def _remove(paths: Iterable[str]) -> None:
    for path in paths:
        os.unlink(path)


# -- step 1: read ------------------------------------------------------------------------------------


SPILL_ROWS = 32_768  # step 1 spills a chunk's rows in parts of this many: one large Bundle is one chunk


def read_chunk(chunk: Chunk) -> tuple[ReplayStats, dict[int, list[Segment]], dict[int, list[Segment]]]:
    assert _job is not None
    n = _job.partitions
    stats = ReplayStats()
    rows = Rows()
    seq = chunk.number << 32
    by_ref: dict[int, list[Segment]] = {}
    by_patient: dict[int, list[Segment]] = {}

    spills = itertools.count()

    def spill(rows: Rows) -> None:
        part = next(spills)
        refs, patients = _partitioned(rows, n)
        for i, segment in _spill(f"read-{chunk.number}-{part}-ref", refs).items():
            by_ref.setdefault(i, []).append(segment)
        for i, segment in _spill(f"read-{chunk.number}-{part}-patient", patients).items():
            by_patient.setdefault(i, []).append(segment)
        rows.clear()

    for document in documents(chunk):
        seq = read_document(document, seq, stats, rows, spill, SPILL_ROWS, _job.read_policy)
    spill(rows)
    return stats, by_ref, by_patient


def _partitioned(
    rows: Rows, n: int
) -> tuple[dict[int, tuple[list[ObsRow], list[Membership]]], dict[int, PatientPart]]:
    obs: list[list[ObsRow]] = [[] for _ in range(n)]
    members: list[list[Membership]] = [[] for _ in range(n)]
    for row in rows.obs:
        obs[hash(row.ref) % n].append(row)
    for member in rows.member:
        members[hash(member.ref) % n].append(member)
    rejected: list[list[RejectionRow]] = [[] for _ in range(n)]
    for ref, vu, vv, number, data in rows.rejected:  # rejections need no more than sorting: any partition
        rejected[number % n].append(RejectionRow(availability_key(ref, vu, vv, number), data))
    context: list[list[ContextRow]] = [[] for _ in range(n)]
    for context_row in rows.context:  # Patient, Condition, ServiceRequest, CareTeam: where its panels go
        context[hash(context_row.patient) % n].append(context_row)
    by_ref = {i: (obs[i], members[i]) for i in range(n) if obs[i] or members[i]}
    by_patient = {i: PatientPart([], rejected[i], context[i]) for i in range(n) if rejected[i] or context[i]}
    return by_ref, by_patient


# -- step 2: latest version, panel key ----------------------------------------------------------


_decode_versions = msgspec.msgpack.Decoder(tuple[list[ObsRow], list[Membership]]).decode


def latest(part: int, segments: list[Segment]) -> tuple[dict[int, Segment], int]:
    """Each Observation's versions, given the panel and patient of its newest usable version (a
    rejected version has none of its own), passed on to the patient's partition; the rejections
    of its rejected versions to any partition. Copies of a version and copies that are no version
    are ruled by `rows.settle` (as `Replay._dedupe`). Returns the segments and how many
    identical copies were dropped."""
    assert _job is not None
    versions: dict[str, list[ObsRow]] = {}
    reports: dict[str, str] = {}
    for obs, members in _load(segments, _decode_versions):  # in input order
        for row in obs:
            versions.setdefault(row.ref, []).append(row)
        for ref, key in members:
            reports.setdefault(ref, key)  # the first DiagnosticReport naming it (INSERT OR IGNORE)
    n = _job.partitions
    results: list[list[PatientRow]] = [[] for _ in range(n)]
    rejected: list[list[RejectionRow]] = [[] for _ in range(n)]
    identical = 0
    for ref, rows in versions.items():
        rows, dropped = _first_copies(rows, rejected)
        identical += dropped
        for r in rows:
            if r.rej is not None:
                rejected[r.seq % n].append(RejectionRow(availability_key(ref, r.vu, r.vv, r.seq), r.rej))
        usable = [r for r in rows if r.data is not None]
        if not usable:
            continue
        newest = max(usable, key=lambda r: newest_order(r.vu, r.vv, r.seq))
        assert newest.patient is not None and newest.fkey is not None  # (a usable version has both)
        panel = panel_key(newest.pkey, reports.get(ref), newest.fkey)
        target = results[hash(newest.patient) % n]
        for row in rows:
            if row.data is None and row.vu < 0 and row.vv < 0:
                continue  # unplaced (an undecodable entry): reported above, no version (as engine._PANELS)
            target.append(
                PatientRow(
                    newest.patient, panel, availability_key(ref, row.vu, row.vv, row.seq), row.data, ref
                )
            )
    parts = {i: PatientPart(results[i], rejected[i], []) for i in range(n) if results[i] or rejected[i]}
    return _spill(f"latest-{part}", parts), identical


def _first_copies(rows: list[ObsRow], rejected: list[list[RejectionRow]]) -> tuple[list[ObsRow], int]:
    """`rows` as `rows.settle` rules them (as `Replay._dedupe`); the rejections that are no
    version go to `rejected`. Returns the rows and how many identical copies were dropped."""
    if len(rows) == 1:
        return rows, 0
    settled = settle(rows)
    n = len(rejected)
    for row in settled.reported:
        rejected[row.seq % n].append(
            RejectionRow(availability_key(row.ref, row.vu, row.vv, row.seq), row.data)
        )
    return [r for r in rows if r.seq in settled.keep] + settled.versions, settled.identical


# -- step 3: the core -------------------------------------------------------------------------------


class Judged(NamedTuple):
    """What one patient partition came to: its run, and the core's counts."""

    run: list[Segment]  # frames of output lines sorted by availability key
    panels: int
    stale_panels: int
    events: Counter[str]
    unassessed: Counter[str]


def judge(part: int, segments: list[Segment], clock_us: int | None = None) -> Judged:
    assert _job is not None
    items, context_rows = arrivals(_load(segments, decode_part))

    frames: list[Segment] = []
    path = os.path.join(_job.tmp, f"judge-{part}")
    stats = ReplayStats()
    how = Judging(
        _job.rules,
        _job.alert_settings,
        clock_us=clock_us,
        with_alerts=_job.with_alerts,
        provenance=_job.provenance,
    )
    with open(path, "wb") as fh:
        frame: list[_RunLine] = []
        size = 0
        facts = patient_facts(context_rows, _job.rules)
        del context_rows
        for n, (key, record, resources) in enumerate(decide(stream(items), facts, how, stats)):
            line = to_json(record) + b"\n"
            alert_lines = (
                b"".join(orjson.dumps(r) + b"\n" for r in resources) if resources is not None else b""
            )
            frame.append(_RunLine(key, n, record.event, line, alert_lines))
            size += len(line) + len(alert_lines)
            if size >= _RUN_FRAME_BYTES:
                frames.append(_frame(fh, frame))
                frame, size = [], 0
        if frame:
            frames.append(_frame(fh, frame))
    return Judged(frames, stats.panels, stats.stale_panels, stats.events, stats.unassessed)


def _frame(fh: IO[bytes], lines: list[_RunLine]) -> Segment:
    blob = _encode(lines)
    offset = fh.tell()
    fh.write(blob)
    return Segment(fh.name, offset, len(blob))


_decode_frame = msgspec.msgpack.Decoder(list[_RunLine]).decode


def _frames(segments: list[Segment]) -> Iterator[_RunLine]:
    for frame in _load(segments, _decode_frame):
        yield from frame
