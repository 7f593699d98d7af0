"""What a resource read from the input or the server is to neutrowatch: one rule for replay (pass 1)
and the live loop (each search page).

* An Observation: `normalise` says a lab result or a temperature (`LabResult`), a rejection
  (`Rejected`), or not monitored (`Ignored`).
* An entry that could not be decoded: a rejection when it is (or may be) an Observation, else ignored.
* A DiagnosticReport: the panel membership of its results (`ReportMembers`, reference §1.2).
* A Patient, or a Condition, ServiceRequest or CareTeam of a patient on this server: a fact about
  that patient (`PatientFact`); a subject on another server gives none.
* Anything else: ignored, with a reason that names a type, never text of the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.core.observations import (
    DEFAULT_READ,
    Ignored,
    LabResult,
    ReadPolicy,
    Rejected,
    canonical_reference,
    literal_reference,
    normalise,
    undecodable_rejection,
)
from service.core.panels import Report, report_members
from service.fhir import model
from service.fhir.references import Resolved

CONTEXT_TYPES = ("Condition", "ServiceRequest", "CareTeam")  # facts about the patient they name as subject


@dataclass(frozen=True, slots=True)
class ReportMembers:
    """A DiagnosticReport's results: (Observation reference, what the report says of it)."""

    members: tuple[tuple[str, Report], ...]


@dataclass(frozen=True, slots=True)
class PatientFact:
    """A resource that says something of a patient: keyed by the patient's canonical reference."""

    patient: str
    resource: model.Resource


Triaged = LabResult | Rejected | Ignored | ReportMembers | PatientFact

_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


def resource_kind(resource_type: str) -> str:
    """A resourceType as a reason or a summary shows it: a type name, or "unknown type" (never text)."""
    return resource_type if _RESOURCE_TYPE.fullmatch(resource_type) else "unknown type"


def triage(item: model.Resource | model.Undecodable, policy: ReadPolicy = DEFAULT_READ) -> Triaged:
    """What `item` is (module docstring)."""
    if isinstance(item, model.Undecodable):
        if item.resource_type in (None, "Observation"):
            return undecodable_rejection(item, policy)
        return Ignored(f"undecodable {resource_kind(item.resource_type)}")
    kind = item.resourceType
    if kind == "Observation":
        return normalise(item, policy)
    if kind == "Patient" and item.id:
        return PatientFact(f"Patient/{item.id}", item)
    if kind in CONTEXT_TYPES and item.subject is not None and item.subject.reference:
        # Keyed by the patient's canonical reference, as its results are. A subject on another
        # server gives no facts: the live loop never looks a foreign patient up on its server.
        subject = canonical_reference(item.subject.reference, "Patient", policy)
        if isinstance(subject, Resolved) and not subject.foreign:
            return PatientFact(subject.key, item)
        return Ignored(f"{kind} of a patient not on the server")
    if kind == "DiagnosticReport" and item.id:
        specimens = item.specimen if isinstance(item.specimen, list) else ()
        return ReportMembers(
            tuple(
                report_members(
                    item.id,
                    (literal_reference(r.reference, policy) for r in item.result or ()),
                    (literal_reference(s.reference, policy) for s in specimens),
                )
            )
        )
    return Ignored(f"{resource_kind(kind) if kind else 'untyped'} not used")


def memberships(
    items: list[model.Resource | model.Undecodable], policy: ReadPolicy = DEFAULT_READ
) -> dict[str, Report]:
    """The DiagnosticReport membership of each Observation named by the reports among `items`: the
    first report naming it, in order (as replay keeps the first it reads)."""
    found: dict[str, Report] = {}
    for item in items:
        if isinstance(item, model.Resource) and item.resourceType == "DiagnosticReport":
            triaged = triage(item, policy)
            if isinstance(triaged, ReportMembers):
                for ref, report in triaged.members:
                    found.setdefault(ref, report)
    return found
