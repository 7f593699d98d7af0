"""Which codes the service already reads: the survey's one question to the terminology.

`Classifier` is the seam: given a coding's system and code it says "monitored" (a LOINC code the core
reads, service/core/codes.py), "mapped" (a site code the configured terminology maps onto one) or
None. `builtin` knows only the built-in LOINC codes; a site terminology is another `Classifier`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

from service.core.codes import LOINC, TERMS
from service.core.observations import LOINC_OID
from service.core.terminology import Terminology

Standing = Literal["monitored", "mapped"]


class Classification(NamedTuple):
    standing: Standing
    loinc: str  # the LOINC code the coding is (monitored) or maps to (mapped)


class Classifier(Protocol):
    def __call__(self, system: str | None, code: str | None, /) -> Classification | None: ...


def builtin(system: str | None, code: str | None, /) -> Classification | None:
    """A monitored LOINC code (reference §1.1: by system and code, never display), else None."""
    if system in (LOINC, LOINC_OID) and code in TERMS:
        return Classification("monitored", code)
    return None


def site(terminology: Terminology) -> Classifier:
    """The built-in LOINC codes, and the local codes the site's ConceptMaps translate to one
    (terminology.concept_maps): those are "mapped", with the LOINC code they are read as."""

    def classify(system: str | None, code: str | None, /) -> Classification | None:
        known = builtin(system, code)
        if known is not None:
            return known
        translation = terminology.translate(system, code)
        if translation is not None and translation.loinc in TERMS:
            return Classification("mapped", translation.loinc)
        return None

    return classify
