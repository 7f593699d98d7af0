"""The white-cell picture of one panel: the WBC and the neutrophil fraction beside the ANC, and the
pictures in which the ANC alone misleads (docs/clinical-reference.md §3, "White-cell picture").

An ANC back above the neutropenia threshold is not a normal count when the WBC is very high and the
neutrophils are a small part of it: the ANC rises with the leukaemic or lymphoproliferative cells,
not with recovery. Adult thresholds:
- marked leukocytosis: WBC > 30 × 10³/µL (fpnotebook.com "Leukocytosis": a WBC over 30,000/mm³ is a
  laboratory warning sign of a haematological malignancy; leukocytosis itself is WBC > 11 × 10³/µL,
  Riley LK, Rupert J, Am Fam Physician 2015;92(11):1004-1011);
- hyperleukocytosis: WBC > 100 × 10³/µL (The Blood Project, "What is hyperleukocytosis?";
  fpnotebook.com: urgent haematology consultation), whatever the differential;
- a low neutrophil fraction: neutrophils < 40 % of the WBC (MedlinePlus "Blood differential test":
  normal neutrophils 40–60 %).

Plain data in (the panel's WBC and ANC, cells/µL), a small struct out; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MARKED_LEUKOCYTOSIS = 30_000.0  # cells/uL: WBC above this is a marked leukocytosis (fpnotebook.com)
HYPERLEUKOCYTOSIS = 100_000.0  # cells/uL: WBC above this is a hyperleukocytosis (The Blood Project)
LOW_NEUTROPHIL_PERCENT = 40.0  # neutrophils below this % of the WBC are low (MedlinePlus: 40-60 %)


class Picture(StrEnum):
    """A white-cell picture the ANC alone does not tell (the event's `picture`)."""

    MARKED_LEUKOCYTOSIS_LOW_NEUTROPHILS = "marked-leukocytosis-low-neutrophil-fraction"
    HYPERLEUKOCYTOSIS = "hyperleukocytosis"


@dataclass(frozen=True, slots=True)
class WhiteCells:
    wbc: float | None  # cells/uL; None when the panel has no WBC
    neutrophil_percent: float | None  # ANC / WBC x 100; None without a WBC (or a WBC of 0)
    at_most: bool  # the ANC was a bound ("<"), so the fraction is at most `neutrophil_percent`
    picture: Picture | None  # None: nothing beyond what the ANC says


def white_cells(wbc: float | None, anc: float, anc_at_most: bool) -> WhiteCells:
    """The panel's white-cell picture from its WBC and ANC (both cells/µL). A fraction that is only
    an upper bound (the ANC was "<") still proves a low fraction when the bound is low."""
    if wbc is None or wbc <= 0:
        return WhiteCells(wbc, None, anc_at_most, None)
    percent = 100.0 * anc / wbc
    return WhiteCells(wbc, percent, anc_at_most, _picture(wbc, percent))


def _picture(wbc: float, neutrophil_percent: float) -> Picture | None:
    if wbc > HYPERLEUKOCYTOSIS:
        return Picture.HYPERLEUKOCYTOSIS
    if wbc > MARKED_LEUKOCYTOSIS and neutrophil_percent < LOW_NEUTROPHIL_PERCENT:
        return Picture.MARKED_LEUKOCYTOSIS_LOW_NEUTROPHILS
    return None
