"""Site terminology: a local code translated to the LOINC code it means, by the site's FHIR ConceptMaps,
and a local unit string to its UCUM code (docs/clinical-reference.md §11).

A ConceptMap group whose `target` is LOINC maps each `element.code` of its `source` system to each
`target.code` whose `equivalence` says the LOINC term covers the local one (equivalent, equal, wider,
subsumes: FHIR R4 valueset-concept-map-equivalence). Narrower, inexact, unmatched and disjoint targets
are not translations: a result that would be decided on a narrower or a disjoint meaning is not
monitored at all. Pure: the maps arrive as JSON already read (config files or the server's
`ConceptMap?url=`); nothing here reads a file or the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B.conceptmap import ConceptMap
from pydantic import ValidationError

LOINC = "http://loinc.org"
TRANSLATING = frozenset({"equivalent", "equal", "wider", "subsumes"})


class TerminologyError(ValueError):
    """A ConceptMap that cannot be used (not a ConceptMap, or not valid FHIR R4)."""


@dataclass(frozen=True, slots=True)
class Translation:
    """The LOINC code a local coding means, and the ConceptMap that says so."""

    loinc: str
    concept_map: str  # the map's canonical url (else its id, else "ConceptMap")


@dataclass(frozen=True, slots=True, eq=False)
class Terminology:
    """The site's translations: (system, code) -> LOINC, and (system, unit string) -> UCUM code.
    A local code with two translations to different LOINC codes is kept as a conflict (`conflicts`):
    such a result is rejected, never decided on one of the two meanings."""

    codes: Mapping[tuple[str, str], Translation] = field(default_factory=dict)
    conflicts: frozenset[tuple[str, str]] = frozenset()
    units: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def translate(self, system: str | None, code: str | None) -> Translation | None:
        """The translation of one coding, None when no map covers it."""
        if system is None or code is None:
            return None
        return self.codes.get((system, code))

    def conflicting(self, system: str | None, code: str | None) -> bool:
        return system is not None and code is not None and (system, code) in self.conflicts

    def ucum(self, system: str | None, unit: str | None) -> str | None:
        """The UCUM code configured for a local unit string, None when none is."""
        if system is None or unit is None:
            return None
        return self.units.get((system, unit))

    def local_codes(self) -> list[tuple[str, str, str]]:
        """(system, code, LOINC) of every translation, sorted (the live search asks for them)."""
        return sorted((system, code, t.loinc) for (system, code), t in self.codes.items())


NO_TERMINOLOGY = Terminology()


@dataclass(frozen=True, slots=True)
class MapRow:
    system: str
    code: str
    loinc: str
    concept_map: str


def concept_map_rows(resource: Mapping[str, Any]) -> list[MapRow]:
    """The translating rows of one ConceptMap (FHIR R4 JSON). Raises TerminologyError naming what
    is wrong (never the content: a map is configuration, but a wrong file could be anything)."""
    if not isinstance(resource, Mapping) or resource.get("resourceType") != "ConceptMap":
        raise TerminologyError("not a ConceptMap resource")
    try:
        parsed = ConceptMap.model_validate(dict(resource))
    except ValidationError as err:
        where = ".".join(str(p) for p in err.errors()[0]["loc"]) if err.errors() else "?"
        raise TerminologyError(
            f"not a valid FHIR ConceptMap ({err.error_count()} problem(s), first at {where})"
        ) from None
    name = parsed.url or (f"ConceptMap/{parsed.id}" if parsed.id else "ConceptMap")
    rows: list[MapRow] = []
    for group in parsed.group or ():
        if group.target != LOINC or not group.source:
            continue
        for element in group.element or ():
            for target in element.target or ():
                if element.code and target.code and target.equivalence in TRANSLATING:
                    rows.append(MapRow(group.source, element.code, target.code, name))
    return rows


def build(rows: Iterable[MapRow], units: Mapping[tuple[str, str], str] | None = None) -> Terminology:
    """One Terminology from the rows of every map: a local code translated to two different LOINC
    codes (by one map or by two) is a conflict; the same translation twice is one."""
    codes: dict[tuple[str, str], Translation] = {}
    conflicts: set[tuple[str, str]] = set()
    for row in rows:
        key = (row.system, row.code)
        known = codes.get(key)
        if known is None:
            codes[key] = Translation(row.loinc, row.concept_map)
        elif known.loinc != row.loinc:
            conflicts.add(key)
    for key in conflicts:
        del codes[key]
    return Terminology(codes, frozenset(conflicts), dict(units or {}))
