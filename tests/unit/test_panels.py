"""Panel-level rules: isolated neutropenia vs pancytopenia (defaults Hb < 10 g/dL, platelets
< 100 x 10^3/uL; one operational definition, Danish KIP value set "Cytopeni": Hb < 6.2 mmol/L
(about 10 g/dL), platelets < 100 x 10^9/L — reference §3), and the revision reasons."""

import pytest

from service.core.context import PatientContext
from service.core.episodes import PatientState
from service.core.panels import (
    COLLECTED_AFTER_RECORDED,
    COLLECTED_BEFORE_1900,
    COLLECTED_BEFORE_BIRTH,
    cytopenia,
    decide,
)
from service.core.rules import Rules
from tests.builders import observation, result


def panel(*rows):
    return [
        result(observation(code, value, unit, id=f"x{i}", **(rest[0] if rest else {})))
        for i, (code, value, unit, *rest) in enumerate(rows)
    ]


CBC = [("6690-2", 2.0, "10*3/uL"), ("751-8", 0.4, "10*3/uL")]


@pytest.mark.parametrize(
    ("extra", "label"),
    [
        ([("718-7", 8.1, "g/dL"), ("777-3", 42, "10*3/uL")], "pancytopenia"),
        ([("718-7", 13.5, "g/dL"), ("777-3", 250, "10*3/uL")], "isolated"),
        ([("718-7", 9.9, "g/dL"), ("777-3", 100, "10*3/uL")], "with anaemia"),  # 100 is not below 100
        (
            [("718-7", 10.0, "g/dL"), ("777-3", 99, "10*3/uL")],
            "with thrombocytopenia",
        ),  # 10.0 is not below 10
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
    assert (
        cytopenia(rows, Rules(hemoglobin_below_g_dl=12.0, platelets_below_per_ul=150_000))[0]
        == "pancytopenia"
    )


def test_decide_reports_cytopenia_on_the_event():
    d = decide(
        PatientState(),
        "Patient/p1",
        "k",
        panel(*CBC, ("718-7", 8.1, "g/dL"), ("777-3", 42, "10*3/uL")),
        Rules(),
    )
    (event,) = d.events
    assert (event.kind.value, event.assessment.cytopenia, event.assessment.platelets) == (
        "new",
        "pancytopenia",
        42000,
    )


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
    fixed = panel(
        ("6690-2", 2.0, "10*3/uL"), ("751-8", 1.8, "10*3/uL", {"version": "2", "status": "corrected"})
    )
    d = decide(first.state, "Patient/p1", "k", fixed, Rules())
    assert [(e.kind.value, e.reason) for e in d.events] == [("retracted", "corrected")]


@pytest.mark.parametrize(
    ("based_on", "requesters", "team", "pool", "expected"),
    [
        (
            ["ServiceRequest/sr1"],
            {"ServiceRequest/sr1": "Practitioner/dr-a"},
            ["Practitioner/t1"],
            ["CareTeam/onc"],
            (("Practitioner/dr-a",), "ordering clinician"),
        ),
        (
            ["ServiceRequest/sr1"],
            {"ServiceRequest/sr1": None},
            ["Practitioner/t1", "Patient/p1"],
            ["CareTeam/onc"],
            (("Practitioner/t1",), "care team"),
        ),  # a patient on the team is not a recipient of the alert
        (["ServiceRequest/gone"], {}, [], ["CareTeam/onc"], (("CareTeam/onc",), "configured pool")),
        ([], {}, [], [], ((), "none")),
        (
            ["ServiceRequest/a", "ServiceRequest/b"],
            {"ServiceRequest/a": "PractitionerRole/r1", "ServiceRequest/b": "PractitionerRole/r1"},
            [],
            [],
            (("PractitionerRole/r1",), "ordering clinician"),
        ),
    ],
)
def test_recipient_rules(based_on, requesters, team, pool, expected):
    from service.core.recipients import choose

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
    from service.core.context import PatientContext
    from service.core.rules import DAY_US

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


# -- collection times that cannot be true ---------------------------------------------------------


UPDATED = "2026-01-05T09:00:00Z"


def cbc_at(effective, updated=UPDATED, patient="Patient/t"):
    key = "".join(ch for ch in effective if ch.isdigit())
    return [
        result(
            observation(
                code,
                value,
                "10*3/uL",
                id=f"t{code}-{key}",
                patient=patient,
                effective=effective,
                updated=updated,
                specimen=f"Specimen/s{key}",
            )
        )
        for code, value in (("6690-2", 2.0), ("751-8", 0.2))
    ]


BORN = PatientContext(birth_us=1_577_836_800_000_000)  # 2020-01-01


@pytest.mark.parametrize(
    ("effective", "updated", "context", "clock", "reason"),
    [
        # A specimen is collected before its result is recorded (meta.lastUpdated); the default slack of
        # one hour allows for clock skew between laboratory system and server.
        ("2026-01-05T08:00:00Z", UPDATED, PatientContext(), None, None),
        ("2026-01-05T09:59:59Z", UPDATED, PatientContext(), None, None),  # within the hour of slack
        ("2026-01-05T10:00:01Z", UPDATED, PatientContext(), None, COLLECTED_AFTER_RECORDED),
        ("9999-12-31T23:59:59Z", UPDATED, PatientContext(), None, COLLECTED_AFTER_RECORDED),
        # without meta.lastUpdated the reading clock bounds it; without either nothing does
        (
            "2026-01-05T10:00:01Z",
            None,
            PatientContext(),
            1_767_603_600_000_000,
            COLLECTED_AFTER_RECORDED,
        ),  # clock 09:00Z
        ("2026-01-05T10:00:01Z", None, PatientContext(), None, None),
        # before the patient was born (less a day: a birth date has no timezone), or before 1900
        ("2019-12-31T12:00:00Z", UPDATED, BORN, None, None),
        ("2019-12-30T12:00:00Z", UPDATED, BORN, None, COLLECTED_BEFORE_BIRTH),
        ("1899-12-31T23:59:59Z", UPDATED, PatientContext(), None, COLLECTED_BEFORE_1900),
        ("0001-01-01T00:00:00Z", UPDATED, BORN, None, COLLECTED_BEFORE_1900),
    ],
)
def test_impossible_collection_times_are_rejected(effective, updated, context, clock, reason):
    """A collection time later than the result was recorded, or before birth or 1900, rejects the
    panel with the reason; a plausible one is assessed."""
    d = decide(PatientState(), "Patient/t", "k", cbc_at(effective, updated), Rules(), context, clock)
    if reason is None:
        assert d.rejection is None and d.assessed
    else:
        assert d.rejection is not None and d.rejection.rejected.reason == reason
        assert not d.events and not d.assessed and d.state == PatientState()


def test_a_far_future_panel_does_not_silence_the_patient():
    """A panel dated 9999 is rejected and never becomes the patient's newest collection, so the
    real severe panel after it still alerts (before: every later panel was stale, no event)."""
    state = PatientState()
    future = decide(state, "Patient/t", "f", cbc_at("9999-12-31T23:59:59Z"), Rules())
    later = decide(future.state, "Patient/t", "r", cbc_at("2026-01-05T08:30:00Z"), Rules())
    assert future.rejection is not None
    assert [e.kind.value for e in later.events] == ["new"] and not later.stale


def test_a_stale_panel_says_which_collection_is_newer():
    """A panel collected before the newest assessed one is remembered without an event, and the
    decision names the newer collection (it becomes a visible `stale` record)."""
    first = decide(PatientState(), "Patient/t", "a", cbc_at("2026-01-05T08:00:00Z"), Rules())
    older = decide(first.state, "Patient/t", "b", cbc_at("2026-01-04T08:00:00Z"), Rules())
    assert older.stale and not older.events
    assert older.newest_effective == "2026-01-05T08:00:00Z" and older.assessment is not None
