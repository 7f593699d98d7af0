"""The survey's counts: what a site's Observations look like to the service, built one resource at a
time (bounded memory apart from one set of kinds per panel). Pure: resources in, counts out.

Each Observation is counted under its coding that the `Classifier` knows, else its first coding.
Results of a monitored or mapped code, and those of a local code with a candidate (as if the
candidate were mapped, `as_if`), go through the core's own reading (`normalise`): its rejections,
with the core's reasons, are what would happen to them. Panels are grouped with the core's key
(specimen, else collection instant; DiagnosticReports are not read here).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import msgspec

from service.core.codes import LOINC, TERMS, Kind
from service.core.observations import (
    ASSESSED_STATUSES,
    DEFAULT_READ,
    LabResult,
    ReadPolicy,
    Rejected,
    canonical_reference,
    normalise,
)
from service.core.panels import panel_key
from service.fhir import model
from service.fhir.references import Resolved
from service.survey.candidates import Hint, hint
from service.survey.classifier import Classification, Classifier, builtin

_DIFFERENTIAL = frozenset(
    {Kind.NEUT_PCT, Kind.SEG_PCT, Kind.BAND_PCT, Kind.NEUT_ABS, Kind.SEG_ABS, Kind.BAND_ABS}
)
NO_UNIT = "(no unit)"
NO_STATUS = "(no status)"


@dataclass
class CodeCount:
    """The Observations of one (system, code, display)."""

    system: str | None
    code: str | None
    display: str | None
    standing: str  # monitored | mapped | unmonitored
    loinc: str | None  # the LOINC code it is or maps to (monitored, mapped)
    hint: Hint | None  # unmonitored: the likely term, or a caution
    count: int = 0
    units: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    beside_bands: int = 0  # panels where this neutrophil % stands beside a bands % (a manual differential?)


@dataclass
class PanelCounts:
    total: int = 0
    wbc_without_differential: int = 0
    differential_without_wbc: int = 0
    neutrophil_pct_beside_bands: int = 0


@dataclass
class Survey:
    """Counts of a survey; `add` each resource read, then `finish`."""

    classify: Classifier = builtin
    policy: ReadPolicy = DEFAULT_READ
    resources: int = 0
    observations: int = 0
    undecodable: int = 0
    other_types: Counter[str] = field(default_factory=Counter)
    codes: dict[tuple[str | None, str | None, str | None], CodeCount] = field(default_factory=dict)
    not_assessed: Counter[str] = field(default_factory=Counter)  # "status preliminary" -> results
    rejected: Counter[str] = field(
        default_factory=Counter
    )  # the core's reason -> results (monitored, mapped, as if)
    unresolved_references: Counter[str] = field(default_factory=Counter)
    temperatures_rejected: Counter[str] = field(default_factory=Counter)
    panels: PanelCounts = field(default_factory=PanelCounts)
    _members: dict[tuple[str, str], dict[Kind, list[CodeCount]]] = field(default_factory=dict)

    def add(self, item: model.Resource | model.Undecodable) -> None:
        self.resources += 1
        if isinstance(item, model.Undecodable):
            self.undecodable += 1
        elif item.resourceType == "Observation":
            self._observation(item)
        else:
            self.other_types[item.resourceType or "(untyped)"] += 1

    def _observation(self, resource: model.Resource) -> None:
        self.observations += 1
        counted, loinc = self._count(resource)
        if loinc is None:
            return
        as_read = resource if counted.standing == "monitored" else _with_loinc(resource, loinc)
        self._references(resource)
        outcome = normalise(as_read, self.policy)
        if isinstance(outcome, LabResult):
            self._result(outcome, counted)
        elif isinstance(outcome, Rejected):
            self.rejected[outcome.reason] += 1
            if outcome.reason.startswith("subject "):
                self.unresolved_references[outcome.reason] += 1
            if _is_temperature(loinc):
                self.temperatures_rejected[outcome.reason] += 1

    def _count(self, resource: model.Resource) -> tuple[CodeCount, str | None]:
        """The Observation counted under its code; the LOINC code it is read as (None: not read)."""
        codings = (
            resource.code.coding if resource.code is not None and resource.code.coding else [model.Coding()]
        )
        found: tuple[model.Coding, Classification] | None = None
        for coding in codings:
            known = self.classify(coding.system, coding.code)
            if known is not None:
                found = (coding, known)
                break
        coding = found[0] if found is not None else codings[0]
        q = resource.valueQuantity
        unit = (q.unit or q.code) if q is not None else None
        key = (coding.system, coding.code, coding.display)
        counted = self.codes.get(key)
        if counted is None:
            counted = self.codes[key] = _code_count(coding, found[1] if found else None, unit)
        counted.count += 1
        counted.units[unit or NO_UNIT] += 1
        counted.statuses[resource.status or NO_STATUS] += 1
        if counted.loinc is not None:
            return counted, counted.loinc
        candidate = counted.hint.candidate if counted.hint is not None else None
        return counted, candidate.loinc if candidate is not None else None

    def _references(self, resource: model.Resource) -> None:
        """References the core would drop without a word: a specimen that names nothing usable."""
        specimen = resource.specimen
        if isinstance(specimen, model.Reference) and specimen.reference:
            found = canonical_reference(specimen.reference, "Specimen", self.policy)
            if not isinstance(found, Resolved):
                self.unresolved_references["specimen " + found] += 1

    def _result(self, result: LabResult, counted: CodeCount) -> None:
        if result.status not in ASSESSED_STATUSES:
            self.not_assessed[f"status {result.status}"] += 1
            return
        if result.kind is Kind.TEMP or not result.assessable:
            return
        members = self._members.setdefault((result.patient, panel_key(result, None)), {})
        members.setdefault(result.kind, []).append(counted)

    def finish(self) -> Survey:
        """Judge the panels gathered (once, after the last `add`)."""
        for kinds in self._members.values():
            self.panels.total += 1
            differential = bool(kinds.keys() & _DIFFERENTIAL)
            if Kind.WBC in kinds and not differential:
                self.panels.wbc_without_differential += 1
            elif differential and Kind.WBC not in kinds:
                self.panels.differential_without_wbc += 1
            if Kind.NEUT_PCT in kinds and Kind.BAND_PCT in kinds:
                self.panels.neutrophil_pct_beside_bands += 1
                for counted in {id(c): c for c in kinds[Kind.NEUT_PCT]}.values():
                    counted.beside_bands += 1
        self._members.clear()
        return self


def _code_count(coding: model.Coding, known: Classification | None, unit: str | None) -> CodeCount:
    if known is not None:
        return CodeCount(coding.system, coding.code, coding.display, known.standing, known.loinc, None)
    return CodeCount(
        coding.system, coding.code, coding.display, "unmonitored", None, hint(coding.display, unit)
    )


def _with_loinc(resource: model.Resource, loinc: str) -> model.Resource:
    """The resource as the core would read it were its code mapped to `loinc`."""
    return msgspec.structs.replace(resource, code=model.CodeableConcept([model.Coding(LOINC, loinc)]))


def _is_temperature(loinc: str) -> bool:
    term = TERMS.get(loinc)
    return term is not None and term.kind is Kind.TEMP
