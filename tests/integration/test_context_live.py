"""Patient context and recipients in the live loop, against the real engine: age from
Patient.birthDate, an individual threshold from an active Condition 234423001, and the recipient
chosen from the order, the care team, or the configured pool."""

from __future__ import annotations

from tests.builders import observation
from tests.fhir_server.load import export, put_all
from tests.integration.live import compare_with_oracle, cycle, settings_for

WHEN = "2026-05-10T08:00:00Z"


def cbc(pid: str, anc_k: float, **kw):
    common = dict(patient=f"Patient/{pid}", effective=WHEN, specimen=f"Specimen/{pid}", **kw)
    return [
        observation("6690-2", 3.0, id=f"{pid}-wbc", **common),
        observation("751-8", anc_k, id=f"{pid}-anc", **common),
    ]


def patient(pid: str, birth: str):
    return {"resourceType": "Patient", "id": pid, "birthDate": birth}


async def test_age_thresholds_and_recipients(fhir_base_url, tmp_path):
    resources = [
        patient("adult", "1970-01-01"),
        patient("infant", "2026-01-15"),
        patient("neonate", "2026-05-07"),
        patient("benign", "1980-06-01"),
        patient("team", "1960-01-01"),
        {
            "resourceType": "Condition",
            "id": "cbn",
            "subject": {"reference": "Patient/benign"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "234423001"}]},
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                ]
            },
        },
        {
            "resourceType": "ServiceRequest",
            "id": "order1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/adult"},
            "requester": {"reference": "Practitioner/dr-house"},
        },
        {
            "resourceType": "CareTeam",
            "id": "ct1",
            "status": "active",
            "subject": {"reference": "Patient/team"},
            "participant": [
                {"member": {"reference": "Practitioner/nurse-a"}},
                {"member": {"reference": "Patient/team"}},
            ],
        },
        *cbc("adult", 1.2, basedOn=[{"reference": "ServiceRequest/order1"}]),  # mild, ordering clinician
        *cbc("infant", 1.2),
        *cbc("neonate", 0.3),
        *cbc("benign", 1.2),
        *cbc("team", 0.8),
    ]
    put_all(fhir_base_url, resources)
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    report, decisions = await cycle(settings, with_decisions=True)
    by_patient = {d["patient"]: d for d in decisions}
    assert set(report.events) == {"new"} and report.events["new"] == 2
    assert by_patient["Patient/adult"]["event"] == "new"
    assert by_patient["Patient/adult"]["recipient_rule"] == "ordering clinician"
    assert by_patient["Patient/adult"]["recipients"] == ["Practitioner/dr-house"]
    assert by_patient["Patient/team"]["recipient_rule"] == "care team"
    assert by_patient["Patient/team"]["recipients"] == ["Practitioner/nurse-a"]
    assert "Patient/infant" not in by_patient  # 1200 is normal for an infant (< 1000 is neutropenic)
    assert "Patient/benign" not in by_patient  # individual threshold 1000 from Condition 234423001
    assert by_patient["Patient/neonate"]["event"] == "not-assessed"
    assert "first 7 days" in by_patient["Patient/neonate"]["reason"]
    comms = {c["subject"]["reference"]: c for c in export(fhir_base_url, "Communication")}
    assert comms["Patient/adult"]["recipient"] == [{"reference": "Practitioner/dr-house"}]
    assert comms["Patient/team"]["recipient"] == [{"reference": "Practitioner/nurse-a"}]
    compare_with_oracle(
        fhir_base_url, tmp_path / "oracle"
    )  # replay reads the same context from the same resources
