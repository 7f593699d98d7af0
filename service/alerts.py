"""AlertEvent -> the FHIR writes the service makes: a Flag (one per episode, updated as it evolves)
and a Communication per event. Built as plain dicts, validated with fhir.resources R4B models.

Conventions: shared/reference/clinical-and-fhir.md §1.4 (SNOMED 165517008), §1.5 (flag-category
`clinical`, not `lab`; communication-category `alert`; request-priority), §4 (flag-detail extension,
Flag.author, period, status active -> inactive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.flag import Flag

from .clinical.episodes import AlertEvent, EventKind
from .clinical.grading import Scheme
from .config import AlertSettings

SNOMED = "http://snomed.info/sct"
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
COMMUNICATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
NEUTROPENIA = {"system": SNOMED, "code": "165517008", "display": "Neutropenia (finding)"}

PRIORITY = {"mild": "routine", "moderate": "urgent", "severe": "asap"}


@dataclass(frozen=True, slots=True)
class AlertWrites:
    flag: dict[str, Any]
    communication: dict[str, Any]
    flag_identifier: tuple[str, str]  # (system, value): the conditional-create key
    communication_identifier: tuple[str, str]


def _cells(value: float) -> str:
    return f"{value:,.0f} cells/µL"


def _anc_text(event: AlertEvent) -> str:
    anc = event.assessment.anc
    return ("≤ " if anc.at_most else "") + _cells(anc.value)


def _thresholds(scheme: Scheme) -> str:
    steps = [f"{b.label} <{'LLN' if b.below_lln else f'{b.below:g}'}" for b in reversed(scheme.bands) if b.severity]
    return ", ".join(steps)


def message(event: AlertEvent, scheme: Scheme) -> str:
    a = event.assessment
    method = a.anc.method.replace("-", " ")
    now = f"ANC {_anc_text(event)} collected {a.effective} ({method})"
    if event.previous_anc is not None:
        before = f"Previous ANC {_cells(event.previous_anc)} collected {event.previous_effective}."
    else:
        before = "No previous ANC on record."
    if event.kind is EventKind.NEW:
        head = f"New neutropenia, {event.band.label}: {now}."
    elif event.kind is EventKind.WORSENING:
        head = f"Neutropenia worsening to {event.band.label}: {now}."
    else:
        head = (
            f"Neutropenia resolved: {now}, back in the {a.band.label} range. Episode since "
            f"{event.opened}, worst {event.worst.label}."
        )
    return f"{head} {before} Scheme {scheme.name}: {_thresholds(scheme)} cells/µL."


def build(event: AlertEvent, scheme: Scheme, settings: AlertSettings, *, sent: str) -> AlertWrites:
    """The Flag as it stands after `event`, and the Communication announcing it."""
    base = settings.canonical_base
    flag_id = (f"{base}/episode", event.episode)
    comm_id = (f"{base}/communication", f"{event.episode}-{event.kind.value}-{event.band.rank}")
    a = event.assessment
    resolved = event.kind is EventKind.RESOLVED
    period: dict[str, str] = {"start": event.opened}
    if resolved:
        period["end"] = a.effective
    flag_band = event.worst
    text = f"Neutropenia, {flag_band.label} (worst ANC in episode); " + (
        f"resolved {a.effective}" if resolved else f"latest ANC {_anc_text(event)} collected {a.effective}"
    )
    evidence = [
        {"url": FLAG_DETAIL, "valueReference": {"reference": _versioned(r.ref, r.version)}}
        for r in a.anc.inputs
    ]
    flag = {
        "resourceType": "Flag",
        "identifier": [{"system": flag_id[0], "value": flag_id[1]}],
        "extension": evidence,
        "status": "inactive" if resolved else "active",
        "category": [{"coding": [{"system": FLAG_CATEGORY, "code": "clinical", "display": "Clinical"}]}],
        "code": {"coding": [NEUTROPENIA], "text": text},
        "subject": {"reference": event.patient},
        "period": period,
        "author": {"reference": settings.author},
    }
    flag_ref = {"type": "Flag", "identifier": {"system": flag_id[0], "value": flag_id[1]}}
    communication = {
        "resourceType": "Communication",
        "identifier": [{"system": comm_id[0], "value": comm_id[1]}],
        "status": "completed",
        "category": [{"coding": [{"system": COMMUNICATION_CATEGORY, "code": "alert", "display": "Alert"}]}],
        "priority": "routine" if resolved else PRIORITY[event.band.severity or "mild"],
        "subject": {"reference": event.patient},
        "about": [flag_ref] + [{"reference": r.ref} for r in a.anc.inputs],
        "sent": sent,
        "sender": {"reference": settings.author},
        "payload": [{"contentString": message(event, scheme)}],
    }
    if settings.recipients:
        communication["recipient"] = [{"reference": r} for r in settings.recipients]
    Flag.model_validate(flag)
    Communication.model_validate(communication)
    return AlertWrites(flag, communication, flag_id, comm_id)


def _versioned(ref: str, version: str | None) -> str:
    return f"{ref}/_history/{version}" if version else ref
