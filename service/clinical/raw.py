"""The subset of FHIR R4 the core reads, as msgspec Structs.

Incoming data is decoded straight into these (unknown fields are skipped in C), which is ~10×
cheaper than building full `fhir.resources` models. Full models are used only for what the service
writes. A line that does not fit these types is not dropped: `decode` says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import orjson


class Coding(msgspec.Struct, frozen=True, gc=False):
    system: str | None = None
    code: str | None = None


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


_decoder = msgspec.json.Decoder(Resource)


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= 256 else None


def _undecodable(obj: Any, reason: str) -> Undecodable:
    if not isinstance(obj, dict):
        return Undecodable(reason)
    subject = obj.get("subject")
    return Undecodable(
        reason,
        resource_type=_str_or_none(obj.get("resourceType")),
        id=_str_or_none(obj.get("id")),
        subject=_str_or_none(subject.get("reference")) if isinstance(subject, dict) else None,
    )


def _from_object(obj: Any) -> Iterator[Resource | Undecodable]:
    """Convert one parsed JSON value; a Bundle is converted entry by entry so one bad entry
    does not take its neighbours with it."""
    if not isinstance(obj, dict):
        yield Undecodable(f"not a FHIR resource (a JSON {type(obj).__name__})")
        return
    if obj.get("resourceType") == "Bundle" and isinstance(obj.get("entry"), list):
        for item in obj["entry"]:
            resource = item.get("resource") if isinstance(item, dict) else None
            if resource is not None:
                yield from _from_object(resource)
        return
    try:
        yield msgspec.convert(obj, Resource)
    except msgspec.ValidationError as err:
        yield _undecodable(obj, f"malformed: {_first_line(err)}")
    except RecursionError:
        yield _undecodable(obj, "malformed: nested too deeply")


def flatten(resource: Resource) -> Iterator[Resource]:
    """A resource, or the resources of a Bundle (nested Bundles included)."""
    if resource.resourceType == "Bundle":
        for entry in resource.entry or ():
            if entry.resource is not None:
                yield from flatten(entry.resource)
    else:
        yield resource


def decode(data: bytes | str) -> Iterator[Resource | Undecodable]:
    """Decode one JSON document (an NDJSON line, a Bundle or a single resource)."""
    try:
        resource = _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        pass
    else:
        if resource.resourceType == "Bundle":
            yield from flatten(resource)
        else:
            yield resource
        return
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        yield Undecodable(f"invalid JSON: {_first_line(err)}")
        return
    except RecursionError:
        yield Undecodable("invalid JSON: nested too deeply")
        return
    yield from _from_object(obj)


def convert(obj: Any) -> Iterator[Resource | Undecodable]:
    """The same as `decode` for JSON already parsed into Python objects."""
    yield from _from_object(obj)
