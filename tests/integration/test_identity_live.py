"""Patient identity in the live loop, on the real engine: the three spellings of one patient
(relative, versioned, absolute under the server's base) are one patient with one Flag, and a subject
on another server is rejected without any look-up of the local patient of the same id; replay over
what the server holds predicts the same.

The worker reads through tests/hostile/middleman.py (no splices), whose request log shows what the
worker asked the server for. Sources: FHIR R4 references.html#literal; docs/ grades (ANC < 500/uL
severe, >= 1500/uL normal; a neonate in its first 7 days is out of scope)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service import metrics
from service.config import Settings
from tests.builders import observation
from tests.fhir_server.load import export, put_all
from tests.hostile.middleman import Middleman
from tests.integration.live import compare_with_oracle, cycle, settings_for

EVIL = "https://evil.example.com"
PARTNER = "https://partner.example.net/fhir"


def panel(subject: str, pid: str, n: int, anc_k: float, day: int) -> list[dict[str, Any]]:
    kw = dict(patient=subject, effective=f"2026-11-{day:02d}T08:00:00Z", specimen=f"Specimen/{pid}-{n}")
    return [
        observation("6690-2", 4.0, id=f"{pid}-{n}-wbc", **kw),
        observation("751-8", anc_k, id=f"{pid}-{n}-anc", **kw),
    ]


def rejections(reason: str) -> float:
    return sum(
        s.value
        for f in metrics.REGISTRY.collect()
        for s in f.samples
        if s.name == "neutrowatch_rejections_total" and s.labels.get("reason") == reason
    )


async def cycles(
    engine_url: str,
    tmp_path,
    stages: list[list[dict[str, Any]]],
    configure: Callable[[Settings], Settings] = lambda s: s,
) -> tuple[Middleman, list[Any], list[dict[str, Any]]]:
    """Each stage put on the server, then one worker cycle through the middleman."""
    middleman = Middleman(engine_url)
    await middleman.start()
    reports, decisions = [], []
    try:
        settings = configure(settings_for(middleman.base, tmp_path / "s.sqlite3"))
        for stage in stages:
            put_all(engine_url, stage)
            report, decisions = await cycle(settings, with_decisions=True)
            reports.append(report)
    finally:
        await middleman.stop()
    return middleman, reports, decisions


def context_requests(middleman: Middleman) -> list[str]:
    """What the worker read about patients besides their Observations: Patient reads, Condition,
    CareTeam and ServiceRequest look-ups (the directory's)."""
    return [
        r
        for r in middleman.requests
        if r.startswith("GET ")
        and r.split()[1].startswith(("/Patient", "/Condition", "/CareTeam", "/ServiceRequest"))
    ]


async def test_three_spellings_of_one_patient_are_one_flag(fhir_engine, tmp_path):
    """Severe as "Patient/h20", still severe as "Patient/h20/_history/1", recovered as
    "<base>/Patient/h20": one episode, one Flag (recovering after the normal panel). Before, three Flags, two
    of which stayed active."""
    fhir_engine.reset()
    base = fhir_engine.base_url
    put_all(base, [{"resourceType": "Patient", "id": "h20", "birthDate": "1960-01-01"}])
    middleman, reports, decisions = await cycles(
        base,
        tmp_path,
        [
            panel("Patient/h20", "h20", 0, 0.3, 1),
            panel("Patient/h20/_history/1", "h20", 1, 0.2, 2),
            # as stored on the engine; the worker reads it under the middleman's base, its fhir.base_url
            panel(f"{base}/Patient/h20", "h20", 2, 2.5, 3),
        ],
    )
    assert [r.events for r in reports] == [{"new": 1}, {}, {"recovering": 1}]
    assert {d["patient"] for d in decisions} == {"Patient/h20"}
    flags = export(base, "Flag")
    assert [(f["subject"]["reference"], f["status"]) for f in flags] == [("Patient/h20", "active")]
    assert {c["subject"]["reference"] for c in export(base, "Communication")} == {"Patient/h20"}
    assert compare_with_oracle(base, tmp_path / "oracle") == {
        "communications": 1,
        "flags": 1,
    }  # new; recovering updates the Flag only
    # the directory read the one patient, under its canonical id (the log is live: the other tests'
    # "nothing read" means something)
    assert {r.split("?")[0] for r in context_requests(middleman)} == {
        "GET /Patient/h20",
        "GET /Condition",
        "GET /CareTeam",
    }


async def test_a_foreign_subject_is_rejected_and_the_local_namesake_never_read(fhir_engine, tmp_path):
    """A severe ANC of https://evil.example.com/Patient/x: rejected ("subject is on another server"),
    counted, no Flag — and the local Patient/x (a neonate) is never read for it: before, the
    directory took the last path segments, read the local neonate and wrote "not assessed" for a
    severe ANC that replay called new and severe."""
    fhir_engine.reset()
    base = fhir_engine.base_url
    put_all(base, [{"resourceType": "Patient", "id": "x", "birthDate": "2026-11-01"}])
    before = rejections("subject is on another server")
    middleman, reports, decisions = await cycles(base, tmp_path, [panel(f"{EVIL}/Patient/x", "x", 0, 0.1, 2)])
    assert reports[0].events == {}
    assert [(d["event"], d["patient"], d["reason"]) for d in decisions] == [
        ("rejected", None, "subject is on another server")
    ] * 2
    assert rejections("subject is on another server") - before == 2
    assert context_requests(middleman) == []
    assert export(base, "Flag") == [] and export(base, "Communication") == []
    assert compare_with_oracle(base, tmp_path / "oracle") == {"communications": 0, "flags": 0}


async def test_an_accepted_foreign_base_is_an_identity_with_no_local_look_up(fhir_engine, tmp_path):
    """fhir.accepted_foreign_bases: the partner's Patient/x is a patient (its absolute reference the
    key, Flag.subject included) and its severe ANC alerts, graded by the scheme — the local Patient/x
    (a neonate) is never read, nor a Condition or CareTeam searched for it; the pool is told.
    Replay with the same setting predicts the same."""
    fhir_engine.reset()
    base = fhir_engine.base_url
    put_all(base, [{"resourceType": "Patient", "id": "x", "birthDate": "2026-11-01"}])

    def federated(s: Settings) -> Settings:
        return s.model_copy(update={"fhir": s.fhir.model_copy(update={"accepted_foreign_bases": (PARTNER,)})})

    middleman, reports, decisions = await cycles(
        base,
        tmp_path,
        [
            panel(f"{PARTNER}/Patient/x/_history/2", "x", 0, 0.1, 2),
            panel(f"{PARTNER}/Patient/x", "x", 1, 2.5, 3),
        ],
        federated,
    )
    assert [r.events for r in reports] == [{"new": 1}, {"recovering": 1}]
    assert {(d["patient"], d["threshold_rule"], d["recipient_rule"]) for d in decisions} == {
        (f"{PARTNER}/Patient/x", "scheme", "configured pool")
    }
    assert context_requests(middleman) == []
    assert [(f["subject"]["reference"], f["status"]) for f in export(base, "Flag")] == [
        (f"{PARTNER}/Patient/x", "active")
    ]
    compare_with_oracle(base, tmp_path / "oracle", accepted_foreign_bases=(PARTNER,))


async def test_facts_written_with_the_absolute_subject_are_the_patients(fhir_engine, tmp_path):
    """A Condition 234423001 (chronic benign neutropenia: individual threshold 1000/uL) and a CareTeam
    whose subject is "<base>/Patient/..." are that patient's facts, live as in replay: an ANC of
    1200/uL is no alert for the one, and the other's alert goes to its care team. Before, the
    directory searched the relative spelling only, which an engine indexing references as written
    does not match, while replay keys context rows by the canonical subject."""
    fhir_engine.reset()
    base = fhir_engine.base_url
    put_all(
        base,
        [
            {"resourceType": "Patient", "id": "b", "birthDate": "1970-01-01"},
            {"resourceType": "Patient", "id": "t", "birthDate": "1970-01-01"},
            {
                "resourceType": "Condition",
                "id": "cbn",
                "subject": {"reference": f"{base}/Patient/b"},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "234423001"}]},
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active",
                        }
                    ]
                },
            },
            {
                "resourceType": "CareTeam",
                "id": "ct",
                "status": "active",
                "subject": {"reference": f"{base}/Patient/t"},
                "participant": [{"member": {"reference": "Practitioner/nurse-a"}}],
            },
        ],
    )
    settings = settings_for(base, tmp_path / "s.sqlite3")
    put_all(base, panel("Patient/b", "b", 0, 1.2, 2) + panel("Patient/t", "t", 0, 0.8, 2))
    report, decisions = await cycle(settings, with_decisions=True)
    assert report.events == {"new": 1}
    assert [(d["patient"], d["recipient_rule"], d["recipients"]) for d in decisions] == [
        ("Patient/t", "care team", ["Practitioner/nurse-a"])
    ]
    compare_with_oracle(base, tmp_path / "oracle")
