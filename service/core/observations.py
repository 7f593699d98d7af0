"""Observation -> LabResult (a value in a canonical unit) or Rejected (with a reason).

Rules: docs/clinical-reference.md §1.1 (codes; never match on display text), §1.5
(Observation.status), §2 (units, comparator, dataAbsentReason, valueString).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import cast

import msgspec

from service.core.codes import LOINC, NOT_NEUTROPHILS, TERMS, Kind, Prop, Term
from service.core.terminology import NO_TERMINOLOGY, Terminology, Translation
from service.core.units import UCUM, UnitError, to_canonical
from service.fhir.fhirtime import CollectionTime, TimeError, collection_time, instant_us
from service.fhir.model import Quantity, Resource, Undecodable
from service.fhir.raw import fhir_id
from service.fhir.references import Resolved, resolve

LOINC_OID = "urn:oid:2.16.840.1.113883.6.1"

STATUSES = frozenset(
    {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
)
ASSESSED_STATUSES = frozenset({"final", "amended", "corrected"})
_VALUELESS_STATUSES = frozenset({"registered", "cancelled", "entered-in-error", "unknown"})
_AT_MOST = frozenset({"<", "<="})
_LOWER_BOUND = frozenset({">", ">=", "ad"})
_DATE_LIKE = re.compile(r"[0-9TZ:+\-.]{1,40}")
_SHOWN_CODE = re.compile(r"[A-Za-z0-9\-._]{1,40}")  # what a reason repeats of a code
MAX_BASED_ON = 32  # orders named by one result (recipients); more is junk, not clinical information


@dataclass(frozen=True, slots=True)
class ReadPolicy:
    """What the site says about how its data is written, built from the configuration at the edge and
    handed to `normalise` by replay and the live loop alike."""

    local_timezone: str | None = None  # IANA zone of collection times written without an offset
    # The base of the server the resources come from (live: fhir.base_url; replay: fhir.base_url when
    # configured, else None): an absolute reference under it is the relative one.
    base_url: str | None = None
    # Other servers whose references are identities (a federated setup); any other server's are refused.
    accepted_foreign_bases: tuple[str, ...] = ()
    # The site's ConceptMaps and unit strings (terminology.*): a mapped local coding reads as its LOINC one.
    terminology: Terminology = NO_TERMINOLOGY


DEFAULT_READ = ReadPolicy()


def canonical_reference(
    ref: str | None, resource_type: str | None, policy: ReadPolicy = DEFAULT_READ
) -> Resolved | str:
    """The one canonicalisation of references (service/fhir/references.py), with the site's bases: the
    canonical reference, or the reason (a phrase after the element's name) it names nothing usable.
    Intake (subject, basedOn, specimen), replay's context rows and the live look-ups all use it, so
    one resource is one key whichever way it is written."""
    return resolve(ref, resource_type, policy.base_url, policy.accepted_foreign_bases)


def literal_reference(ref: str | None, policy: ReadPolicy = DEFAULT_READ) -> str | None:
    """The canonical key of a literal reference ("Type/<FHIR id>" on the service's server, absolute
    on an accepted foreign one), else None. A contained reference ("#s1") names something inside one
    resource only, so it cannot join two results into a panel; a reference to another server is not
    to the local resource of the same id; free text is not a reference."""
    found = canonical_reference(ref, None, policy)
    return found.key if isinstance(found, Resolved) else None


def version_number(version: str | None) -> int:
    """A numeric meta.versionId as a number for ordering versions; -1 when absent or not numeric
    (some servers use UUIDs: then meta.lastUpdated alone orders the versions)."""
    return int(version) if version is not None and version.isdigit() and len(version) < 18 else -1


class LabResult(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One Observation version, its value in the canonical unit of its property
    (cells/uL, percent, g/dL, Celsius). `value` is None only for statuses that carry none."""

    ref: str  # "Observation/<id>"
    version: str | None
    patient: str  # the patient's key: the subject's canonical reference (`canonical_reference`)
    code: str  # the LOINC code that matched
    kind: Kind
    method: str
    status: str
    value: float | None
    at_most: bool  # comparator "<" or "<=": the true value is at most `value`
    effective: str  # collection time as given
    effective_us: int
    updated_us: int | None  # meta.lastUpdated (server time)
    specimen: str | None
    ref_low: (
        float | None
    )  # referenceRange.low in the canonical unit (absolute neutrophil terms only: the LLN)
    based_on: tuple[str, ...] = ()
    time_note: str | None = None  # the collection time had no offset and was read in the site's timezone
    mapped_from: str | None = None  # "system|code" of the local coding `code` was translated from
    concept_map: str | None = None  # the ConceptMap that translated it

    @property
    def assessable(self) -> bool:
        return self.status in ASSESSED_STATUSES and self.value is not None


class Rejected(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """An Observation that matched a monitored code but cannot be used. Never alerts."""

    reason: str
    ref: str | None = None
    version: str | None = None
    patient: str | None = None
    code: str | None = None
    effective: str | None = None
    updated_us: int | None = None
    mapped_from: str | None = None  # as LabResult.mapped_from: `code` was translated from this local coding
    concept_map: str | None = None


class Ignored(msgspec.Struct, frozen=True, gc=False):
    """An Observation outside the monitored codes (counted, not reported)."""

    reason: str


CONFLICT = (
    "conflicting copies of one version (same id, versionId and lastUpdated, other content): none is used"
)


def conflict_rejection(outcome: LabResult | Rejected) -> Rejected:
    """One of several copies of an Observation version that do not read alike: none is used
    (clinical.copies)."""
    return Rejected(
        CONFLICT,
        outcome.ref,
        outcome.version,
        outcome.patient,
        outcome.code,
        outcome.effective,
        outcome.updated_us,
        outcome.mapped_from,
        outcome.concept_map,
    )


NOT_MONITORED = Ignored("code not monitored")
GRANULOCYTES = Ignored("granulocyte count is not an ANC")


@dataclass(frozen=True, slots=True)
class _Mapped:
    """A monitored term reached through the site's ConceptMap from a local coding."""

    term: Term
    source: str  # "system|code"
    concept_map: str


def _loinc_term(resource: Resource) -> Term | Ignored | str:
    coding = resource.code.coding if resource.code is not None else None
    found: Term | None = None
    granulocytes = False
    for c in coding or ():
        if c.system != LOINC and c.system != LOINC_OID:
            continue
        code = c.code or ""
        term = TERMS.get(code)
        if term is None and code.strip() in TERMS:
            # Not a FHIR code (no leading or trailing whitespace, datatypes §code): visible, not silent.
            return f"code {code.strip()} has surrounding whitespace"
        if term is None:
            granulocytes = granulocytes or code in NOT_NEUTROPHILS
            continue
        if found is not None and found.kind is not term.kind:
            return f"conflicting LOINC codes {found.code} and {term.code}"
        if found is None:
            found = term
    if found is not None:
        return found
    return GRANULOCYTES if granulocytes else NOT_MONITORED


def _translated(resource: Resource, terminology: Terminology) -> list[tuple[str, Translation]] | str:
    """The site's translations of the non-LOINC codings ("system|code", translation), or the reason
    a local code cannot be read (mapped to two different LOINC codes)."""
    found: list[tuple[str, Translation]] = []
    for c in (resource.code.coding if resource.code is not None else None) or ():
        if c.system == LOINC or c.system == LOINC_OID:
            continue
        if terminology.conflicting(c.system, c.code):
            return f"local code {_shown(c.code)} is mapped to more than one LOINC code"
        translation = terminology.translate(c.system, c.code)
        if translation is not None:
            found.append((f"{c.system}|{c.code}", translation))
    return found


def _shown(code: str | None) -> str:
    return code if code and _SHOWN_CODE.fullmatch(code) else "…"


def _term(resource: Resource, terminology: Terminology) -> Term | _Mapped | Ignored | str:
    """The monitored term of the result: by its LOINC codings, else by the site's translation of a
    local one. A LOINC coding and a translated local coding that name different LOINC codes, or two
    local codings translated to different codes, disagree: rejected, never decided on either."""
    loinc = _loinc_term(resource)
    if not terminology.codes and not terminology.conflicts:
        return loinc
    translated = _translated(resource, terminology)
    if isinstance(translated, str):
        return translated
    if not translated:
        return loinc
    assert resource.code is not None  # `translated` is not empty: the resource has codings
    given = {c.code for c in resource.code.coding or () if c.system in (LOINC, LOINC_OID)}
    targets = {t.loinc for _, t in translated}
    if len(targets) > 1 or (given and not targets <= given):
        source, odd = next(((s, t) for s, t in translated if given and t.loinc not in given), translated[0])
        return (
            f"local code {_shown(source.rsplit('|', 1)[1])} is mapped to LOINC {odd.loinc}, "
            "which disagrees with its other codings"
        )
    if given:
        return loinc  # the LOINC coding itself says the same
    source, translation = translated[0]
    term = TERMS.get(translation.loinc)
    if term is None:
        return GRANULOCYTES if translation.loinc in NOT_NEUTROPHILS else NOT_MONITORED
    return _Mapped(term, source, translation.concept_map)


def _patient(resource: Resource, policy: ReadPolicy) -> Resolved | str:
    """The subject as the patient's identity, or the reason it is none ("subject is on another
    server", "subject is a contained reference ...", "subject is not a Patient reference")."""
    found = canonical_reference(
        resource.subject.reference if resource.subject is not None else None, "Patient", policy
    )
    return found if isinstance(found, Resolved) else "subject " + found


def undecodable_rejection(item: Undecodable, policy: ReadPolicy = DEFAULT_READ) -> Rejected:
    """A line or entry that could not be decoded, kept as a rejection with what could be read of it
    (a FHIR id and the patient's key when its subject names one, nothing else)."""
    ref = f"Observation/{item.id}" if fhir_id(item.id) else None
    found = canonical_reference(item.subject, "Patient", policy)
    return Rejected(item.reason, ref, None, found.key if isinstance(found, Resolved) else None)


def _effective(resource: Resource) -> str | None:
    if resource.effectiveDateTime:
        return resource.effectiveDateTime
    if resource.effectiveInstant:
        return resource.effectiveInstant
    if resource.effectivePeriod is not None:
        return resource.effectivePeriod.start
    return None


def _instant(text: str | None) -> int | None:
    """meta.lastUpdated as a FHIR instant, None when absent or not one."""
    return _instant_of(text) if text else None


@functools.lru_cache(maxsize=8192)  # the members of a panel share their strings
def _instant_of(text: str) -> int | None:
    try:
        return instant_us(text)
    except TimeError:
        return None


@functools.lru_cache(maxsize=8192)
def _collection(text: str, local_timezone: str | None) -> CollectionTime | str:
    """The collection time, or the reason it is not one (cached like `_instant`)."""
    try:
        return collection_time(text, local_timezone)
    except TimeError as err:
        return str(err)


def _canonical(term: Term, q: Quantity, value: float, terminology: Terminology = NO_TERMINOLOGY) -> float:
    """The value in the canonical unit of the term; a local unit string the site maps to UCUM
    (terminology.units) is read as that UCUM code."""
    ucum = (
        terminology.ucum(q.system, q.code) or terminology.ucum(q.system, q.unit)
        if terminology.units
        else None
    )
    if ucum is not None:
        return to_canonical(term.prop, value, unit=None, system=UCUM, code=ucum)
    return to_canonical(term.prop, value, unit=q.unit, system=q.system, code=q.code)


def _check_value(term: Term, value: float) -> str | None:
    if not math.isfinite(value):
        return "value is not a finite number"
    if value < 0:
        return "negative value"
    if term.prop in (Prop.PERCENT, Prop.FRACTION) and value > 100.0:
        return "percentage above 100"
    if term.prop is Prop.TEMP and not 25.0 <= value <= 46.0:
        return "temperature outside 25-46 Cel"
    return None


def normalise(resource: Resource, policy: ReadPolicy = DEFAULT_READ) -> LabResult | Rejected | Ignored:
    """Read one Observation. Never raises for any `Resource` value."""
    if resource.resourceType != "Observation":
        return Ignored("not an Observation")
    found = _term(resource, policy.terminology)
    if isinstance(found, Ignored):
        return found
    term = found.term if isinstance(found, _Mapped) else found
    mapped_from, concept_map = (
        (found.source, found.concept_map) if isinstance(found, _Mapped) else (None, None)
    )
    meta = resource.meta
    raw_version = meta.versionId if meta is not None else None
    version = fhir_id(raw_version)
    updated_us = _instant(meta.lastUpdated) if meta is not None else None
    ref = f"Observation/{resource.id}" if fhir_id(resource.id) else None
    subject = _patient(resource, policy)
    patient = subject.key if isinstance(subject, Resolved) else None
    effective = _effective(resource)
    when = _collection(effective, policy.local_timezone) if effective else None
    status = resource.status
    if isinstance(term, str):
        reason: str | None = term
    elif ref is None:
        reason = "no id" if resource.id is None else "id is not a FHIR id"
    elif raw_version is not None and version is None:
        reason = "meta.versionId is not a FHIR id"
    elif isinstance(subject, str):
        reason = subject
    elif status not in STATUSES:
        reason = "unknown status"
    elif effective is None:
        reason = "no effective time"
    elif isinstance(when, str):
        reason = when
    else:
        reason = None
    if reason is None:
        # every reason above is None here: the term is a Term, the ids, the status and the
        # collection time are all present (the casts only tell mypy so)
        term_ = cast(Term, term)
        when_ = cast(CollectionTime, when)
        status_ = cast(str, status)
        value = _value(term_, resource, status_, policy.terminology)
        if not isinstance(value, str):
            specimen = resource.specimen
            return LabResult(
                cast(str, ref),
                version,
                cast(str, patient),
                term_.code,
                term_.kind,
                term_.method.value,
                status_,
                value[0],
                value[1],
                when_.text,
                when_.us,
                updated_us,
                literal_reference(specimen.reference, policy)
                if isinstance(specimen, msgspec.Struct)
                else None,
                _reference_low(term_, resource, policy.terminology)
                if term_.kind is Kind.NEUT_ABS and value[0] is not None
                else None,
                _based_on(resource, policy),
                when_.note,
                mapped_from,
                concept_map,
            )
        reason = value
    code = term.code if isinstance(term, Term) else None
    # A rejection keeps only what identifies the result: a collection time that is not one is kept
    # only when it is made of what dateTimes are made of (it is stored and written to the events:
    # never free text).
    shown = effective if effective and _DATE_LIKE.fullmatch(effective) else None
    return Rejected(reason, ref, version, patient, code, shown, updated_us, mapped_from, concept_map)


def _based_on(resource: Resource, policy: ReadPolicy) -> tuple[str, ...]:
    """The orders a result names, canonical; those that name nothing usable are left out."""
    keys = (literal_reference(r.reference, policy) for r in (resource.basedOn or ())[:MAX_BASED_ON])
    return tuple(k for k in keys if k is not None)


def _value(
    term: Term, resource: Resource, status: str, terminology: Terminology = NO_TERMINOLOGY
) -> tuple[float | None, bool] | str:
    """(value in the canonical unit, at_most), or the reason there is no usable value."""
    q = resource.valueQuantity
    if resource.dataAbsentReason is not None and (
        q is not None
        or resource.valueString is not None
        or resource.valueCodeableConcept is not None
        or resource.valueInteger is not None
    ):
        return "value given together with dataAbsentReason (FHIR obs-6)"
    if q is None or q.value is None:
        if status in _VALUELESS_STATUSES:
            return None, False
        if resource.dataAbsentReason is not None:
            codes = [c.code for c in resource.dataAbsentReason.coding or () if c.code]
            shown = codes[0] if codes and _SHOWN_CODE.fullmatch(codes[0]) else "given"
            return f"no value (dataAbsentReason {shown})"
        if resource.valueString is not None:
            return "value is text (valueString); needs manual review"
        if resource.valueCodeableConcept is not None or resource.valueInteger is not None:
            return "value is not a Quantity"
        return "no value"
    if q.comparator is not None and q.comparator not in _AT_MOST:
        if q.comparator in _LOWER_BOUND:
            return f"comparator '{q.comparator}' gives only a lower bound"
        return "comparator is not one of <, <=, >=, >, ad"
    try:
        value = _canonical(term, q, q.value, terminology)
    except UnitError as err:
        return f"{err} for LOINC {term.code}"
    except OverflowError:
        return "value is not a finite number"
    return _check_value(term, value) or (value, q.comparator is not None)


def _reference_low(term: Term, resource: Resource, terminology: Terminology = NO_TERMINOLOGY) -> float | None:
    for rr in resource.referenceRange or ():
        low = rr.low
        if low is None or low.value is None:
            continue
        try:
            value = _canonical(term, low, low.value, terminology)
        except (UnitError, OverflowError):
            return None
        return value if math.isfinite(value) and value >= 0 else None
    return None
