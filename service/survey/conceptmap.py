"""A draft FHIR R4 ConceptMap of a survey's candidates, for a person to review: each local code with a
likely term maps to its candidate LOINC code with equivalence `inexact` and a comment asking for
review (https://hl7.org/fhir/R4/conceptmap.html; equivalence codes
https://hl7.org/fhir/R4/valueset-concept-map-equivalence.html). Nothing is `equivalent` until a
person has said so."""

from __future__ import annotations

from itertools import groupby
from typing import Any

from service.core.codes import LOINC
from service.survey.tally import CodeCount, Survey

REVIEW = (
    "Proposed by neutrowatch survey from the {basis} ({count} results; units {units}): not a mapping "
    "until reviewed. Review, and set equivalence to 'equivalent' when it is right."
)


def draft_conceptmap(survey: Survey) -> dict[str, Any]:
    hinted = sorted(
        (
            c
            for c in survey.codes.values()
            if c.standing == "unmonitored"
            and c.system
            and c.code
            and c.hint is not None
            and c.hint.candidate is not None
        ),
        key=lambda c: (c.system or "", c.code or "", c.display or ""),
    )
    groups = []
    for system, codes in groupby(hinted, key=lambda c: c.system):
        elements: dict[str, dict[str, Any]] = {}
        for c in codes:
            elements.setdefault(c.code or "", _element(c))  # one element per code (displays may differ)
        groups.append({"source": system, "target": LOINC, "element": list(elements.values())})
    return {
        "resourceType": "ConceptMap",
        "name": "NeutrowatchSurveyDraft",
        "title": "Draft map of local laboratory and vital-sign codes to LOINC (neutrowatch survey)",
        "status": "draft",
        "experimental": True,
        "description": "Candidates found by display text and unit. Every element needs human review "
        "before use.",
        "targetUri": LOINC,
        "group": groups,
    }


def _element(c: CodeCount) -> dict[str, Any]:
    assert c.hint is not None and c.hint.candidate is not None
    candidate = c.hint.candidate
    comment = REVIEW.format(basis=candidate.basis, count=c.count, units=", ".join(sorted(c.units)))
    if candidate.note:
        comment += f" Note: {candidate.note}."
    element: dict[str, Any] = {"code": c.code}
    if c.display:
        element["display"] = c.display
    element["target"] = [
        {
            "code": candidate.loinc,
            "display": candidate.loinc_display,
            "equivalence": "inexact",
            "comment": comment,
        }
    ]
    return element
