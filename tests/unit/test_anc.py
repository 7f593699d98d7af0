"""ANC per panel. Sources: docs/clinical-reference.md §2 (formulas and order of
preference; plausibility gate) and §7 (public examples)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.anc import Anc, PanelRejected, compute_anc
from tests.builders import observation, result


def panel(*rows):
    return [
        result(observation(code, value, unit, **kw))
        for code, value, unit, *rest in rows
        for kw in [rest[0] if rest else {}]
    ]


@pytest.mark.parametrize(
    ("rows", "anc", "method"),
    [
        # FHIR core DiagnosticReport/101: WBC 4.6 10*9/L, 770-8 20 %, 751-8 0.9 10*9/L -> 900/uL
        (
            [("6690-2", 4.6, "10*9/L"), ("770-8", 20, "%"), ("751-8", 0.9, "10*9/L")],
            900.0,
            "reported-absolute",
        ),
        # Same panel without the absolute: 4600 x 20 / 100 = 920 (reference §7: "4.6x0.2=0.92")
        ([("6690-2", 4.6, "10*9/L"), ("770-8", 20, "%")], 920.0, "wbc-x-neutrophil-pct"),
        # 5-Minute Pediatric Consult: WBC 5,200/uL, 15 % segs, 4 % bands -> 5,200 x 0.19 = 988
        ([("6690-2", 5200, "/uL"), ("769-0", 15, "%"), ("764-1", 4, "%")], 988.0, "wbc-x-segs+bands-pct"),
        # Manual segs without bands -> segs only
        ([("6690-2", 5200, "/uL"), ("769-0", 15, "%")], 780.0, "wbc-x-segs-pct"),
        # Absolute segs + bands (reference §2 order 1)
        (
            [("768-2", 0.6, "10*3/uL"), ("763-3", 0.1, "10*3/uL"), ("6690-2", 3.0, "10*3/uL")],
            700.0,
            "absolute-segs+bands",
        ),
        # A manual absolute (753-4) wins over the automated one (751-8): it was made after a flag
        (
            [("751-8", 1.2, "10*3/uL"), ("753-4", 0.4, "10*3/uL"), ("6690-2", 3.0, "10*3/uL")],
            400.0,
            "reported-absolute",
        ),
        # Bands are never added to an automated 770-8, which already includes them (reference §2)
        (
            [("6690-2", 2.0, "10*3/uL"), ("770-8", 40, "%"), ("35332-6", 10, "%")],
            800.0,
            "wbc-x-neutrophil-pct",
        ),
        # nRBC-corrected WBC (33256-9) is preferred over 6690-2 (reference §2)
        (
            [("6690-2", 3.0, "10*3/uL"), ("33256-9", 2.0, "10*3/uL"), ("770-8", 50, "%")],
            1000.0,
            "wbc-x-neutrophil-pct",
        ),
        # 71676-1 decimal fraction 0.25 x WBC 4.0 K = 1000
        ([("6690-2", 4.0, "10*3/uL"), ("71676-1", 0.25, "1")], 1000.0, "wbc-x-neutrophil-pct"),
    ],
)
def test_methods(rows, anc, method):
    out = compute_anc(panel(*rows))
    assert isinstance(out, Anc)
    assert (out.value, out.method) == (pytest.approx(anc), method)


def test_inputs_record_which_observations_were_used():
    rows = panel(("6690-2", 4.6, "10*9/L"), ("770-8", 20, "%"), ("751-8", 0.9, "10*9/L"))
    out = compute_anc(rows)
    assert [r.code for r in out.inputs] == ["751-8", "6690-2"]


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        # mCODE jenny-m example: 26499-4 = 3000 10*3/uL is a unit error, not a result (reference §2)
        ([("26499-4", 3000, "10*3/uL")], "implausible ANC 3e+06/uL (outside 0-100000)"),
        # Synthea AML module: 751-8 "10*3/uL" in 250-500 (reference §2)
        (
            [("751-8", 300, "10*3/uL"), ("6690-2", 400, "10*3/uL")],
            "implausible ANC 300000/uL (outside 0-100000)",
        ),
        # ANC must not exceed the WBC of the same panel (reference §2 plausibility gate)
        ([("751-8", 5.0, "10*3/uL"), ("6690-2", 4.0, "10*3/uL")], "ANC 5000/uL exceeds WBC 4000/uL"),
        ([("770-8", 40, "%")], "neutrophil percentage without a WBC in the same panel"),
        (
            [("6690-2", 4.0, "10*3/uL"), ("769-0", 80, "%"), ("764-1", 30, "%")],
            "segmented + band percentages exceed 100",
        ),
    ],
)
def test_plausibility_gate(rows, reason):
    out = compute_anc(panel(*rows))
    assert isinstance(out, PanelRejected)
    assert out.reason == reason


def test_no_neutrophil_result_means_nothing_to_assess():
    # CBC panel 58410-2 has no differential (reference §1.2)
    assert compute_anc(panel(("6690-2", 4.0, "10*3/uL"), ("718-7", 12, "g/dL"))) is None


def test_non_final_results_are_not_used():
    rows = panel(("751-8", 0.3, "10*3/uL", {"status": "preliminary"}), ("6690-2", 3.0, "10*3/uL"))
    assert compute_anc(rows) is None


def test_comparator_propagates_to_anc():
    rows = panel(("6690-2", 0.1, "10*3/uL", {"comparator": "<"}), ("770-8", 50, "%"))
    out = compute_anc(rows)
    assert (out.value, out.at_most) == (50.0, True)


@settings(max_examples=300, deadline=None)
@given(
    wbc=st.floats(min_value=0, max_value=2000, allow_nan=False),
    pct=st.floats(min_value=0, max_value=100, allow_nan=False),
    direct=st.none() | st.floats(min_value=0, max_value=2000, allow_nan=False),
    unit=st.sampled_from(["10*3/uL", "/uL", "10*9/L"]),
)
def test_anc_never_negative_nor_above_wbc(wbc, pct, direct, unit):
    rows = [("6690-2", wbc, unit), ("770-8", pct, "%")]
    if direct is not None:
        rows.append(("751-8", direct, unit))
    out = compute_anc(panel(*rows))
    if isinstance(out, Anc):
        assert 0 <= out.value <= 100_000
        assert out.value <= out.wbc * (1 + 1e-6)


@pytest.mark.parametrize(
    ("rows", "complete"),
    [
        ([("6690-2", 4.0, "10*3/uL"), ("751-8", 1.0, "10*3/uL")], True),
        ([("6690-2", 4.0, "10*3/uL"), ("770-8", 40, "%")], True),
        ([("6690-2", 4.0, "10*3/uL"), ("769-0", 40, "%")], True),
        ([("6690-2", 4.0, "10*3/uL")], False),  # WBC only: the differential may follow
        ([("751-8", 1.0, "10*3/uL")], False),  # no WBC for the plausibility gate yet
        # a preliminary member is still awaited: hold until final (reference §1.5 "preliminary")
        (
            [
                ("6690-2", 4.0, "10*3/uL"),
                ("770-8", 40, "%"),
                ("751-8", 1.0, "10*3/uL", {"status": "preliminary"}),
            ],
            False,
        ),
    ],
)
def test_panel_completeness(rows, complete):
    from service.core.anc import is_complete

    assert is_complete(panel(*rows)) is complete
