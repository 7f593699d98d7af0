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
