"""Panel-level rules: isolated neutropenia vs pancytopenia (issue 4 defaults Hb < 10 g/dL, platelets
< 100 x 10^3/uL; one operational definition, Danish KIP value set "Cytopeni": Hb < 6.2 mmol/L
(about 10 g/dL), platelets < 100 x 10^9/L — reference §3), and the revision reasons."""

import pytest

from service.clinical.episodes import PatientState
from service.clinical.panels import cytopenia, decide
from service.clinical.rules import Rules
from tests.builders import observation, result


def panel(*rows):
    return [result(observation(code, value, unit, id=f"x{i}", **(rest[0] if rest else {}))) for i, (code, value, unit, *rest) in enumerate(rows)]


CBC = [("6690-2", 2.0, "10*3/uL"), ("751-8", 0.4, "10*3/uL")]


@pytest.mark.parametrize(
    ("extra", "label"),
    [
        ([("718-7", 8.1, "g/dL"), ("777-3", 42, "10*3/uL")], "pancytopenia"),
        ([("718-7", 13.5, "g/dL"), ("777-3", 250, "10*3/uL")], "isolated"),
        ([("718-7", 9.9, "g/dL"), ("777-3", 100, "10*3/uL")], "with anaemia"),  # 100 is not below 100
        ([("718-7", 10.0, "g/dL"), ("777-3", 99, "10*3/uL")], "with thrombocytopenia"),  # 10.0 is not below 10
        ([("718-7", 81, "g/L"), ("777-3", 42000, "/uL")], "pancytopenia"),  # other units, same values
        ([("718-7", 5.0, "mmol/L"), ("26515-7", 80, "10*9/L")], "pancytopenia"),  # 5.0 mmol/L = 8.06 g/dL
        ([("718-7", 8.1, "g/dL")], None),  # platelets not in the panel: cannot say
        ([], None),
    ],
)
def test_cytopenia(extra, label):
    assert cytopenia(panel(*CBC, *extra), Rules())[0] == label


def test_cutoffs_are_configurable():
    rows = panel(*CBC, ("718-7", 11.0, "g/dL"), ("777-3", 140, "10*3/uL"))
    assert cytopenia(rows, Rules(hemoglobin_below_g_dl=12.0, platelets_below_per_ul=150_000))[0] == "pancytopenia"


def test_decide_reports_cytopenia_on_the_event():
    d = decide(PatientState(), "Patient/p1", "k", panel(*CBC, ("718-7", 8.1, "g/dL"), ("777-3", 42, "10*3/uL")), Rules())
    (event,) = d.events
    assert (event.kind.value, event.assessment.cytopenia, event.assessment.platelets) == ("new", "pancytopenia", 42000)


@pytest.mark.parametrize(
    ("status", "reason"),
    [("entered-in-error", "entered-in-error"), ("cancelled", "cancelled")],
)
def test_withdrawn_result_retracts_with_its_status_as_reason(status, reason):
    first = decide(PatientState(), "Patient/p1", "k", panel(*CBC), Rules())
    gone = panel(("6690-2", 2.0, "10*3/uL"), ("751-8", None, None, {"status": status}))
    d = decide(first.state, "Patient/p1", "k", gone, Rules())
    (event,) = d.events
    assert (event.kind.value, event.reason, event.worst) == ("retracted", reason, None)


def test_corrected_version_is_reason_corrected():
    first = decide(PatientState(), "Patient/p1", "k", panel(*CBC), Rules())
    fixed = panel(("6690-2", 2.0, "10*3/uL"), ("751-8", 1.8, "10*3/uL", {"version": "2", "status": "corrected"}))
    d = decide(first.state, "Patient/p1", "k", fixed, Rules())
    assert [(e.kind.value, e.reason) for e in d.events] == [("retracted", "corrected")]


@pytest.mark.parametrize(
    ("based_on", "requesters", "team", "pool", "expected"),
    [
        (["ServiceRequest/sr1"], {"ServiceRequest/sr1": "Practitioner/dr-a"}, ["Practitioner/t1"], ["CareTeam/onc"],
         (("Practitioner/dr-a",), "ordering clinician")),
        (["ServiceRequest/sr1"], {"ServiceRequest/sr1": None}, ["Practitioner/t1", "Patient/p1"], ["CareTeam/onc"],
         (("Practitioner/t1",), "care team")),  # a patient on the team is not a recipient of the alert
        (["ServiceRequest/gone"], {}, [], ["CareTeam/onc"], (("CareTeam/onc",), "configured pool")),
        ([], {}, [], [], ((), "none")),
        (["ServiceRequest/a", "ServiceRequest/b"], {"ServiceRequest/a": "PractitionerRole/r1", "ServiceRequest/b": "PractitionerRole/r1"},
         [], [], (("PractitionerRole/r1",), "ordering clinician")),
    ],
)
def test_recipient_rules(based_on, requesters, team, pool, expected):
    from service.clinical.recipients import choose

    got = choose(based_on, requesters, team, pool)
    assert (got.refs, got.rule) == expected


# Age and individual thresholds (reference §3 "Paediatrics": infants 2 weeks-1 year < 1000/mm3;
# first week of life out of scope; individual baselines, never race).
@pytest.mark.parametrize(
    ("age_days", "threshold", "anc", "outcome"),
    [
        (3, None, 300, "not assessed"),  # first week: out of scope, said in the event
        (20, None, 1200, "normal"),  # infant: 1200 is not neutropenic (< 1000 is)
        (20, None, 900, "moderate"),
        (400, None, 1200, "mild"),  # over 1 year: adult bands
        (40 * 365, 1000.0, 1200, "normal"),  # documented individual threshold 1000
        (40 * 365, 1000.0, 800, "moderate"),
    ],
)
def test_age_and_individual_thresholds(age_days, threshold, anc, outcome):
    from service.clinical.context import PatientContext
    from service.clinical.rules import DAY_US

    rows = panel(("6690-2", 3.0, "10*3/uL"), ("751-8", anc / 1000, "10*3/uL"))
    effective_us = rows[0].effective_us
    context = PatientContext(effective_us - age_days * DAY_US, threshold, "config" if threshold else None)
    d = decide(PatientState(), "Patient/p1", "k", rows, Rules(), context)
    if outcome == "not assessed":
        assert d.not_assessed is not None and "first 7 days" in d.not_assessed.reason and not d.events
    elif outcome == "normal":
        assert d.events == () and d.assessed
    else:
        (event,) = d.events
        assert event.band.severity == outcome
