"""The subset of FHIR R4 the core reads, as msgspec Structs.

Incoming data is decoded straight into these (unknown fields are skipped in C), which is ~10×
cheaper than building full `fhir.resources` models. Full models are used only for what the service
writes. Reading text into them, damaged or not, is service/fhir/raw.py.
"""

from __future__ import annotations

from typing import Any

import msgspec

# A FHIR resource (or Bundle entry) as JSON, where the service passes it on or builds it for the
# server rather than reading it into the Structs below: what the client sends and receives
# verbatim, and the Flags, Communications and Provenance the output builders write (validated
# with the fhir.resources models). Its schema is FHIR's, not ours, so it stays a JSON object.
FhirJson = dict[str, Any]


class Coding(msgspec.Struct, frozen=True, gc=False):
    system: str | None = None
    code: str | None = None
    display: str | None = None  # never matched on (reference §1.1); `survey` shows it to a person


class CodeableConcept(msgspec.Struct, frozen=True, gc=False):
    coding: list[Coding] | None = None


class Reference(msgspec.Struct, frozen=True, gc=False):
    reference: str | None = None


class Quantity(msgspec.Struct, frozen=True, gc=False):
    value: float | None = None
    comparator: str | None = None
    unit: str | None = None
    system: str | None = None
    code: str | None = None


class Range(msgspec.Struct, frozen=True, gc=False):
    low: Quantity | None = None
    high: Quantity | None = None


class Period(msgspec.Struct, frozen=True, gc=False):
    start: str | None = None
    end: str | None = None


class Meta(msgspec.Struct, frozen=True, gc=False):
    versionId: str | None = None
    lastUpdated: str | None = None


class Link(msgspec.Struct, frozen=True, gc=False):
    relation: str | None = None
    url: str | None = None


class Participant(msgspec.Struct, frozen=True, gc=False):
    member: Reference | None = None


class Entry(msgspec.Struct, frozen=True, gc=False):
    fullUrl: str | None = None
    resource: Resource | None = None


class Resource(msgspec.Struct, frozen=True, gc=False):
    """Fields of Observation, DiagnosticReport, Patient, Condition, ServiceRequest, CareTeam and
    Bundle that the service reads."""

    resourceType: str = ""
    id: str | None = None
    meta: Meta | None = None
    status: str | None = None
    code: CodeableConcept | None = None
    subject: Reference | None = None
    # Observation.specimen is one Reference, DiagnosticReport.specimen a list.
    specimen: Reference | list[Reference] | None = None
    effectiveDateTime: str | None = None
    effectiveInstant: str | None = None
    effectivePeriod: Period | None = None
    issued: str | None = None
    valueQuantity: Quantity | None = None
    valueString: str | None = None
    valueCodeableConcept: CodeableConcept | None = None
    valueInteger: int | None = None
    dataAbsentReason: CodeableConcept | None = None
    referenceRange: list[Range] | None = None
    basedOn: list[Reference] | None = None
    result: list[Reference] | None = None
    hasMember: list[Reference] | None = None
    birthDate: str | None = None  # Patient
    clinicalStatus: CodeableConcept | None = None  # Condition
    verificationStatus: CodeableConcept | None = None  # Condition
    requester: Reference | None = None  # ServiceRequest
    participant: list[Participant] | None = None  # CareTeam
    entry: list[Entry] | None = None
    link: list[Link] | None = None  # Bundle.link (paging)
    total: int | None = None  # Bundle.total


class Undecodable(msgspec.Struct, frozen=True):
    """A line or resource that could not be read into `Resource`: kept with its reason."""

    reason: str
    resource_type: str | None = None
    id: str | None = None
    subject: str | None = None
