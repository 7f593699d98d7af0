"""AlertEvent -> the FHIR writes the service makes: a Flag (one per episode, updated as it evolves)
and a Communication per announcement. Built as plain dicts, validated with fhir.resources R4B models.

Conventions: shared/reference/clinical-and-fhir.md §1.4 (SNOMED 165517008), §1.5 (flag-category
`clinical`, not `lab`; communication-category `alert`; request-priority), §4 (flag-detail extension,
Flag.author, period, status active -> inactive, entered-in-error on retraction; a correction is a new
Communication whose `inResponseTo` points at the prior one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.flag import Flag

from .clinical.episodes import Alerted, AlertEvent, EventKind
from .clinical.grading import Band, Scheme
from .config import AlertSettings

SNOMED = "http://snomed.info/sct"
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
COMMUNICATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
NEUTROPENIA = {"system": SNOMED, "code": "165517008", "display": "Neutropenia (finding)"}
FEBRILE_NEUTROPENIA = {"system": SNOMED, "code": "409089005", "display": "Febrile neutropenia (disorder)"}

PRIORITY = {"mild": "routine", "moderate": "urgent", "severe": "asap"}


@dataclass(frozen=True, slots=True)
class AlertWrites:
    flag: dict[str, Any]
    communication: dict[str, Any] | None  # None: the event updates the Flag only (chronic)
    flag_identifier: tuple[str, str]  # (system, value): the conditional-create key
    communication_identifier: tuple[str, str] | None


def _cells(value: float) -> str:
    return f"{value:,.0f} cells/µL"


def _thresholds(scheme: Scheme) -> str:
    steps = [f"{b.label} <{'LLN' if b.below_lln else f'{b.below:g}'}" for b in reversed(scheme.bands) if b.severity]
    return ", ".join(steps)


def communication_value(episode: str, kind: str, rank: int, revision: int) -> str:
    """The deterministic Communication identifier of one announcement."""
    return f"{episode}-{kind}-{rank}" + (f"-r{revision}" if revision else "")


def _retracted_value(event: AlertEvent, x: Alerted) -> str:
    return f"{event.episode}-retracted-{x.kind.value}-{x.band.rank}-r{event.revision}"


def message(event: AlertEvent, scheme: Scheme) -> str:
    a = event.assessment
    if event.kind is EventKind.RETRACTED:
        return _retraction_message(event, scheme)
    assert a is not None
    now = f"ANC {'≤ ' if a.at_most else ''}{_cells(a.anc)} collected {a.effective} ({a.method.replace('-', ' ')})"
    if a.cytopenia == "pancytopenia":
        now += f"; part of a pancytopenia (Hb {a.hemoglobin:g} g/dL, platelets {_cells(a.platelets or 0)})"
    elif a.cytopenia == "isolated":
        now += "; isolated (haemoglobin and platelets not low)"
    elif a.cytopenia:
        now += f"; {a.cytopenia} (Hb {a.hemoglobin:g} g/dL, platelets {_cells(a.platelets or 0)})"
    before = (f"Previous ANC {_cells(event.previous_anc)} collected {event.previous_effective}."
              if event.previous_anc is not None else "No previous ANC on record.")
    chronic = " Chronic: episode open more than 3 months." if event.chronic else ""
    corrected = f"Corrected ({event.reason}): " if event.revision else ""
    if event.kind is EventKind.NEW:
        head = f"{corrected}New neutropenia, {event.band.label}: {now}."
    elif event.kind is EventKind.WORSENING:
        head = f"{corrected}Neutropenia worsening to {event.band.label}: {now}."
    elif event.kind is EventKind.FEBRILE:
        fever = event.fever
        reading = f"temperature {fever.celsius:.1f} °C at {fever.effective}" if fever else "fever"
        head = (f"FEBRILE NEUTROPENIA: {reading} with {now}. Treat as an emergency: empirical antibiotics "
                "within 1 hour per ASCO/IDSA.")
    elif event.kind is EventKind.CHRONIC:
        head = f"Neutropenia episode since {event.opened} is now chronic (open more than 3 months): {now}."
        chronic = ""
    else:
        worst = event.worst.label if event.worst else event.band.label
        head = f"{corrected}Neutropenia resolved: {now}, back in the {a.band.label} range. Episode since {event.opened}, worst {worst}."
    return f"{head}{chronic} {before} Scheme {scheme.name}: {_thresholds(scheme)} cells/µL."


def _retraction_message(event: AlertEvent, scheme: Scheme) -> str:
    x = event.retracted
    assert x is not None
    what = {"new": f"new neutropenia, {x.band.label}", "worsening": f"worsening to {x.band.label}",
            "resolved": "resolution of the neutropenia", "chronic": "chronic label",
            "febrile": "febrile neutropenia"}[x.kind.value]
    head = (f"WITHDRAWN: the earlier alert ({what}; ANC {_cells(x.anc)} collected {x.effective}) no longer holds: "
            f"a result it rested on was {event.reason}.")
    a = event.assessment
    now = f" The panel now gives ANC {_cells(a.anc)} ({a.band.label})." if a is not None else " That value is no longer on record."
    if event.worst is None:
        state = " No neutropenia episode remains; its Flag is marked entered-in-error."
    elif event.episode_open:
        state = f" The episode remains open, worst {event.worst.label}."
    else:
        state = f" The episode is closed, worst {event.worst.label}."
    return f"{head}{now}{state} Scheme {scheme.name}."


def _flag_status(event: AlertEvent) -> str:
    if event.worst is None:
        return "entered-in-error"
    return "active" if event.episode_open else "inactive"


def _priority(event: AlertEvent) -> str:
    if event.kind is EventKind.RETRACTED:
        x = event.retracted
        return "urgent" if x is not None and x.band.severity in ("moderate", "severe") else "routine"
    if event.kind is EventKind.RESOLVED:
        return "routine"
    if event.kind is EventKind.FEBRILE:
        return "stat"
    return PRIORITY[event.band.severity or "mild"]


def build(
    event: AlertEvent, scheme: Scheme, settings: AlertSettings, *, sent: str, recipients: Sequence[str] | None = None
) -> AlertWrites:
    """The Flag as it stands after `event`, and the Communication announcing it (none for `chronic`)."""
    base = settings.canonical_base
    flag_id = (f"{base}/episode", event.episode)
    a = event.assessment
    status = _flag_status(event)
    period: dict[str, str] = {"start": event.opened}
    if status == "inactive" and event.ended:
        period["end"] = event.ended
    band: Band = event.worst or event.band
    details = [f"{'Febrile neutropenia' if event.febrile else 'Neutropenia'}, {band.label}"]
    if event.chronic:
        details.append("chronic")
    if a is not None and a.cytopenia:
        details.append(a.cytopenia)
    text = ", ".join(details) + (
        " (entered in error: withdrawn)" if status == "entered-in-error"
        else f"; resolved {event.ended}" if status == "inactive" and event.ended
        else f"; latest ANC {_cells(a.anc)} collected {a.effective}" if a is not None
        else ""
    )
    flag: dict[str, Any] = {
        "resourceType": "Flag",
        "identifier": [{"system": flag_id[0], "value": flag_id[1]}],
        "status": status,
        "category": [{"coding": [{"system": FLAG_CATEGORY, "code": "clinical", "display": "Clinical"}]}],
        "code": {"coding": [FEBRILE_NEUTROPENIA if event.febrile else NEUTROPENIA], "text": text},
        "subject": {"reference": event.patient},
        "period": period,
        "author": {"reference": settings.author},
    }
    if a is not None:
        flag["extension"] = [
            {"url": FLAG_DETAIL, "valueReference": {"reference": f"{ref}/_history/{v}" if v else ref}}
            for ref, v in zip(a.refs, a.versions, strict=True)
        ]
    Flag.model_validate(flag)
    if event.kind is EventKind.CHRONIC:
        return AlertWrites(flag, None, flag_id, None)
    comm_system = f"{base}/communication"
    x = event.retracted
    comm_value = _retracted_value(event, x) if x is not None else communication_value(
        event.episode, event.kind.value, event.band.rank, event.revision)
    flag_ref = {"type": "Flag", "identifier": {"system": flag_id[0], "value": flag_id[1]}}
    communication: dict[str, Any] = {
        "resourceType": "Communication",
        "identifier": [{"system": comm_system, "value": comm_value}],
        "status": "completed",
        "category": [{"coding": [{"system": COMMUNICATION_CATEGORY, "code": "alert", "display": "Alert"}]}],
        "priority": _priority(event),
        "subject": {"reference": event.patient},
        "about": [flag_ref] + ([{"reference": ref} for ref in a.refs] if a is not None else []),
        "sent": sent,
        "sender": {"reference": settings.author},
        "payload": [{"contentString": message(event, scheme)}],
    }
    if x is not None:
        prior = communication_value(x.episode, x.kind.value, x.band.rank, x.revision)
        communication["inResponseTo"] = [{"type": "Communication", "identifier": {"system": comm_system, "value": prior}}]
    to = settings.recipients if recipients is None else recipients
    if to:
        communication["recipient"] = [{"reference": r} for r in to]
    Communication.model_validate(communication)
    return AlertWrites(flag, communication, flag_id, (comm_system, comm_value))
