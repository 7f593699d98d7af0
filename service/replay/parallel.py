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
   availability and run the core (`Replay.decide`, the code the SQLite engine runs). A patient's
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
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec
import orjson

from service.core.arrival import availability_key, newest_order, panel_key
from service.replay.documents import (
    BLOCK,
    READ_ERRORS,
    StreamedBundle,
    file_documents,
    files,
    first_line,
    line_documents,
    unreadable,
)
from service.replay.rows import (
    IDENTICAL_COPY,
    Available,
    ObsRow,
    PanelVersion,
    ReplayStats,
    Rows,
    decode_rejected,
    decode_result,
    patient_facts,
    read_document,
    settle,
)

if TYPE_CHECKING:
    from service.replay.engine import Replay

CHUNK_BYTES = 8 << 20  # step 1 reads the input in byte ranges of about this size ...
PARTITION_BYTES = 16 << 20  # ... and makes one partition per this much input (about 16k Observations)
MAX_PARTITIONS = MAX_CHUNKS = 256  # beyond 2-4 GB of input, chunks and partitions grow instead
PARALLEL_MIN_BYTES = 16 << 20  # below this much input, worker processes cost more than they save
_RUN_FRAME_BYTES = 64 << 10  # step 3 writes its run in frames of about this size

Segment = tuple[str, int, int]  # (file, offset, length) of one msgpack value
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


@dataclass(frozen=True)
class Chunk:
    number: int  # position in the input: resources are numbered (number << 32) + 1, + 2, ...
    path: str
    start: (
        int | None
    )  # byte range [start, end) of whole lines; None: the whole file, as `file_documents` reads it
    end: int | None


@dataclass(frozen=True)
class _Job:
    """What every task needs; set once per worker process."""

    tmp: str
    partitions: int
    rules: Any
    alert_settings: Any
    with_alerts: bool
    core: type[Replay]  # what judges a partition (`Replay.decide`), of the caller's engine module
    provenance: bool = False
    read_policy: Any = None
    clock_us: int | None = None  # the reading clock when the caller fixed it (Replay.clock_us)


# The job of this process: set by the pool's initializer (`_start`), once per worker process, and
# around an in-process run. A module global because ProcessPoolExecutor hands a task only what
# `map` pickles for it: passing the job with every task would pickle the rules and the alert
# settings once per chunk and partition, where the initializer gives each worker process its copy
# once. Nothing else writes it; each process runs one job at a time.
_job: _Job | None = None


def _start(job: _Job | None) -> None:
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
    replay: Replay,
    inputs: Sequence[str | Path],
    events: IO[bytes],
    alerts: IO[bytes] | None,
    workers: int | None,
) -> ReplayStats:
    paths = files(inputs)
    size = sum(_size(path) for path in paths)
    if workers is None:
        workers = default_workers() if size >= PARALLEL_MIN_BYTES else 1
    # Bounded counts keep the index (chunks x partitions segments) and the number of files small.
    partitions = min(MAX_PARTITIONS, max(1, math.ceil(size / PARTITION_BYTES)))
    job = _Job(
        replay._tmp.name,
        partitions,
        replay.rules,
        replay.alert_settings,
        alerts is not None,
        type(replay),
        replay.provenance,
        replay.read_policy,
        replay.clock_us,
    )
    chunks = plan(paths, max(CHUNK_BYTES, math.ceil(size / MAX_CHUNKS)))
    with _collector_tuned():
        if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            try:
                _start(job)
                return _run(replay.stats, _reporting(map, replay.progress), job, chunks, events, alerts)
            finally:
                _start(None)
        # fork: the workers share the parent's imports and its `hash` seed (module docstring).
        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_start, initargs=(job,)
        )
        try:
            return _run(replay.stats, _reporting(pool.map, replay.progress), job, chunks, events, alerts)
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
    job: _Job,
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
    for run_segments, panels, stale, counts, unassessed in map_(judge, range(n), by_patient, [clock] * n):
        runs.append(run_segments)
        stats.panels += panels
        stats.stale_panels += stale
        stats.unassessed.update(unassessed)
        counted.update(counts)
    _remove({path for segments in by_patient for path, _, _ in segments})
    kinds: Counter[str] = Counter()
    for _key, _n, kind, line, alert_lines in heapq.merge(*map(_frames, runs)):
        events.write(line)
        if alerts is not None and alert_lines:
            alerts.write(alert_lines)
        kinds[kind] += 1
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


def _size(path: Path) -> int:
    size = path.stat().st_size
    return size * 8 if path.suffix == ".gz" else size  # a rough guess at the uncompressed size


def plan(paths: Iterable[Path], chunk_bytes: int) -> list[Chunk]:
    """Byte ranges of whole lines for NDJSON files; one whole-file chunk for anything else (gzip, a
    pretty-printed document), which `file_documents` then reads as the SQLite engine does. Lines are
    found by reading at most a block of them at a time: a long line is never held whole here."""
    chunks: list[Chunk] = []
    for path in paths:
        if path.suffix == ".gz":
            chunks.append(Chunk(len(chunks), str(path), None, None))
            continue
        try:
            with open(path, "rb") as fh:
                if (
                    first_line(fh).document is not False
                ):  # a document, or a long line only `file_documents` can tell
                    chunks.append(Chunk(len(chunks), str(path), None, None))
                    continue
                size = fh.seek(0, os.SEEK_END)
                start = 0
                while start < size:
                    fh.seek(min(start + chunk_bytes, size) - 1)
                    while (part := fh.readline(BLOCK)) and not part.endswith(b"\n"):
                        pass  # to the end of the line that holds the byte before the target
                    end = fh.tell()
                    chunks.append(Chunk(len(chunks), str(path), start, end))
                    start = end
        except READ_ERRORS as err:
            raise unreadable(path, err) from None
    return chunks


def _lines(chunk: Chunk) -> Iterator[bytes | StreamedBundle]:
    assert chunk.start is not None and chunk.end is not None
    try:
        with open(chunk.path, "rb") as fh:
            fh.seek(chunk.start)
            yield from line_documents(Path(chunk.path), fh, chunk.start, chunk.end)
    except READ_ERRORS as err:
        raise unreadable(chunk.path, err) from None


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
            index[part] = (path, offset, len(blob))
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

    documents = file_documents(Path(chunk.path)) if chunk.start is None else _lines(chunk)
    for document in documents:
        seq = read_document(document, seq, stats, rows, spill, SPILL_ROWS, _job.read_policy)
    spill(rows)
    return stats, by_ref, by_patient


def _partitioned(rows: Rows, n: int) -> tuple[dict[int, Any], dict[int, Any]]:
    obs: list[list[Any]] = [[] for _ in range(n)]
    members: list[list[Any]] = [[] for _ in range(n)]
    for row in rows.obs:
        obs[hash(row.ref) % n].append(row)
    for member in rows.member:
        members[hash(member.ref) % n].append(member)
    rejected: list[list[Any]] = [[] for _ in range(n)]
    for ref, vu, vv, number, data in rows.rejected:  # rejections need no more than sorting: any partition
        rejected[number % n].append((availability_key(ref, vu, vv, number), data))
    context: list[list[Any]] = [[] for _ in range(n)]
    for (
        context_row
    ) in rows.context:  # Patient, Condition, ServiceRequest, CareTeam go where their patient's panels go
        context[hash(context_row.patient) % n].append(context_row)
    by_ref = {i: (obs[i], members[i]) for i in range(n) if obs[i] or members[i]}
    by_patient = {i: ((), rejected[i], context[i]) for i in range(n) if rejected[i] or context[i]}
    return by_ref, by_patient


# -- step 2: latest version, panel key ----------------------------------------------------------


_decode_versions = msgspec.msgpack.Decoder(tuple[list[ObsRow], list[tuple[str, str]]]).decode


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
    results: list[list[Any]] = [[] for _ in range(n)]
    rejected: list[list[Any]] = [[] for _ in range(n)]
    identical = 0
    for ref, rows in versions.items():
        rows, dropped = _first_copies(rows, rejected)
        identical += dropped
        for r in rows:
            if r.rej is not None:
                rejected[r.seq % n].append((availability_key(ref, r.vu, r.vv, r.seq), r.rej))
        usable = [r for r in rows if r.data is not None]
        if not usable:
            continue
        newest = max(usable, key=lambda r: newest_order(r.vu, r.vv, r.seq))
        assert newest.fkey is not None  # (a usable version has a collection instant)
        panel = panel_key(newest.pkey, reports.get(ref), newest.fkey)
        target = results[hash(newest.patient) % n]
        for row in rows:
            if row.data is None and row.vu < 0 and row.vv < 0:
                continue  # unplaced (an undecodable entry): reported above, no version (as engine._PANELS)
            target.append(
                (newest.patient, panel, availability_key(ref, row.vu, row.vv, row.seq), row.data, ref)
            )
    parts = {i: (results[i], rejected[i], ()) for i in range(n) if results[i] or rejected[i]}
    return _spill(f"latest-{part}", parts), identical


def _first_copies(rows: list[ObsRow], rejected: list[list[Any]]) -> tuple[list[ObsRow], int]:
    """`rows` as `rows.settle` rules them (as `Replay._dedupe`); the rejections that are no
    version go to `rejected`. Returns the rows and how many identical copies were dropped."""
    if len(rows) == 1:
        return rows, 0
    settled = settle(rows)
    n = len(rejected)
    for row in settled.reported:
        rejected[row.seq % n].append((availability_key(row.ref, row.vu, row.vv, row.seq), row.data))
    return [r for r in rows if r.seq in settled.keep] + settled.versions, settled.identical


# -- step 3: the core -------------------------------------------------------------------------------


def judge(
    part: int, segments: list[Segment], clock_us: int | None = None
) -> tuple[list[Segment], int, int, Counter[str], Counter[str]]:
    assert _job is not None
    results: list[
        tuple[str, str, str, bytes | None, str]
    ] = []  # patient, panel key, availability key, LabResult, ref
    rejections: list[tuple[str, bytes]] = []  # availability key, Rejected
    context_rows: list[tuple[str, str, bytes]] = []  # patient, resourceType, Resource
    for result_rows, rejected_rows, patient_rows in _load(segments):
        results += result_rows
        rejections += rejected_rows
        context_rows += patient_rows
    results.sort(key=itemgetter(2))
    # A panel is available when its first version is: dicts keep insertion order, and each panel's
    # versions come in order of availability.
    panels: dict[tuple[str, str], tuple[str, list[tuple[str, str, bytes | None]]]] = {}
    for patient, panel, key, data, ref in results:
        seen = panels.get((patient, panel))
        if seen is None:
            panels[(patient, panel)] = (key, [(key, ref, data)])
        else:
            seen[1].append((key, ref, data))
    del results
    items: list[tuple[str, str, str, Any]] = [
        (first, patient, panel, versions) for (patient, panel), (first, versions) in panels.items()
    ]
    del panels
    items += [(key, "", "", data) for key, data in rejections]
    items.sort(key=itemgetter(0))  # all keys differ

    def stream() -> Iterator[Available]:
        """What `Replay.decide` reads, decoded as it goes."""
        for key, patient, panel, payload in items:
            if isinstance(payload, list):
                yield Available(
                    key,
                    patient,
                    panel,
                    [
                        PanelVersion(k, ref, decode_result(d) if d is not None else None)
                        for k, ref, d in payload
                    ],
                )
            else:
                yield Available(key, patient, panel, decode_rejected(payload))

    frames: list[Segment] = []
    path = os.path.join(_job.tmp, f"judge-{part}")
    with (
        open(path, "wb") as fh,
        _job.core(
            _job.rules,
            _job.alert_settings,
            workdir=_job.tmp,
            engine="partitioned",
            provenance=_job.provenance,
        ) as core,
    ):
        frame: list[tuple[str, int, str, bytes, bytes]] = []
        size = 0
        core.clock_us = clock_us
        facts = patient_facts(context_rows, _job.rules)
        del context_rows
        decisions = core.decide(with_alerts=_job.with_alerts, stream=stream(), facts=facts)
        for n, (key, record, resources) in enumerate(decisions):
            line = orjson.dumps(record) + b"\n"
            alert_lines = (
                b"".join(orjson.dumps(r) + b"\n" for r in resources) if resources is not None else b""
            )
            frame.append((key, n, record["event"], line, alert_lines))
            size += len(line) + len(alert_lines)
            if size >= _RUN_FRAME_BYTES:
                frames.append(_frame(fh, frame))
                frame, size = [], 0
        if frame:
            frames.append(_frame(fh, frame))
        stats = core.stats
    return frames, stats.panels, stats.stale_panels, stats.events, stats.unassessed


def _frame(fh: IO[bytes], entries: list[Any]) -> Segment:
    blob = _encode(entries)
    offset = fh.tell()
    fh.write(blob)
    return (fh.name, offset, len(blob))


def _frames(segments: list[Segment]) -> Iterator[list[Any]]:
    for frame in _load(segments):
        yield from frame
