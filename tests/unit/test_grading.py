"""Grading boundaries. Source: shared/reference/clinical-and-fhir.md §3 "Common ANC bands":
neutropenia < 1500/uL (UpToDate, Coates); mild 1000-1500, moderate 500-1000, severe < 500
(5-Minute Pediatric Consult). A band "a-b" includes a and excludes b."""

import pytest

from service.clinical.grading import DEFAULT, SchemeError, make_scheme


@pytest.mark.parametrize(
    ("anc", "severity"),
    [
        (4000, None),
        (1500, None),  # 1500 is normal (issue 2 boundary)
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
