"""References between the entries of one Bundle by fullUrl ("urn:uuid:...", as Synthea writes
transaction Bundles) resolve within that Bundle (https://hl7.org/fhir/R4/bundle.html#references), in
replay and explain alike, whether the Bundle is read whole or entry by entry; outside a Bundle such a
reference still names nothing and is rejected."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.__main__ import main
from service.config import Settings
from service.explain import explain_inputs, render_text
from service.replay import documents
from service.replay.engine import Replay

PATIENT = "8f0e7a3c-5d4b-4e21-9c3a-1b2d3e4f5a6b"
WBC = "6690-2"  # reference §1.1
NEUT_PCT = "770-8"  # reference §1.1


def _entry(resource: dict[str, Any], uuid: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{uuid}",
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }


def _observation(uuid: str, code: str, value: float, unit: str) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": uuid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"urn:uuid:{PATIENT}"},
        "encounter": {"reference": "urn:uuid:0c9a8b7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d"},
        "effectiveDateTime": "2024-03-01T08:00:00+00:00",
        "issued": "2024-03-01T09:00:00.000+00:00",
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }
    return _entry(obs, uuid)


def synthea_bundle(*, patient_id: bool = True, padding: int = 0) -> dict[str, Any]:
    """A transaction Bundle shaped as Synthea writes one: the Patient and its results, each entry
    named by a urn:uuid fullUrl, the results' subject that fullUrl. `patient_id`: the Patient entry
    has an id (a create may have none); `padding`: unmonitored results added to make it large."""
    patient = {"resourceType": "Patient", "birthDate": "1961-05-04", "gender": "female"}
    if patient_id:
        patient["id"] = PATIENT
    # WBC 2.0 x10^3/uL x 20 % = ANC 400/uL: severe (reference §2, §3)
    entries = [
        _entry(patient, PATIENT),
        _observation("a1b2c3d4-0000-4000-8000-000000000001", WBC, 2.0, "10*3/uL"),
        _observation("a1b2c3d4-0000-4000-8000-000000000002", NEUT_PCT, 20.0, "%"),
    ]
    entries += [
        _observation(f"b1b2c3d4-0000-4000-8000-{n:012d}", "8867-4", 70.0, "/min") for n in range(padding)
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _events(path: Path, engine_name: str = "partitioned") -> list[dict[str, Any]]:
    events = io.BytesIO()
    settings = Settings()
    with Replay(settings.rules, settings.alerts, engine=engine_name, workers=1) as replay:
        replay.run([path], events)
    return [orjson.loads(line) for line in events.getvalue().splitlines()]


@pytest.mark.parametrize("engine_name", ["partitioned", "sqlite"])
@pytest.mark.parametrize("patient_id", [True, False])
def test_synthea_bundle_subject_resolves_to_its_patient(tmp_path, engine_name, patient_id):
    """The results' urn:uuid subject is the Bundle's Patient entry: one patient `Patient/<id>` (the
    uuid when the entry has no id), an alert on its panel, no "subject is not a Patient reference"."""
    path = tmp_path / "synthea.json"
    path.write_bytes(orjson.dumps(synthea_bundle(patient_id=patient_id), option=orjson.OPT_INDENT_2))
    events = _events(path, engine_name)
    assert [(e["patient"], e["event"], e["grade"], e["anc"]) for e in events] == [
        (f"Patient/{PATIENT}", "new", "severe", 400)
    ]


def test_large_bundle_read_entry_by_entry_resolves_alike(tmp_path, monkeypatch):
    """A Bundle large enough to be read entry by entry (never whole) resolves its urn:uuid references
    to the same events as the same Bundle read whole."""
    path = tmp_path / "synthea.json"
    path.write_bytes(orjson.dumps(synthea_bundle(padding=40), option=orjson.OPT_INDENT_2))
    whole = _events(path)
    monkeypatch.setattr(documents, "LARGE_DOCUMENT", 2048)
    assert isinstance(next(documents.file_documents(path)), documents.StreamedBundle)
    assert _events(path) == whole
    assert [e["patient"] for e in whole] == [f"Patient/{PATIENT}"]


def test_urn_uuid_subject_outside_a_bundle_is_still_rejected(tmp_path):
    """Alone on an NDJSON line, a urn:uuid subject names nothing the service can find: rejected with
    the reason, and counted as an unresolvable reference."""
    entry = synthea_bundle()["entry"][1]["resource"]
    path = tmp_path / "loose.ndjson"
    path.write_bytes(orjson.dumps(entry) + b"\n")
    settings = Settings()
    with Replay(settings.rules, settings.alerts, workers=1) as replay:
        events = io.BytesIO()
        stats = replay.run([path], events)
    (event,) = [orjson.loads(line) for line in events.getvalue().splitlines()]
    assert event["event"] == "rejected" and "urn:uuid:" in event["reason"]
    assert stats.not_decided() == {"unresolvable reference": 1}


def test_explain_follows_the_bundle_patient(tmp_path, capsys):
    """explain reads the Bundle as replay does: the patient's trail holds its panel and the alert."""
    path = tmp_path / "synthea.json"
    path.write_bytes(orjson.dumps(synthea_bundle()))
    text = render_text(explain_inputs([path], f"Patient/{PATIENT}", Settings()))
    assert "not a Patient reference" not in text
    assert "severe" in text and "400" in text
    assert main(["replay", str(path), "--events", str(tmp_path / "e.jsonl")]) == 0
