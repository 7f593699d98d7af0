"""The white-cell picture of a panel (service/core/picture.py): the neutrophil fraction of the WBC,
and the pictures in which the ANC alone misleads (reference §3, "White-cell picture")."""

from __future__ import annotations

import pytest

from service.core.picture import Picture, white_cells

MARKED = Picture.MARKED_LEUKOCYTOSIS_LOW_NEUTROPHILS
HYPER = Picture.HYPERLEUKOCYTOSIS


@pytest.mark.parametrize(
    ("wbc", "anc", "picture"),
    [
        # Marked leukocytosis: WBC > 30 ×10³/µL (fpnotebook.com "Leukocytosis", laboratory red flags:
        # WBC > 30,000/mm³); low neutrophil fraction: < 40 % (MedlinePlus "Blood differential test":
        # normal neutrophils 40-60 %).
        (41_000, 410, MARKED),  # 1 % neutrophils: the leukaemic picture, ANC severe
        (43_000, 2_580, MARKED),  # 6 %: the ANC is "normal", the count is not
        (30_001, 12_000, MARKED),  # 40.0 % less a hair: still low
        (30_001, 12_001, None),  # 40.002 %: not low
        (30_000, 600, None),  # WBC 30.0 is not above 30: not marked
        (25_000, 500, None),  # 2 %, but WBC 25: leukocytosis (> 11, Riley & Rupert AAFP 2015), not marked
        (12_000, 900, None),  # leukocytosis (> 11 ×10³/µL) with 7.5 % neutrophils: not marked
        (35_000, 28_000, None),  # 80 % neutrophils: a neutrophilia, not this picture
        # Hyperleukocytosis: WBC > 100 ×10³/µL whatever the differential (The Blood Project,
        # "What is hyperleukocytosis?"; fpnotebook.com: urgent haematology consultation).
        (100_001, 1_000, HYPER),
        (150_000, 90_000, HYPER),  # 60 % neutrophils (a CML-like count): still hyperleukocytosis
        (100_000, 1_000, MARKED),  # WBC 100.0 is not above 100: a marked leukocytosis, 1 %
        # Ordinary counts (MedlinePlus: WBC 4.5-11 ×10³/µL, neutrophils 40-60 %).
        (5_000, 2_750, None),
        (2_000, 400, None),  # leukopenia with 20 % neutrophils: the neutropenia says it
    ],
)
def test_pictures_by_wbc_and_neutrophil_fraction(wbc, anc, picture):
    """The picture named follows the WBC and the neutrophil fraction thresholds of the cited sources."""
    assert white_cells(wbc, anc, False).picture is picture


@pytest.mark.parametrize(
    ("wbc", "anc", "at_most", "percent"),
    [
        (41_000, 410, False, 1.0),  # 410 / 41 000 = 1 %
        (4_600, 900, False, 900 / 4_600 * 100),  # FHIR DiagnosticReport/101: 0.9 of 4.6 ×10⁹/L = 19.6 %
        (40_000, 100, True, 0.25),  # ANC "< 100": the fraction is at most 0.25 %
    ],
)
def test_neutrophil_fraction_is_the_anc_over_the_wbc(wbc, anc, at_most, percent):
    """The fraction is ANC / WBC × 100, and an ANC bound makes it a bound."""
    white = white_cells(wbc, anc, at_most)
    assert white.neutrophil_percent == pytest.approx(percent)
    assert (white.at_most, white.wbc) == (at_most, wbc)


def test_a_low_bound_proves_a_low_fraction():
    """An ANC "< 1000" with a WBC of 40 ×10³/µL: at most 2.5 %, so low whatever the true value."""
    assert white_cells(40_000, 1_000, True).picture is MARKED


@pytest.mark.parametrize("wbc", [None, 0.0])
def test_without_a_usable_wbc_there_is_no_fraction_and_no_picture(wbc):
    """A panel with a reported ANC and no WBC (or a WBC of 0) has no fraction and names no picture."""
    white = white_cells(wbc, 300, False)
    assert (white.neutrophil_percent, white.picture) == (None, None)
