"""Patient identity in replay: one patient written three ways (relative, versioned, absolute under
fhir.base_url) is one patient — one episode, one Flag that learns of the recovery — and a subject on
another server is a rejection, never an alert, and never takes the facts of the local patient of the
same id. Both engines (partitioned and the SQLite reference) give the same.

Sources: FHIR R4 references.html#literal (a relative reference is relative to the service base URL;
"/_history/<version>" names a version of the same resource); the alerting rules of docs/ (grades:
ANC < 500/uL severe, >= 1500/uL normal)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.config import load_settings
from service.replay.engine import Replay
from tests.builders import observation

BASE = "https://fhir.example.org/fhir/R4"
SPELLINGS = ("Patient/h20", "Patient/h20/_history/1", f"{BASE}/Patient/h20")
# One normal panel closes the episode (the former rule, set explicitly): identity, not resolution, is
# under test here (resolution: tests/unit/test_resolution.py).
ONE_NORMAL_RESOLVES = (
    "clinical:\n  resolution: {confirmations: 1, min_hours: 0, reopen_days: 0, memory_days: 0}\n"
)
ENGINES = ({"engine": "sqlite"}, {"engine": "partitioned", "workers": 1})


def panel(
    subject: str, n: int, anc_k: float, *, day: int | None = None, pid: str = "h20"
) -> list[dict[str, Any]]:
    """WBC + ANC of one specimen, collected on day `day` (default: n + 1) of March 2026."""
    day = day or n + 1
    kw = dict(
        patient=subject,
        effective=f"2026-03-{day:02d}T08:00:00Z",
        updated=f"2026-03-{day:02d}T10:00:00.000Z",
        specimen=f"Specimen/{pid}-{n}",
    )
    return [
        observation("6690-2", 4.0, id=f"{pid}-{n}-wbc", **kw),
        observation("751-8", anc_k, id=f"{pid}-{n}-anc", **kw),
    ]


def three_spellings() -> list[dict[str, Any]]:
    """Severe, still severe, recovered: the same patient, a different spelling each time."""
    return [*panel(SPELLINGS[0], 0, 0.3), *panel(SPELLINGS[1], 1, 0.2), *panel(SPELLINGS[2], 2, 2.5)]


def run(
    tmp_path: Path, resources: list[dict[str, Any]], config: str, **engine: Any
) -> tuple[list[dict], list[dict]]:
    data = tmp_path / "in.ndjson"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    (tmp_path / "c.yaml").write_text(config)
    settings = load_settings(tmp_path / "c.yaml")
    events, alerts = io.BytesIO(), io.BytesIO()
    with Replay(settings.rules, settings.alerts, read_policy=settings.read_policy, **engine) as replay:
        replay.run([str(data)], events, alerts)
    read = lambda b: [orjson.loads(x) for x in b.getvalue().splitlines()]  # noqa: E731 - a local one-liner
    return read(events), read(alerts)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e["engine"])
def test_three_spellings_of_one_patient_are_one_episode_and_one_flag(tmp_path, engine):
    """Before: three patients, three episodes and three Flags, two of them active after recovery."""
    events, alerts = run(
        tmp_path, three_spellings(), f"fhir:\n  base_url: {BASE}\n" + ONE_NORMAL_RESOLVES, **engine
    )
    assert [(e["patient"], e["event"]) for e in events] == [
        ("Patient/h20", "new"),
        ("Patient/h20", "resolved"),
    ]
    flags = [a for a in alerts if a["resourceType"] == "Flag"]
    assert {f["identifier"][0]["value"] for f in flags} == {flags[0]["identifier"][0]["value"]}  # one episode
    assert {f["subject"]["reference"] for f in alerts} == {"Patient/h20"}  # Flag and Communication subjects
    assert flags[-1]["status"] == "inactive"


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e["engine"])
def test_without_a_base_an_absolute_subject_is_on_another_server(tmp_path, engine):
    """Replay has no server of its own: without fhir.base_url, an absolute subject is foreign."""
    events, _ = run(tmp_path, three_spellings(), "{}\n", **engine)
    rejected = [e for e in events if e["event"] == "rejected"]
    assert {(e["reason"], e["patient"]) for e in rejected} == {("subject is on another server", None)}
    assert sorted(o for e in rejected for o in e["observations"]) == [
        "Observation/h20-2-anc",
        "Observation/h20-2-wbc",
    ]


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e["engine"])
def test_a_foreign_subject_is_rejected_and_never_takes_the_local_namesakes_facts(tmp_path, engine):
    """A severe ANC of https://evil.example.com/Patient/x: two rejections, no alert — and the local
    Patient/x (a neonate, whose ANC is not assessed) and its Condition are not its facts. The local
    Patient/x's own severe panel is judged with them (not assessed: a neonate)."""
    resources = [
        {"resourceType": "Patient", "id": "x", "birthDate": "2026-03-01"},
        {
            "resourceType": "Condition",
            "id": "c-evil",
            "subject": {"reference": "https://evil.example.com/Patient/x"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "234423001"}]},
            "clinicalStatus": {"coding": [{"code": "active"}]},
        },
        *panel("https://evil.example.com/Patient/x", 0, 0.1, day=2, pid="x"),
        *panel("Patient/x", 1, 0.1, day=3, pid="x"),
    ]
    events, alerts = run(tmp_path, resources, f"fhir:\n  base_url: {BASE}\n" + ONE_NORMAL_RESOLVES, **engine)
    assert alerts == []
    assert [(e["event"], e["patient"], e.get("reason")) for e in events] == [
        ("rejected", None, "subject is on another server"),
        ("rejected", None, "subject is on another server"),
        ("not-assessed", "Patient/x", "neonate in the first 7 days of life: out of scope, not assessed"),
    ]


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e["engine"])
def test_an_accepted_foreign_base_keeps_the_absolute_identity_and_no_local_facts(tmp_path, engine):
    """fhir.accepted_foreign_bases: the absolute reference is the patient (its spellings one key);
    the local Patient/x (a neonate) is not it, so its severe ANC alerts, graded by the scheme."""
    partner = "https://partner.example.net/fhir"
    resources = [
        {"resourceType": "Patient", "id": "x", "birthDate": "2026-03-01"},
        *panel(f"{partner}/Patient/x", 0, 0.1, day=2, pid="x"),
        *panel(f"{partner}/Patient/x/_history/4", 1, 2.5, day=3, pid="x"),
    ]
    events, alerts = run(
        tmp_path,
        resources,
        f"fhir:\n  base_url: {BASE}\n  accepted_foreign_bases: [{partner}/]\n" + ONE_NORMAL_RESOLVES,
        **engine,
    )
    assert [(e["patient"], e["event"], e["threshold_rule"]) for e in events] == [
        (f"{partner}/Patient/x", "new", "scheme"),
        (f"{partner}/Patient/x", "resolved", "scheme"),
    ]
    assert {a["subject"]["reference"] for a in alerts} == {f"{partner}/Patient/x"}


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e["engine"])
def test_context_rows_are_keyed_by_the_canonical_subject(tmp_path, engine):
    """A Condition whose subject is versioned or absolute under the base is the patient's fact:
    chronic benign neutropenia (SNOMED CT 234423001) gives the individual threshold 1000/uL, so an
    ANC of 1200/uL is no alert for it."""
    resources = [
        {"resourceType": "Patient", "id": "b", "birthDate": "1970-01-01"},
        {
            "resourceType": "Condition",
            "id": "c1",
            "subject": {"reference": f"{BASE}/Patient/b/_history/3"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "234423001"}]},
            "clinicalStatus": {"coding": [{"code": "active"}]},
        },
        *panel("Patient/b", 0, 1.2, pid="b"),
    ]
    events, alerts = run(tmp_path, resources, f"fhir:\n  base_url: {BASE}\n" + ONE_NORMAL_RESOLVES, **engine)
    assert events == [] and alerts == []
