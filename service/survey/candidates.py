"""A likely LOINC term for a local code, from its display text and unit: a hint for the person who
writes the site's ConceptMap, never a mapping (the core matches codes only, reference §1.1).

Each hint names the LOINC code the core reads for that term (service/core/codes.py) and the words it
was found by. Granulocyte counts get a caution instead of a candidate: they include eosinophils and
basophils and are never an ANC (reference §1.1, §2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.core.units import unit_key

GRANULOCYTE_CAUTION = (
    "granulocytes are not the neutrophils of an ANC (a granulocyte count includes eosinophils "
    "and basophils; immature granulocytes are precursors): never an ANC (reference §1.1); no candidate"
)
SEGS_NOTE = (
    "an automated neutrophil % already includes bands; where this item is the segmented "
    "neutrophils of a manual differential (bands reported beside it), it is 769-0 there"
)


@dataclass(frozen=True, slots=True)
class Candidate:
    loinc: str
    term: str  # the term in the service's words ("WBC", "neutrophils %", ...)
    loinc_display: str  # the LOINC long common name
    basis: str  # what it was found by: "display 'White Blood Cells'", "unit '°F'"
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Hint:
    candidate: Candidate | None
    caution: str | None = None


@dataclass(frozen=True, slots=True)
class _Rule:
    pattern: re.Pattern[str]
    percent: tuple[str, str, str] | None  # (LOINC, term, LOINC display) when the unit is a percentage
    count: tuple[str, str, str] | None  # ... otherwise
    exclude: re.Pattern[str] | None = None
    note: str | None = None


def _re(text: str) -> re.Pattern[str]:
    return re.compile(text, re.I)


_NOT_BLOOD = _re(r"urine|urinalysis|\bua\b|csf|fluid|ascit|pleural|synovial|joint|stool|\bfec|sputum|\bbal\b")
_GRANULOCYTES = _re(r"granulocyte")
_ANC = ("751-8", "ANC", "Neutrophils [#/volume] in Blood by Automated count")
_RULES = (
    _Rule(_re(r"absolute neutrophil|\banc\b|neut\w*[ ,.]*(abs|#|count)"), _ANC, _ANC),
    _Rule(
        _re(r"\bbands?\b|band form|\bstabs?\b"),
        ("764-1", "bands %", "Band form neutrophils/100 leukocytes in Blood by Manual count"),
        ("763-3", "bands (absolute)", "Band form neutrophils [#/volume] in Blood by Manual count"),
    ),
    _Rule(
        _re(r"\bsegs?\b|segmented"),
        ("769-0", "segmented neutrophils %", "Segmented neutrophils/100 leukocytes in Blood by Manual count"),
        (
            "768-2",
            "segmented neutrophils (absolute)",
            "Segmented neutrophils [#/volume] in Blood by Manual count",
        ),
    ),
    _Rule(
        _re(r"neutrophil|\bneuts?\b|\bpmns?\b|polymorph"),
        ("770-8", "neutrophils %", "Neutrophils/100 leukocytes in Blood by Automated count"),
        _ANC,
        note=SEGS_NOTE,
    ),
    _Rule(
        _re(r"white blood|\bwbcs?\b|leuko|leuco|white cell"),
        None,
        ("6690-2", "WBC", "Leukocytes [#/volume] in Blood by Automated count"),
    ),
    _Rule(
        _re(r"h(a)?emoglobin|\bhgb\b|\bhb\b"),
        None,
        ("718-7", "haemoglobin", "Hemoglobin [Mass/volume] in Blood"),
        exclude=_re(r"a1c|glyc|carboxy|met|fetal|\bhbf\b|free|mean|\bmch|plasma|oxy|sat"),
    ),
    _Rule(
        _re(r"platelet|\bplts?\b|thrombocyte"),
        None,
        ("777-3", "platelets", "Platelets [#/volume] in Blood by Automated count"),
        exclude=_re(r"volume|\bmpv\b|distribution|clump|smear|function|aggreg|antibod|large"),
    ),
)
_TEMPERATURE = ("8310-5", "temperature", "Body temperature")
_TEMPERATURE_TEXT = _re(r"temperature|\btemp\b")
_TEMPERATURE_UNITS = frozenset({"cel", "°c", "degc", "[degf]", "°f", "degf"})
_PERCENT_UNITS = frozenset({"%", "/100", "percent", "pct"})


def hint(display: str | None, unit: str | None) -> Hint | None:
    """The likely term of a local code, a caution, or None (nothing recognised)."""
    text = display or ""
    key = unit_key(unit) if unit else ""
    if _NOT_BLOOD.search(text):
        return None
    if _GRANULOCYTES.search(text):
        return Hint(None, GRANULOCYTE_CAUTION)
    for rule in _RULES:
        if not rule.pattern.search(text) or (rule.exclude is not None and rule.exclude.search(text)):
            continue
        term = rule.percent if key in _PERCENT_UNITS and rule.percent is not None else rule.count
        if term is None:
            return None
        return Hint(
            Candidate(*term, basis=f"display '{text}'", note=rule.note if term is rule.percent else None)
        )
    if _TEMPERATURE_TEXT.search(text):
        return Hint(Candidate(*_TEMPERATURE, basis=f"display '{text}'"))
    if key in _TEMPERATURE_UNITS:
        return Hint(Candidate(*_TEMPERATURE, basis=f"unit '{unit}'"))
    return None
