"""What a resource read is to neutrowatch (service/core/triage.py): one rule for replay's pass 1 and
the live loop's search pages."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from service.core.observations import Ignored, LabResult, Rejected
from service.core.panels import Report
from service.core.triage import PatientFact, ReportMembers, memberships, triage
from service.fhir import model
from service.live.worker import intake
from tests.builders import observation


def resource(doc: dict[str, Any]) -> model.Resource:
    return msgspec.convert(doc, model.Resource)


REPORT = {
    "resourceType": "DiagnosticReport",
    "id": "cbc",
    "status": "final",
    "subject": {"reference": "Patient/a"},
    "specimen": [{"reference": "Specimen/s9"}],
    "result": [
        {"reference": "Observation/wbc"},
        {"reference": "https://elsewhere.example/Observation/x"},
        {"reference": "Observation/neut/_history/2"},
    ],
}


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        # a monitored result (LOINC 751-8, reference §1.1): a lab result
        (resource(observation("751-8", 0.4, id="anc")), LabResult),
        # a unit no count converts from (reference §2): rejected, never an alert
        (resource(observation("751-8", 0.4, unit="furlongs", id="bad")), Rejected),
        # a code not monitored (LOINC 2345-7 glucose): ignored
        (resource(observation("2345-7", 5.0, unit="mmol/L", id="glu")), Ignored),
        # an entry that may be an Observation but cannot be read: rejected, with what could be read of it
        (model.Undecodable("not JSON", "Observation", "o1", "Patient/a"), Rejected),
        (model.Undecodable("not JSON", None, None, None), Rejected),
        (resource({"resourceType": "Patient", "id": "a"}), PatientFact),
        (resource({"resourceType": "CareTeam", "subject": {"reference": "Patient/a"}}), PatientFact),
        (resource(REPORT), ReportMembers),
    ],
)
def test_each_kind_of_resource_is_triaged_as_replay_and_the_live_loop_read_it(item, expected):
    """Observations by `normalise`, undecodable entries that may be Observations as rejections, the
    patient's context as facts, DiagnosticReports as panel membership."""
    assert isinstance(triage(item), expected)


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (model.Undecodable("not JSON", "Patient", "a", None), "undecodable Patient"),
        (model.Undecodable("not JSON", "<b>x</b>", None, None), "undecodable unknown type"),
        (
            resource(
                {"resourceType": "Condition", "subject": {"reference": "https://elsewhere.example/Patient/a"}}
            ),
            "Condition of a patient not on the server",
        ),
        (resource({"resourceType": "Medication", "id": "m"}), "Medication not used"),
        (resource({"resourceType": "Patient"}), "Patient not used"),
    ],
)
def test_what_is_not_used_is_ignored_with_a_reason_that_names_a_type_never_text(item, reason):
    """An ignored resource's reason (replay's summary counts it) names a type, or "unknown type"."""
    assert triage(item) == Ignored(reason)


def test_a_report_names_its_results_and_its_one_specimen():
    """Each local result of the report (versioned references read as the Observation), with the
    report and its one specimen (specimen, else DiagnosticReport: reference §1.2)."""
    triaged = triage(resource(REPORT))
    assert isinstance(triaged, ReportMembers)
    report = Report("DiagnosticReport/cbc", "Specimen/s9")
    assert triaged.members == (("Observation/wbc", report), ("Observation/neut", report))


def test_the_first_report_naming_a_result_is_its_report_and_the_live_intake_keys_its_panel_by_it():
    """Replay keeps the first report that names a result; the live loop's page does the same, and a
    result without a specimen of its own takes the report's key as its panel."""
    second = {**REPORT, "id": "later", "specimen": [], "result": [{"reference": "Observation/wbc"}]}
    wbc = observation("6690-2", 2.0, id="wbc", patient="Patient/a", specimen=None)
    page = [resource(wbc), resource(REPORT), resource(second)]
    reports = memberships(page)
    assert reports["Observation/wbc"] == Report("DiagnosticReport/cbc", "Specimen/s9")
    taken = intake(page[0], reports=reports)
    assert taken.panel == "specimen:Specimen/s9"  # type: ignore[union-attr]  # intake of a decodable result
    alone = intake(page[0])
    assert alone.panel is not None and alone.panel.startswith("effective:")  # type: ignore[union-attr]  # intake of a decodable result
