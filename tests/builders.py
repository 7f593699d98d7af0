"""Small builders of FHIR R4 JSON for tests (plain dicts, as a server would send them)."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec

from service.core.observations import Ignored, LabResult, Rejected, normalise
from service.fhir.model import Resource

UCUM = "http://unitsofmeasure.org"
_ids = itertools.count(1)

UNITS = {"%": "%", "10*3/uL": "10*3/uL", "10*9/L": "10*9/L", "/uL": "/uL", "g/dL": "g/dL"}


def observation(
    code: str,
    value: float | None,
    unit: str | None = "10*3/uL",
    *,
    id: str | None = None,
    patient: str = "Patient/p1",
    effective: str = "2026-01-05T08:00:00Z",
    updated: str | None = None,
    version: str = "1",
    status: str = "final",
    specimen: str | None = "Specimen/s1",
    system: str | None = UCUM,
    ucum_code: str | None = None,
    comparator: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": id or f"o{next(_ids)}",
        "meta": {"versionId": version, **({"lastUpdated": updated} if updated else {})},
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": patient},
        "effectiveDateTime": effective,
    }
    if specimen:
        obs["specimen"] = {"reference": specimen}
    if value is not None:
        q: dict[str, Any] = {"value": value}
        if unit is not None:
            q["unit"] = unit
        if system is not None:
            q["system"] = system
            q["code"] = ucum_code if ucum_code is not None else unit
        if comparator:
            q["comparator"] = comparator
        obs["valueQuantity"] = q
    obs.update(extra)
    return obs


def normalised(obs: dict[str, Any]) -> LabResult | Rejected | Ignored:
    return normalise(msgspec.convert(obs, Resource))


def result(obs: dict[str, Any]) -> LabResult:
    out = normalised(obs)
    assert isinstance(out, LabResult), out
    return out
