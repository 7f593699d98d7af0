"""The partitioned replay engine (service.replay.parallel) writes the same bytes as the SQLite engine
it replaced, which stays as the reference: in one process and with worker processes, with input
split into many chunks and partitions, whatever the file order."""

from __future__ import annotations

import gzip
import io
import random
from pathlib import Path

import orjson
import pytest

from service.config import load_settings
from service.replay import parallel
from service.replay.engine import Replay, ReplayStats
from tests.builders import observation
from tests.synthetic import PopulationSpec, write_ndjson

ENGINES = {
    "partitioned, one process": {"engine": "partitioned", "workers": 1},
    "partitioned, two workers": {"engine": "partitioned", "workers": 2},
}


def run(paths: list[Path], *, alerts: bool = True, **options) -> tuple[bytes, bytes, tuple]:
    settings = load_settings(None)
    events_out, alerts_out = io.BytesIO(), io.BytesIO()
    with Replay(settings.rules, settings.alerts, **options) as replay:
        stats = replay.run([str(p) for p in paths], events_out, alerts_out if alerts else None)
    return events_out.getvalue(), alerts_out.getvalue(), _stats(stats)


def _stats(s: ReplayStats) -> tuple:
    # items(), not the Counters: their order is part of what the log shows
    return (
        s.documents,
        s.resources,
        s.observations,
        s.panels,
        s.stale_panels,
        list(s.events.items()),
        list(s.ignored.items()),
    )


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Many chunks and partitions even for a small input, so every boundary is exercised."""
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 50_000)
    monkeypatch.setattr(parallel, "PARTITION_BYTES", 300_000)


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("population") / "population.ndjson"
    write_ndjson(PopulationSpec(patients=60, seed=4), path)
    return path


@pytest.fixture(scope="module")
def shuffled(population: Path) -> Path:
    lines = population.read_bytes().splitlines(keepends=True)
    random.Random(4).shuffle(lines)
    path = population.with_name("shuffled.ndjson")
    path.write_bytes(b"".join(lines))
    return path


def _cbc(patient: str, ids: str, day: int, anc: float, **kw) -> list[dict]:
    eff = f"2026-03-{day:02d}T08:00:00Z"
    kw.setdefault("updated", f"2026-03-{day:02d}T10:00:00.000Z")
    return [
        observation("6690-2", 4.0, id=f"{ids}-wbc", patient=patient, effective=eff, **kw),
        observation("751-8", anc, id=f"{ids}-anc", patient=patient, effective=eff, **kw),
    ]


def _edge_cases(tmp_path: Path) -> Path:
    """Everything the order of availability and the latest-version rule have to get right."""
    res: list[dict] = []
    # Two versions with the same lastUpdated: versionId 10 beats 9 (numerically).
    for version, anc in (("10", 0.3), ("9", 3.0)):
        res += _cbc("Patient/e1", "dup", 2, anc, version=version, specimen="Specimen/dup")
    # Rejected versions are all reported; with one lastUpdated, by versionId compared as text ("10" < "9").
    for version, unit in (("9", "bananas/uL"), ("10", "apples/uL")):
        res.append(
            observation(
                "751-8",
                0.3,
                unit,
                id="dup-rejected",
                patient="Patient/e1",
                version=version,
                effective="2026-03-02T08:00:00Z",
                updated="2026-03-02T10:00:00.000Z",
            )
        )
    # The newest version names another patient: the Observation leaves the first patient's panel.
    res += _cbc("Patient/e2", "moved", 3, 0.4, specimen="Specimen/moved")
    res.append(
        observation(
            "751-8",
            0.2,
            id="moved-anc",
            patient="Patient/e3",
            effective="2026-03-03T08:00:00Z",
            updated="2026-03-04T10:00:00.000Z",
            version="2",
            specimen="Specimen/moved",
        )
    )
    # A rejected newest version supersedes a usable one.
    res += _cbc("Patient/e4", "rej", 4, 0.3, specimen="Specimen/rej")
    res.append(
        observation(
            "751-8",
            0.3,
            "bananas/uL",
            id="rej-anc",
            patient="Patient/e4",
            version="2",
            effective="2026-03-04T08:00:00Z",
            updated="2026-03-05T10:00:00.000Z",
        )
    )
    # Panels by DiagnosticReport: the first report naming a result wins; one names another patient's result.
    res += _cbc("Patient/e5", "dr", 5, 0.8, specimen=None)
    for n, specimen in ((1, "Specimen/dr-a"), (2, None), (3, "Specimen/dr-b")):
        res.append(
            {
                "resourceType": "DiagnosticReport",
                "id": f"dr{n}",
                "status": "final",
                "subject": {"reference": "Patient/e5" if n < 3 else "Patient/e6"},
                **({"specimen": [{"reference": specimen}]} if specimen else {}),
                "result": [
                    {"reference": "Observation/dr-wbc"},
                    {"reference": "https://x/fhir/Observation/dr-anc/_history/1"},
                ],
            }
        )
    res.append(
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "result": [{"reference": "Observation/dr-anc"}],
        }
    )
    # No lastUpdated (after everything else, in input order), lastUpdated before 1970 and at 0.
    res += _cbc("Patient/e7", "late-a", 7, 0.9, updated=None)
    res += _cbc("Patient/e7", "late-b", 6, 0.4, updated=None)
    res += _cbc("Patient/e8", "old", 8, 0.4, updated="1969-12-31T23:59:59.000Z")
    res += _cbc("Patient/e8", "epoch", 9, 0.3, updated="1970-01-01T00:00:00.000Z")
    # Ties on lastUpdated broken by reference: ids with control and non-ASCII characters.
    for i, ident in enumerate(("a\x1fb", "a", "a\x1f1\x1f!", "ø", "A", "a\x01")):
        res += _cbc(f"Patient/t{i}", ident, 10, 0.2 + i / 10, updated="2026-03-10T10:00:00.000Z")
    # Panels by collection instant only (no specimen, no report), temperatures alongside.
    res += _cbc("Patient/e9", "instant", 11, 0.45, specimen=None)
    res.append(
        observation(
            "8310-5",
            38.9,
            "Cel",
            id="fever",
            patient="Patient/e9",
            effective="2026-03-11T08:00:00Z",
            updated="2026-03-11T09:00:00.000Z",
            specimen=None,
            ucum_code="Cel",
        )
    )
    # Copies of one version that conflict (a severe version 1 and two contents of version 2, one read
    # twice), and copies without meta: of an Observation read with it (no version of it), alone
    # (a version), and two that conflict.
    res += _cbc("Patient/e11", "copies", 13, 0.3, specimen="Specimen/copies")
    for anc in (0.2, 2.5, 2.5):
        res.append(
            observation(
                "751-8",
                anc,
                id="copies-anc",
                patient="Patient/e11",
                effective="2026-03-13T08:00:00Z",
                updated="2026-03-14T10:00:00.000Z",
                version="2",
                specimen="Specimen/copies",
            )
        )
    for ids, anc in (("copies-anc", 0.1), ("bare", 0.4), ("bare-twice", 0.3), ("bare-twice", 2.0)):
        bare = observation(
            "751-8", anc, id=ids, patient="Patient/e12", effective="2026-03-15T08:00:00Z", specimen=None
        )
        del bare["meta"]
        res.append(bare)
    lines = [orjson.dumps(r) for r in res]
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in _cbc("Patient/e10", "bundled", 12, 0.6)]
        + [{"resource": {"resourceType": "Observation", "status": 5}}],
    }
    lines += [
        orjson.dumps(bundle),
        b"",
        b"   ",
        b'{"resourceType":"Observation","id":"trunc',
        b"[1, 2]",
        b'{"resourceType":"Observation","id":"bad-status","status":5,"subject":{"reference":"Patient/e1"}}',
        b'{"resourceType":"Patient","id":"e1"}\r',
        b"not json at all",
    ]
    path = tmp_path / "edges.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _assert_same(paths: list[Path], *, alerts: bool = True) -> bytes:
    reference = run(paths, engine="sqlite", alerts=alerts)
    for name, options in ENGINES.items():
        got = run(paths, alerts=alerts, **options)
        assert got[0] == reference[0], f"{name}: events differ"
        assert got[1] == reference[1], f"{name}: alerts differ"
        assert got[2] == reference[2], f"{name}: stats differ"
    return reference[0]


def test_population(population):
    events = _assert_same([population])
    assert events.count(b"\n") > 50  # enough happens for the comparison to mean something


def test_population_in_shuffled_order(population, shuffled):
    assert _assert_same([shuffled]) == _assert_same([population])


def test_without_alerts(population):
    _assert_same([population], alerts=False)


def test_edge_cases(tmp_path):
    path = _edge_cases(tmp_path)
    events = _assert_same([path])
    assert b'"rejected"' in events and b'"new"' in events
    lines = path.read_bytes().splitlines(keepends=True)
    for seed in range(3):
        random.Random(seed).shuffle(lines)
        shuffled = tmp_path / f"edges-{seed}.ndjson"
        shuffled.write_bytes(b"".join(lines))
        _assert_same([shuffled])


def test_many_files_gzip_and_pretty_printed(tmp_path, population):
    lines = population.read_bytes().splitlines(keepends=True)
    third = len(lines) // 3
    a = tmp_path / "a.ndjson"
    a.write_bytes(b"".join(lines[:third]))
    b = tmp_path / "b.ndjson.gz"
    b.write_bytes(gzip.compress(b"".join(lines[third : 2 * third])))
    c = tmp_path / "c.json"
    entries = [{"resource": orjson.loads(line)} for line in lines[2 * third :]]
    c.write_bytes(
        orjson.dumps(
            {"resourceType": "Bundle", "type": "collection", "entry": entries}, option=orjson.OPT_INDENT_2
        )
    )
    _assert_same([a, b, c])
    _assert_same([c, a, b])
