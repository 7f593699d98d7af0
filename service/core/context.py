"""What is known about the patient beyond the panel — age and an individual threshold — and the
grading that follows from it. The edge gathers the facts (Patient.birthDate, active Conditions,
configuration); this module only decides.

Sources (reference §3, "Paediatrics" and "Duffy-null associated neutrophil count"): infants from
2 weeks to 1 year have a lower limit of 1000/mm3 (scilit "Clinical Disorders of Neutropenia");
neonates in their first week follow their own curves (Manroe, Mouzinho) and are out of scope; an
individual baseline (Duffy-null associated neutrophil count, chronic benign neutropenia) must come
from the patient's record or configuration, never from race or ethnicity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.core.grading import Scheme
from service.core.rules import DAY_US, Rules
from service.fhir.fhirtime import to_epoch_us
from service.fhir.model import Resource

CHRONIC_BENIGN_NEUTROPENIA = "234423001"  # SNOMED CT, Chronic benign neutropenia (disorder)


@dataclass(frozen=True, slots=True)
class PatientContext:
    birth_us: int | None = None  # Patient.birthDate, as an instant
    threshold: float | None = None  # individual neutropenia threshold (cells/uL)
    threshold_source: str | None = None  # e.g. "config", "Condition 234423001"


@dataclass(frozen=True, slots=True)
class Grading:
    scheme: Scheme | None  # None: the patient is out of scope at this time
    rule: str  # the threshold rule that applied, for the event
    reason: str | None = None  # why not assessed


def grading_for(rules: Rules, context: PatientContext, effective_us: int) -> Grading:
    if context.birth_us is not None:
        age_days = (effective_us - context.birth_us) / DAY_US
        if 0 <= age_days < rules.neonate_days:
            return Grading(
                None,
                "neonate",
                f"neonate in the first {rules.neonate_days} days of life: out of scope, not assessed",
            )
    if context.threshold is not None:
        return Grading(
            rules.scheme.with_threshold(context.threshold),
            f"individual threshold {context.threshold:g} ({context.threshold_source})",
        )
    if context.birth_us is not None:
        age_days = (effective_us - context.birth_us) / DAY_US
        if rules.neonate_days <= age_days < rules.infant_until_days:
            return Grading(
                rules.scheme.with_threshold(rules.infant_threshold),
                f"infant threshold {rules.infant_threshold:g}",
            )
    return Grading(rules.scheme, "scheme")


# -- facts from FHIR resources (the edge fetches them; these only read) ------------------------------

_ACTIVE = {"active", "recurrence", "relapse"}
_NOT_TRUE = {"refuted", "entered-in-error"}


def birth_us(patient: Resource | None) -> int | None:
    if patient is None or not patient.birthDate:
        return None
    try:
        return to_epoch_us(patient.birthDate)
    except ValueError:
        return None


def _codes(concept: object) -> set[str]:
    coding = getattr(concept, "coding", None) or ()
    return {c.code for c in coding if c.code}


def has_chronic_benign_neutropenia(conditions: Iterable[Resource]) -> bool:
    """An active, not refuted Condition 234423001 (SNOMED CT) on the patient."""
    for c in conditions:
        if c.resourceType != "Condition" or CHRONIC_BENIGN_NEUTROPENIA not in _codes(c.code):
            continue
        if _codes(c.clinicalStatus) & _ACTIVE and not _codes(c.verificationStatus) & _NOT_TRUE:
            return True
    return False


def patient_context(
    patient_ref: str, patient: Resource | None, conditions: Iterable[Resource], rules: Rules
) -> PatientContext:
    """Configuration names individual thresholds first; else an active chronic benign neutropenia
    Condition with the site's configured threshold. Race and ethnicity are never read."""
    born = birth_us(patient)
    configured = dict(rules.patient_thresholds)
    if patient_ref in configured:
        return PatientContext(born, configured[patient_ref], "config")
    if rules.chronic_benign_threshold is not None and has_chronic_benign_neutropenia(conditions):
        return PatientContext(born, rules.chronic_benign_threshold, f"Condition {CHRONIC_BENIGN_NEUTROPENIA}")
    return PatientContext(born)


def requester(service_request: Resource | None) -> str | None:
    if service_request is None or service_request.requester is None:
        return None
    return service_request.requester.reference


def care_team_members(teams: Iterable[Resource]) -> list[str]:
    return [
        p.member.reference
        for t in teams
        if t.status in (None, "active")
        for p in t.participant or ()
        if p.member is not None and p.member.reference
    ]
