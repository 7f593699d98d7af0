"""Hostile inputs: malformed or implausible Observations, each with the outcome it must have.

Every item is one Observation as raw JSON bytes (what a server or a file could hold, NaN tokens and
bytes that are not UTF-8 included), for its own patient and specimen, with a valid WBC of the same
specimen beside it (so a hostile neutrophil result that slipped through would form a panel and
alert). The same bytes go through replay (NDJSON lines, Bundles) and the live loop (spliced as
searchset entries by tests/hostile/middleman.py).

Outcome classes:

* REJECTED: a `rejected` event (replay) / a quarantine row, `neutrowatch_rejections_total{reason}`
  and a log line (live) with `reason` (a prefix of the full reason) and `ref` (None: no FHIR id
  could be read); never an alert.
* PANEL_REJECTED: each result is readable but the panel is implausible (the ANC gate): a
  `rejected` event for the panel; never an alert.
* ACCEPTED: hostile in form only (a 5 MB note, a UTF-8 BOM): read as a normal result (a normal
  ANC here, so no alert either), no rejection.

Duplicates (two different resources with the same id, versionId and lastUpdated) are built by
`duplicate_pair`: a copy that reads the same as another is dropped; copies that differ are all
rejected as a conflict ("conflicting copies of one version...", whichever is read first; replay: a
`rejected` event each; live: each quarantined once, counted and in the decision log, and the
version in force is rejected). A copy without meta of an Observation read with it
("copy-without-meta") is no version of it: rejected, and it changes nothing.

Every item also carries a fake patient name, birth date and free text (PHI below) in fields the
service never reads, so the tests can check that none of it reaches a log line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
UPDATED = "@UPDATED@"  # replaced by a meta.lastUpdated when the bytes are used
REPLAY_UPDATED = "2026-03-01T10:00:00.000Z"
EFFECTIVE = "2026-03-01T08:00:00Z"
MEGA = 5 * 1024 * 1024  # "multi-megabyte" strings
DEEP = 100_000  # nesting levels

# Fake PHI in every hostile item: none of it may appear in a log line.
PHI_NAME = "Ophelia Quennell-Marchetti"
PHI_BIRTH = "1961-07-14"
PHI_TEXT = "patient reports bruising after her daughter's wedding"
PHI = (PHI_NAME, PHI_BIRTH, PHI_TEXT)


class Outcome(Enum):
    REJECTED = "rejected"
    PANEL_REJECTED = "panel-rejected"
    ACCEPTED = "accepted"


@dataclass(frozen=True)
class Hostile:
    name: str
    raw: bytes  # the hostile Observation (with UPDATED where meta.lastUpdated goes)
    outcome: Outcome
    reason: str | None  # expected reason (prefix), for REJECTED and PANEL_REJECTED
    ref: str | None  # the Observation reference the rejection carries (None: no FHIR id could be read)
    patient: str
    partners: tuple[bytes, ...] = field(default=(), repr=False)  # valid results of the same specimen

    def resources(self, updated: str = REPLAY_UPDATED) -> list[bytes]:
        stamp = updated.encode()
        return [r.replace(UPDATED.encode(), stamp) for r in (self.raw, *self.partners)]


def observation(
    oid: str, patient: str, code: str = "751-8", value: Any = 0.3, unit: str = "10*3/uL", **extra: Any
) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"versionId": "1", "lastUpdated": UPDATED},
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}], "text": PHI_TEXT},
        "subject": {"reference": patient, "display": PHI_NAME},
        "effectiveDateTime": EFFECTIVE,
        "specimen": {"reference": f"Specimen/{oid}-sp"},
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        "note": [{"text": f"{PHI_NAME}, born {PHI_BIRTH}: {PHI_TEXT}"}],
        "interpretation": [{"text": PHI_TEXT}],
    }
    obs.update(extra)
    return obs


def dumps(obj: dict[str, Any], **raw_values: bytes) -> bytes:
    """JSON bytes of `obj` where each string "@KEY@" is replaced by the raw bytes raw_values[KEY]."""
    out = orjson.dumps(obj)
    for key, raw in raw_values.items():
        out = out.replace(f'"@{key}@"'.encode(), raw)
    return out


def wbc_partner(oid: str, patient: str) -> bytes:
    wbc = observation(f"{oid}-wbc", patient, "6690-2", 4.0)
    wbc["specimen"] = {"reference": f"Specimen/{oid}-sp"}
    return orjson.dumps(wbc)


def _item(
    name: str,
    outcome: Outcome,
    reason: str | None,
    *,
    ref: bool = True,
    value: Any = 0.3,
    raw_values: dict[str, bytes] | None = None,
    mutate: Any = None,
    raw: bytes | None = None,
) -> Hostile:
    oid = f"h-{name}"
    patient = f"Patient/hx-{name}"
    obs = observation(oid, patient, value=value)
    if mutate is not None:
        mutate(obs)
    data = raw if raw is not None else dumps(obs, **(raw_values or {}))
    return Hostile(
        name,
        data,
        outcome,
        reason,
        f"Observation/{oid}" if ref else None,
        patient,
        (wbc_partner(oid, patient),),
    )


def _set(path: str, value: Any) -> Any:
    def mutate(obs: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = obs
        for p in parents:
            target = target.setdefault(p, {})
        if value is _DELETE:
            target.pop(last, None)
        else:
            target[last] = value

    return mutate


_DELETE = object()
R, P, A = Outcome.REJECTED, Outcome.PANEL_REJECTED, Outcome.ACCEPTED
NOT_FINITE = "value is not a finite number"
NOT_UTF8 = "text is not valid UTF-8"


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _without_meta(name: str, reason: str) -> Hostile:
    oid, patient = f"h-{name}", f"Patient/hx-{name}"
    severe = {k: v for k, v in observation(oid, patient, value=0.1).items() if k != "meta"}
    stamped = orjson.dumps(observation(oid, patient, value=2.5))
    return Hostile(
        name,
        orjson.dumps(severe),
        R,
        reason,
        f"Observation/{oid}",
        patient,
        (wbc_partner(oid, patient), stamped),
    )


def _with_raw_value(
    name: str, raw_value: bytes, outcome: Outcome, reason: str | None, ref: bool = True
) -> Hostile:
    return _item(name, outcome, reason, ref=ref, value="@V@", raw_values={"V": raw_value})


CORPUS: list[Hostile] = [
    # not JSON, or not the JSON of a resource
    _with_raw_value("invalid-json", b"0.3,,", R, "invalid JSON"),
    _item(
        "control-character", R, "invalid JSON", mutate=_set("status", "@S@"), raw_values={"S": b'"final\x01"'}
    ),
    _item("not-an-object", R, "not a FHIR resource", ref=False, raw=b"[1, 2, 3]"),
    # wrong types
    _item("quantity-is-a-list", R, "malformed", mutate=_set("valueQuantity", [0.3])),
    _item("code-is-a-string", R, "malformed", mutate=_set("code", "751-8")),
    _item("subject-is-a-number", R, "malformed", mutate=_set("subject", 42)),
    _item("boolean-value", R, "malformed", value=True),
    _item("string-value", R, "malformed", value="0.3"),
    _item("string-nan", R, "malformed", value="NaN"),
    _item("string-infinity", R, "malformed", value="Infinity"),
    # non-finite numbers as the JSON tokens some servers emit
    _with_raw_value("nan-token", b"NaN", R, NOT_FINITE),
    _with_raw_value("infinity-token", b"Infinity", R, NOT_FINITE),
    _with_raw_value("minus-infinity-token", b"-Infinity", R, NOT_FINITE),
    _with_raw_value("exponent-overflow", b"1e999", R, NOT_FINITE),
    _with_raw_value("huge-integer", b"9" * 400, R, NOT_FINITE),
    _with_raw_value("very-long-integer", b"9" * 5000, R, NOT_FINITE),
    # huge and negative values
    _item("huge-value", P, "implausible ANC", value=1e300),
    _item("negative-value", R, "negative value", value=-0.3),
    _item("huge-negative-value", R, "negative value", value=-1e300),
    # bytes that are not UTF-8, unpaired surrogates
    _item(
        "non-utf8-in-free-text",
        R,
        NOT_UTF8,
        raw=dumps(
            observation(
                "h-non-utf8-in-free-text", "Patient/hx-non-utf8-in-free-text", note=[{"text": "@T@"}]
            ),
            T=b'"caf\xe9 \xff\xfe"',
        ),
    ),
    _item(
        "non-utf8-in-id",
        R,
        NOT_UTF8,
        ref=False,
        raw=dumps(observation("@I@", "Patient/hx-non-utf8-in-id"), I=b'"h-\xff\xfe"'),
    ),
    _item(
        "non-utf8-in-subject",
        R,
        NOT_UTF8,
        raw=dumps(observation("h-non-utf8-in-subject", "@S@"), S=b'"Patient/\xe9"'),
    ),
    _item(
        "unpaired-surrogate",
        R,
        NOT_UTF8,
        raw=dumps(
            observation("h-unpaired-surrogate", "Patient/hx-unpaired-surrogate", valueString="@T@"),
            T=b'"\\ud800"',
        ),
    ),
    # deeply nested JSON
    _item(
        "deeply-nested",
        R,
        "invalid JSON: nested too deeply",
        raw=dumps(observation("h-deeply-nested", "Patient/hx-deeply-nested", extension="@D@"), D=_deep(DEEP)),
    ),
    _item(
        "nested-beyond-orjson",
        R,
        "invalid JSON: nested too deeply",
        raw=dumps(
            observation("h-nested-beyond-orjson", "Patient/hx-nested-beyond-orjson", extension="@D@"),
            D=_deep(1500),
        ),
    ),
    # multi-megabyte strings
    _item("megabyte-note", A, None, value=2.5, mutate=_set("note", [{"text": PHI_TEXT + " " + "x" * MEGA}])),
    _item("megabyte-id", R, "id is not a FHIR id", ref=False, mutate=_set("id", "h" * MEGA)),
    _item(
        "megabyte-unit",
        R,
        "unit '…'",
        mutate=lambda o: o["valueQuantity"].update(unit="u" * MEGA, code="u" * MEGA),
    ),
    _item(
        "megabyte-subject",
        R,
        "subject is not a Patient reference",
        mutate=_set("subject", {"reference": "Patient/" + "p" * MEGA}),
    ),
    _item(
        "megabyte-effective",
        R,
        "effective time is not a FHIR dateTime",
        mutate=_set("effectiveDateTime", "2" * MEGA),
    ),
    _item(
        "megabyte-value-string",
        R,
        "value is text",
        mutate=lambda o: (o.pop("valueQuantity"), o.update(valueString=PHI_TEXT * (MEGA // 50))),
    ),
    # units
    _item(
        "unknown-unit",
        R,
        "unit 'furlongs/uL' is not a cell count unit",
        mutate=lambda o: o["valueQuantity"].update(unit="furlongs/uL", code="furlongs/uL"),
    ),
    _item(
        "free-text-unit",
        R,
        "unit '…'",
        mutate=lambda o: o["valueQuantity"].update(unit=PHI_TEXT, code=PHI_TEXT),
    ),
    # subject
    _item("no-subject", R, "subject is not a Patient reference", mutate=_set("subject", _DELETE)),
    _item(
        "group-subject",
        R,
        "subject is not a Patient reference",
        mutate=_set("subject", {"reference": "Group/ward-7"}),
    ),
    _item(
        "free-text-subject",
        R,
        "subject is not a Patient reference",
        mutate=_set("subject", {"reference": f"Patient/{PHI_NAME}"}),
    ),
    _item(
        "display-only-subject",
        R,
        "subject is not a Patient reference",
        mutate=_set("subject", {"display": PHI_NAME}),
    ),
    # a subject that names no patient on the server read (FHIR references.html#literal): its namesake
    # "Patient/<id>" on this server is another patient, so it never takes that one's age or episode
    _item(
        "foreign-subject",
        R,
        "subject is on another server",
        mutate=_set("subject", {"reference": "https://evil.example.com/Patient/hx-foreign-subject"}),
    ),
    _item(
        "contained-subject",
        R,
        "subject is a contained reference",
        mutate=_set("subject", {"reference": "#p1"}),
    ),
    _item(
        "urn-uuid-subject",
        R,
        "subject is a urn:uuid: reference",
        mutate=_set("subject", {"reference": "urn:uuid:5f2d8c1e-3a0b-4c7d-9e8f-1a2b3c4d5e6f"}),
    ),
    # ids
    _item("no-id", R, "no id", ref=False, mutate=_set("id", _DELETE)),
    _item("id-with-spaces", R, "id is not a FHIR id", ref=False, mutate=_set("id", PHI_NAME)),
    _item(
        "version-with-spaces", R, "meta.versionId is not a FHIR id", mutate=_set("meta.versionId", PHI_NAME)
    ),
    # collection times that are not FHIR dateTimes with an offset (FHIR R4 datatypes, dateTime regex)
    *(
        _item(f"effective-{label}", R, reason, mutate=_set("effectiveDateTime", text))
        for label, text, reason in (
            ("no-offset", "2026-03-01T08:00:00", "effective time has no timezone"),
            ("no-seconds", "2026-03-01T08:00Z", "effective time is not a FHIR dateTime"),
            ("empty-fraction", "2026-03-01T08:00:00.Z", "effective time is not a FHIR dateTime"),
            ("space-separator", "2026-03-01 08:00:00Z", "effective time is not a FHIR dateTime"),
            ("offset-without-colon", "2026-03-01T08:00:00+0100", "effective time is not a FHIR dateTime"),
            ("offset-hours-only", "2026-03-01T08:00:00+01", "effective time is not a FHIR dateTime"),
            ("basic-format", "20260301T080000Z", "effective time is not a FHIR dateTime"),
            ("hour-only", "2026-03-01T08", "effective time is not a FHIR dateTime"),
            ("space-before-zone", "2026-03-01T08:00:00 Z", "effective time is not a FHIR dateTime"),
            ("month-only", "2026-03", "effective time is a date without a time of day"),
            ("date-only", "2026-03-01", "effective time is a date without a time of day"),
            ("thirtieth-of-february", "2026-02-30T08:00:00Z", "effective time is not a FHIR dateTime"),
        )
    ),
    # collection times that cannot be true (docs/clinical-reference.md, "Collection time")
    _item(
        "effective-far-future",
        P,
        "collection time later than the result was recorded",
        mutate=_set("effectiveDateTime", "9999-12-31T23:59:59Z"),
    ),
    _item(
        "effective-year-one",
        P,
        "collection time before 1900",
        mutate=_set("effectiveDateTime", "0001-01-01T00:00:00Z"),
    ),
    # a value together with dataAbsentReason (FHIR obs-6), a code with surrounding whitespace
    _item(
        "value-and-data-absent-reason",
        R,
        "value given together with dataAbsentReason",
        mutate=_set(
            "dataAbsentReason",
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "error"}
                ]
            },
        ),
    ),
    _item(
        "code-with-whitespace",
        R,
        "code 751-8 has surrounding whitespace",
        mutate=_set("code", {"coding": [{"system": LOINC, "code": " 751-8 "}]}),
    ),
    # a copy without meta (severe) of an Observation whose stamped version (normal) is read too:
    # no version of it, whatever the order
    _without_meta(
        "copy-without-meta", "copy that cannot be ordered among the versions read of this Observation"
    ),
    # form only
    _item(
        "byte-order-mark",
        A,
        None,
        value=2.5,
        raw=b"\xef\xbb\xbf"
        + orjson.dumps(observation("h-byte-order-mark", "Patient/hx-byte-order-mark", value=2.5)),
    ),
]

BY_NAME = {h.name: h for h in CORPUS}
# A byte-order mark is only a byte-order mark at the start of a document: inside a Bundle it is
# junk between entries, so the live splice leaves this item out (replay reads it as a line).
LINE_ONLY = frozenset({"byte-order-mark"})


def duplicate_pair(*, conflicting: bool) -> tuple[str, list[bytes]]:
    """Two resources with the same id, versionId and lastUpdated: a normal ANC first, then a copy
    that (when `conflicting`) says severe neutropenia. Returns the patient and the two copies."""
    patient = "Patient/hx-duplicate" + ("-conflict" if conflicting else "-identical")
    oid = "h-duplicate" + ("-conflict" if conflicting else "-identical")
    first = observation(oid, patient, value=2.5)
    second = observation(oid, patient, value=0.1 if conflicting else 2.5)
    return patient, [orjson.dumps(first), orjson.dumps(second), wbc_partner(oid, patient)]


def neighbour(name: str, anc_k: float = 0.3) -> list[dict[str, Any]]:
    """A valid panel (WBC + ANC, one specimen) of its own patient: severe by default, so it alerts."""
    patient = f"Patient/nb-{name}"
    wbc = observation(f"nb-{name}-wbc", patient, "6690-2", 4.0)
    anc = observation(f"nb-{name}-anc", patient, "751-8", anc_k)
    for o in (wbc, anc):
        o["specimen"] = {"reference": f"Specimen/nb-{name}-sp"}
    return [wbc, anc]


def fill(obj: dict[str, Any], updated: str = REPLAY_UPDATED) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(obj).replace(UPDATED.encode(), updated.encode()))


def entry(resource: bytes) -> bytes:
    """One searchset entry holding the resource's bytes as they are."""
    return b'{"fullUrl":"urn:hostile:entry","resource":' + resource + b',"search":{"mode":"match"}}'


def bulk_entries(
    n: int, *, patients: int = 150, severe_patients: int = 10, updated: str = REPLAY_UPDATED
) -> list[bytes]:
    """`n` valid Observations as raw bytes: n/2 panels (WBC + ANC, one specimen each) spread over
    `patients` patients, collected one minute apart; all normal except the last panel of each of
    the first `severe_patients` patients (ANC 300/uL: one `new` severe event each)."""
    panels = n // 2
    per_patient = panels // patients
    template = (
        '{"resourceType":"Observation","id":"bulk-%(k)d-%(kind)s","meta":{"versionId":"1","lastUpdated":"'
        + updated
        + '"},'
        '"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"%(code)s"}]},'
        '"subject":{"reference":"Patient/bulk-%(p)d"},"effectiveDateTime":"%(effective)s",'
        '"specimen":{"reference":"Specimen/bulk-%(k)d"},'
        '"valueQuantity":{"value":%(value)s,"unit":"10*3/uL","system":"http://unitsofmeasure.org","code":"10*3/uL"}}'
    )
    out: list[bytes] = []
    for k in range(panels):
        p, i = divmod(k, per_patient) if per_patient else (k, 0)
        minute = 24 * 60 * 10 + i  # from 2026-01-11 on, one panel a minute
        effective = f"2026-01-{1 + minute // 1440:02d}T{minute % 1440 // 60:02d}:{minute % 60:02d}:00Z"
        severe = p < severe_patients and i == per_patient - 1
        out.append(
            (
                template
                % {"k": k, "kind": "wbc", "code": "6690-2", "p": p, "effective": effective, "value": "4.0"}
            ).encode()
        )
        out.append(
            (
                template
                % {
                    "k": k,
                    "kind": "anc",
                    "code": "751-8",
                    "p": p,
                    "effective": effective,
                    "value": "0.3" if severe else "2.5",
                }
            ).encode()
        )
    return out
