"""The terminology section: the site's ConceptMaps (files and server URLs) and local unit strings
(`terminology.*`)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator

from service.config.section import Section
from service.core.terminology import MapRow, Terminology, TerminologyError, build, concept_map_rows
from service.core.units import known_unit


class UnitMapping(Section):
    system: str = Field(
        min_length=1, description="The Quantity.system the site writes its unit strings under."
    )
    unit: str = Field(
        min_length=1, description="The unit string (Quantity.code, else Quantity.unit) as written."
    )
    ucum: str = Field(min_length=1, description="The UCUM code it means, e.g. 10*3/uL, [degF].")

    @field_validator("ucum")
    @classmethod
    def _known(cls, value: str) -> str:
        if not known_unit(value):
            raise ValueError(
                f"{value[:40]!r} is not a unit the service converts (docs/clinical-reference.md §2)"
            )
        return value


@lru_cache(maxsize=32)
def concept_map_file_rows(path: Path) -> tuple[MapRow, ...]:
    """The translating rows of one ConceptMap JSON file; ValueError naming the file and the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from None
    except ValueError:
        raise ValueError(f"{path}: not valid JSON") from None
    try:
        return tuple(concept_map_rows(data))
    except TerminologyError as err:
        raise ValueError(f"{path}: {err}") from None


class TerminologySettings(Section):
    concept_maps: tuple[Path, ...] = Field(
        (),
        description="FHIR R4 ConceptMap JSON files translating the site's local codes to LOINC (group.source "
        "the local system, group.target http://loinc.org; equivalence equivalent, equal, wider or subsumes "
        "translate, narrower, inexact, unmatched and disjoint do not). A mapped result is decided as its "
        "LOINC code.",
    )
    concept_map_urls: tuple[str, ...] = Field(
        (),
        description="Canonical URLs of ConceptMaps read from the FHIR server (ConceptMap?url=) at start-up "
        "and again every poll.context_ttl_seconds (live loop only; replay and explain use concept_maps).",
    )
    units: tuple[UnitMapping, ...] = Field(
        (),
        description="Local unit strings the built-in table does not know: each {system, unit, ucum}. A unit "
        "neither knows stays rejected.",
    )

    @field_validator("concept_maps")
    @classmethod
    def _readable(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        for path in value:
            concept_map_file_rows(path)  # ValueError naming the file: reported with the field's name
        return value

    def file_rows(self) -> list[MapRow]:
        return [row for path in self.concept_maps for row in concept_map_file_rows(path)]

    def terminology(self, server_rows: list[MapRow] | None = None) -> Terminology:
        """The site's terminology: the files' maps, plus the server's when the live loop has read them."""
        units = {(u.system, u.unit): u.ucum for u in self.units}
        return build([*self.file_rows(), *(server_rows or ())], units)
