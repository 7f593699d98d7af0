"""Grading boundaries. Source: docs/clinical-reference.md §3 "Common ANC bands":
neutropenia < 1500/uL (UpToDate, Coates); mild 1000-1500, moderate 500-1000, severe < 500
(5-Minute Pediatric Consult). A band "a-b" includes a and excludes b."""

import pytest

from service.core.grading import BUILT_IN, DEFAULT, SchemeError, make_scheme


@pytest.mark.parametrize(
    ("anc", "severity"),
    [
        (4000, None),
        (1500, None),  # 1500 is normal (boundary)
        (1499.9, "mild"),
        (1000, "mild"),  # 1000 is mild
        (999.9, "moderate"),
        (500, "moderate"),  # 500 is moderate
        (499.9, "severe"),
        (0, "severe"),
    ],
)
def test_default_bands(anc, severity):
    assert DEFAULT.grade(anc).severity == severity


def test_ranks_order_worse_higher():
    assert [DEFAULT.grade(x).rank for x in (2000, 1200, 700, 100)] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "has no bands"),
        ([("g", "dire", 500.0)], "severity 'dire'"),
        ([("a", "severe", 1000.0), ("b", "moderate", 500.0)], "must end above 1000"),
    ],
)
def test_bad_schemes_rejected(rows, message):
    with pytest.raises(SchemeError, match=message):
        make_scheme("x", rows)


# CTCAE v5.0 "Neutrophil count decreased" (reference §3, from public copies of the NCI table):
# G1 <LLN-1500; G2 <1500-1000; G3 <1000-500; G4 <500 /mm3. "<1500-1000" means 1000 <= x < 1500.
@pytest.mark.parametrize(
    ("anc", "lln", "label", "severity"),
    [
        (1800, 2000, "grade 1", "mild"),  # between 1500 and an LLN of 2000
        (1500, 2000, "grade 1", "mild"),
        (2000, 2000, "normal", None),  # at the LLN is not below it
        (1800, None, "normal", None),  # no LLN reported: grade 1 cannot be assigned
        (1800, 1400, "normal", None),  # an LLN below 1500 leaves no grade 1 band
        (1499, 2000, "grade 2", "mild"),
        (1000, None, "grade 2", "mild"),
        (999, None, "grade 3", "moderate"),
        (500, None, "grade 3", "moderate"),
        (499, None, "grade 4", "severe"),
    ],
)
def test_ctcae_v5(anc, lln, label, severity):
    band = BUILT_IN["ctcae-v5"].grade(anc, lln)
    assert (band.label, band.severity) == (label, severity)


# CTCAE v6.0 (reference §3, secondary source quoting ctcae-v6.0.xlsx): G1 <1500-1000; G2 <1000-500;
# G3 <500-100; G4 <100 /mm3; LLN-1500 is no longer graded.
@pytest.mark.parametrize(
    ("anc", "label"),
    [
        (1800, "normal"),
        (1500, "normal"),
        (1499, "grade 1"),
        (1000, "grade 1"),
        (999, "grade 2"),
        (500, "grade 2"),
        (499, "grade 3"),
        (100, "grade 3"),
        (99, "grade 4"),
        (0, "grade 4"),
    ],
)
def test_ctcae_v6(anc, label):
    assert BUILT_IN["ctcae-v6"].grade(anc, lln=2000).label == label  # the LLN plays no part in v6


def test_lln_band_must_be_last():
    with pytest.raises(SchemeError, match="only the last band"):
        make_scheme("x", [("a", "mild", "LLN"), ("b", "severe", 500.0)])
