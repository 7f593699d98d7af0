"""The FHIR profiles, extensions and terminology of what the service writes (fhir_profiles/).

One source for the canonical URLs and codes: `alerts.py` stamps them on the resources it builds, and
`fhir_profiles/tools/terminology.py` generates the FSH CodeSystems and ValueSets from the same
functions, so the published codes cannot drift from the service's own grades, schemes and events.

Canonical URLs are `<base>/<ResourceType>/<id>`. The JSON in fhir_profiles/generated/ is built
with DEFAULT_BASE; at run time the service uses `alerts.canonical_base`, so a deployment that sets
its own base claims the same profiles under its own URLs (validate.mjs --canonical-base rewrites
the JSON the same way).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from service.core.episodes import EventKind
from service.core.grading import BUILT_IN, Band, Scheme

DEFAULT_BASE = "https://neutrowatch.example.org/fhir"

# StructureDefinition ids (fhir_profiles/input/fsh/*.fsh `Id:`)
FLAG_PROFILE = "neutrowatch-flag"
COMMUNICATION_PROFILE = "neutrowatch-communication"
PROVENANCE_PROFILE = "neutrowatch-provenance"
ANC_EXTENSION = "neutrowatch-anc"
GRADE_EXTENSION = "neutrowatch-grade"
SCHEME_EXTENSION = "neutrowatch-grading-scheme"
EVENT_EXTENSION = "neutrowatch-alert-event"
SOFTWARE_EXTENSION = "neutrowatch-software-version"
# CodeSystem and ValueSet ids (the same id for a CodeSystem and the ValueSet of all its codes)
GRADE_SYSTEM = "neutrowatch-grade"
SCHEME_SYSTEM = "neutrowatch-grading-scheme"
EVENT_SYSTEM = "neutrowatch-alert-event"

UCUM = "http://unitsofmeasure.org"
ANC_UNIT = "cells/uL"
ANC_CODE = "/uL"

# Severities as the service names them (event `grade`), the parents of each scheme's own grades.
SEVERITY_DISPLAY = {
    "mild": "Mild neutropenia",
    "moderate": "Moderate neutropenia",
    "severe": "Severe neutropenia",
    None: "No neutropenia",
}
NORMAL = "normal"  # the code of the severity None

SCHEME_DISPLAY = {
    "default": "neutrowatch default bands (mild, moderate, severe)",
    "ctcae-v5": "CTCAE v5.0 Neutrophil count decreased",
    "ctcae-v6": "CTCAE v6.0 Neutrophil count decreased",
}

EVENT_DISPLAY: dict[EventKind, tuple[str, str]] = {
    EventKind.NEW: (
        "New neutropenia",
        "A neutropenia episode opened: the first neutropenic ANC after none or a resolved episode.",
    ),
    EventKind.WORSENING: (
        "Neutropenia worsening",
        "An open episode reached a grade worse than any already announced in it.",
    ),
    EventKind.RESOLVED: ("Neutropenia resolved", "The ANC is back in the normal range; the episode closed."),
    EventKind.CHRONIC: ("Chronic neutropenia", "The episode has been open for more than 3 months."),
    EventKind.FEBRILE: (
        "Febrile neutropenia",
        "A fever within 24 h of an ANC < 500/uL, or of an ANC < 1000/uL expected to fall.",
    ),
    EventKind.RETRACTED: (
        "Alert withdrawn",
        "An earlier announcement no longer holds: a result it rested on was corrected or withdrawn.",
    ),
    EventKind.RECOVERING: (
        "Neutropenia recovering",
        "A normal ANC in an open episode, not yet confirmed by enough normal panels in a row "
        "(or a recovery ended by a neutropenic one): the Flag is updated, no Communication.",
    ),
    EventKind.RECURRENCE: (
        "Neutropenia recurrence",
        "A neutropenic ANC soon after an announced resolution: the same episode re-opens.",
    ),
}


def canonical(base: str, resource_type: str, ident: str) -> str:
    return f"{base}/{resource_type}/{ident}"


def profile_url(base: str, ident: str) -> str:
    return canonical(base, "StructureDefinition", ident)


def system_url(base: str, ident: str) -> str:
    return canonical(base, "CodeSystem", ident)


def _slug(text: str) -> str:
    return "-".join(text.lower().replace("/", " ").split())


def severity_code(severity: str | None) -> str:
    return severity if severity is not None else NORMAL


def grade_code(scheme: str, band: Band) -> str:
    """The code of a scheme's own grade, e.g. ("ctcae-v5", grade 3) -> "ctcae-v5-grade-3"."""
    return f"{scheme}-{_slug(band.label)}"


def grade_display(scheme: str, band: Band) -> str:
    return f"{scheme} {band.label}"


def base_scheme(scheme: Scheme) -> str:
    """The built-in scheme a (possibly per-patient, `with_threshold`) scheme derives from."""
    return scheme.name.split(",", 1)[0]


@dataclass(frozen=True, slots=True)
class GradeConcept:
    code: str
    display: str
    definition: str
    severity: str  # the parent concept
    scheme: str
    rank: int
    below: float | None  # exclusive upper bound in cells/uL (None: unbounded or the LLN)
    below_lln: bool


def _definition(scheme: Scheme, index: int) -> str:
    band = scheme.bands[index]
    lower = next(
        (b.below for b in reversed(scheme.bands[:index]) if b.below is not None and not b.below_lln), None
    )
    at_least = f"ANC >= {lower:g} cells/uL" if lower is not None else "ANC >= 0 cells/uL"
    if band.below_lln:
        return (
            f"{at_least} and below the result's lower limit of normal (referenceRange.low), "
            f"{scheme.name} scheme."
        )
    if band.below is None:
        lln = (
            " and not below the result's lower limit of normal"
            if any(b.below_lln for b in scheme.bands)
            else ""
        )
        return f"{at_least}{lln} (not neutropenic), {scheme.name} scheme."
    return f"{at_least} and < {band.below:g} cells/uL, {scheme.name} scheme."


def grade_concepts() -> Iterator[GradeConcept]:
    """Every grade of every built-in scheme, in scheme order then worst first."""
    for scheme in BUILT_IN.values():
        for index, band in enumerate(scheme.bands):
            yield GradeConcept(
                grade_code(scheme.name, band),
                grade_display(scheme.name, band),
                _definition(scheme, index),
                severity_code(band.severity),
                scheme.name,
                band.rank,
                band.below,
                band.below_lln,
            )


def scheme_definition(scheme: Scheme) -> str:
    steps = [
        f"{b.label} < {'LLN' if b.below_lln else f'{b.below:g}'}"
        for b in reversed(scheme.bands)
        if b.severity
    ]
    return f"ANC bands in cells/uL: {', '.join(steps)}; otherwise {scheme.normal.label}."


@functools.cache
def software_version() -> str:
    """The installed neutrowatch distribution's version (Provenance.agent)."""
    try:
        return version("neutrowatch")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
