"""AlertEvent -> the FHIR writes the service makes: a Flag (one per episode, updated as it evolves),
a Communication per announcement, and a Provenance per write. Built as plain dicts, validated with
fhir.resources R4B models; they claim the profiles of fhir_profiles/ (meta.profile, extensions and
codes from service/output/profiles.py, on the configured alerts.canonical_base).

Conventions: docs/clinical-reference.md §1.4 (SNOMED 165517008), §1.5 (flag-category
`clinical`, not `lab`; communication-category `alert`; request-priority), §4 (flag-detail extension,
Flag.author, period, status active -> inactive, entered-in-error on retraction; a correction is a new
Communication whose `inResponseTo` points at the prior one; Provenance: target the Flag and the
Communication, entity the source Observations, agent the service Device with the algorithm version).
The words (the Flag's code.text, the Communication's payload) are composed in service/output/texts.py.

Each entry carries the fullUrl given here (`urn:uuid:` + a UUID derived from the resource's
identifier), and the Provenance built here references the Flag and the Communication by those
fullUrls (what replay writes). The live loop (service/live/writer.py) posts the Flag and the
Communication first and the Provenance only once the server has confirmed both, with its targets
rewritten to the server ids: service/output/transaction.py `provenance_entry` is that entry.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.flag import Flag
from fhir.resources.R4B.provenance import Provenance

from service.config import AlertSettings
from service.core.episodes import Alerted, AlertEvent, Assessment, EventKind
from service.core.grading import Band, Scheme
from service.fhir.fhirtime import from_epoch_us, is_instant, to_epoch_us
from service.fhir.model import FhirJson
from service.output import profiles, texts

SNOMED = "http://snomed.info/sct"
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
COMMUNICATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
NEUTROPENIA = {"system": SNOMED, "code": "165517008", "display": "Neutropenia (finding)"}
FEBRILE_NEUTROPENIA = {"system": SNOMED, "code": "409089005", "display": "Febrile neutropenia (disorder)"}

PROVENANCE_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
V3_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
AUTHOR_TYPE = {"system": PROVENANCE_PARTICIPANT_TYPE, "code": "author", "display": "Author"}
ACTIVITY = {  # Provenance.activity: the event creates the episode's Flag (new) or updates it
    "create": {"system": V3_DATA_OPERATION, "code": "CREATE", "display": "create"},
    "update": {"system": V3_DATA_OPERATION, "code": "UPDATE", "display": "revise"},
}

PRIORITY = {"mild": "routine", "moderate": "urgent", "severe": "asap"}


@dataclass(frozen=True, slots=True)
class AlertWrites:
    flag: FhirJson
    communication: FhirJson | None  # None: the event updates the Flag only (chronic)
    flag_identifier: tuple[str, str]  # (system, value): the conditional-create key
    communication_identifier: tuple[str, str] | None
    provenance: FhirJson  # targets the Flag and Communication by their fullUrls below
    provenance_tag: tuple[str, str]  # (system, code) of its meta.tag: the conditional-create key (_tag)
    flag_full_url: str  # urn:uuid:..., the Flag's Bundle.entry.fullUrl
    communication_full_url: str | None
    provenance_full_url: str


def full_url(system: str, value: str) -> str:
    """A transaction entry's fullUrl: a UUID (v5) derived from the resource's identifier, so the
    same write gives the same Bundle in replay, in the live loop and after a restart."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{system}|{value}')}"


def _number(value: float) -> int | float:
    rounded = round(value, 1)
    return int(rounded) if rounded.is_integer() else rounded


def _coding(base: str, system: str, code: str, display: str) -> dict[str, str]:
    return {"system": profiles.system_url(base, system), "code": code, "display": display}


def _grade(base: str, scheme: Scheme, band: Band) -> FhirJson:
    name = profiles.base_scheme(scheme)
    coding = _coding(
        base, profiles.GRADE_SYSTEM, profiles.grade_code(name, band), profiles.grade_display(name, band)
    )
    return {"url": profiles.profile_url(base, profiles.GRADE_EXTENSION), "valueCoding": coding}


def _scheme(base: str, scheme: Scheme) -> FhirJson:
    name = profiles.base_scheme(scheme)
    coding = _coding(base, profiles.SCHEME_SYSTEM, name, profiles.SCHEME_DISPLAY.get(name, name))
    return {"url": profiles.profile_url(base, profiles.SCHEME_EXTENSION), "valueCoding": coding}


def _event(base: str, kind: EventKind) -> FhirJson:
    coding = _coding(base, profiles.EVENT_SYSTEM, kind.value, profiles.EVENT_DISPLAY[kind][0])
    return {"url": profiles.profile_url(base, profiles.EVENT_EXTENSION), "valueCoding": coding}


def _anc(base: str, a: Assessment) -> FhirJson:
    quantity: FhirJson = {"value": _number(a.anc)}
    if a.at_most:
        quantity["comparator"] = "<="
    quantity.update({"unit": profiles.ANC_UNIT, "system": profiles.UCUM, "code": profiles.ANC_CODE})
    return {"url": profiles.profile_url(base, profiles.ANC_EXTENSION), "valueQuantity": quantity}


def _meta(settings: AlertSettings, profile: str) -> FhirJson:
    """meta.profile when the deployment claims the profiles (alerts.claim_profiles), else nothing: a
    server that validates claims reads each claimed StructureDefinition, so a claim it cannot resolve
    refuses the write. The extensions stay either way: an extension is valid without the profile
    that uses it (FHIR extensibility.html), and the codes they carry keep their systems."""
    if not settings.claim_profiles:
        return {}
    return {"profile": [profiles.profile_url(settings.canonical_base, profile)]}


def _instant(sent: str, event: AlertEvent) -> str:
    """Provenance.recorded is an instant: `sent` when it is one, else the collection time as one."""
    if is_instant(sent):
        return sent
    for text in (sent, event.assessment.effective if event.assessment else None, event.opened):
        if text:
            try:
                return from_epoch_us(to_epoch_us(text))
            except ValueError:
                continue
    return from_epoch_us(0)


def communication_value(episode: str, kind: str, rank: int, revision: int, opening: int = 0) -> str:
    """The deterministic Communication identifier of one announcement (`opening`: made after the
    episode's n-th recurrence; `rank`: the Flag update's number for `recovering`)."""
    return (
        f"{episode}-{kind}-{rank}"
        + (f"-o{opening}" if opening else "")
        + (f"-r{revision}" if revision else "")
    )


def _rank(kind: EventKind, band: Band, update: int) -> int:
    return update if kind is EventKind.RECOVERING else band.rank


def _retracted_value(event: AlertEvent, x: Alerted) -> str:
    opening = f"-o{x.opening}" if x.opening else ""
    rank = _rank(x.kind, x.band, x.update)
    return f"{event.episode}-retracted-{x.kind.value}-{rank}{opening}-r{event.revision}"


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
    event: AlertEvent,
    scheme: Scheme,
    settings: AlertSettings,
    *,
    sent: str,
    recipients: Sequence[str] | None = None,
) -> AlertWrites:
    """The Flag as it stands after `event`, and the Communication announcing it (none for `chronic`
    and `recovering`)."""
    base = settings.canonical_base
    flag_id = (f"{base}/episode", event.episode)
    a = event.assessment
    status = _flag_status(event)
    period: dict[str, str] = {"start": event.opened}
    if status == "inactive" and event.ended:
        period["end"] = event.ended
    band: Band = event.worst or event.band
    flag: FhirJson = {
        "resourceType": "Flag",
        **({"meta": m} if (m := _meta(settings, profiles.FLAG_PROFILE)) else {}),
        "identifier": [{"system": flag_id[0], "value": flag_id[1]}],
        "status": status,
        "category": [{"coding": [{"system": FLAG_CATEGORY, "code": "clinical", "display": "Clinical"}]}],
        "code": {
            "coding": [FEBRILE_NEUTROPENIA if event.febrile else NEUTROPENIA],
            "text": texts.flag_text(event, status),
        },
        "subject": {"reference": event.patient},
        "period": period,
        "author": {"reference": settings.author},
    }
    sources = (
        [f"{ref}/_history/{v}" if v else ref for ref, v in zip(a.refs, a.versions, strict=True)]
        if a is not None
        else []
    )
    flag["extension"] = [{"url": FLAG_DETAIL, "valueReference": {"reference": ref}} for ref in sources]
    flag["extension"] += [_grade(base, scheme, band), _scheme(base, scheme)] + (
        [_anc(base, a)] if a is not None else []
    )
    Flag.model_validate(flag)
    rank = _rank(event.kind, event.band, event.update)
    x = event.retracted
    flag_only = (EventKind.CHRONIC, EventKind.RECOVERING)
    if event.kind in flag_only or (x is not None and x.kind is EventKind.RECOVERING):
        # Flag updates without a Communication (a withdrawn `recovering` was never announced either)
        comm_value = (
            _retracted_value(event, x)
            if x is not None
            else communication_value(event.episode, event.kind.value, rank, event.revision, event.opening)
        )
        return _with_provenance(event, scheme, settings, sent, sources, flag, None, flag_id, None, comm_value)
    comm_system = f"{base}/communication"
    comm_value = (
        _retracted_value(event, x)
        if x is not None
        else communication_value(event.episode, event.kind.value, rank, event.revision, event.opening)
    )
    flag_ref = {"type": "Flag", "identifier": {"system": flag_id[0], "value": flag_id[1]}}
    communication: FhirJson = {
        "resourceType": "Communication",
        **({"meta": m} if (m := _meta(settings, profiles.COMMUNICATION_PROFILE)) else {}),
        "extension": [_event(base, event.kind), _grade(base, scheme, event.band), _scheme(base, scheme)]
        + ([_anc(base, a)] if a is not None else []),
        "identifier": [{"system": comm_system, "value": comm_value}],
        "status": "completed",
        "category": [{"coding": [{"system": COMMUNICATION_CATEGORY, "code": "alert", "display": "Alert"}]}],
        "priority": _priority(event),
        "subject": {"reference": event.patient},
        "about": [flag_ref] + ([{"reference": ref} for ref in a.refs] if a is not None else []),
        "sent": sent,
        "sender": {"reference": settings.author},
        "payload": [{"contentString": texts.message(event, scheme)}],
    }
    if x is not None:
        prior = communication_value(
            x.episode, x.kind.value, _rank(x.kind, x.band, x.update), x.revision, x.opening
        )
        communication["inResponseTo"] = [
            {"type": "Communication", "identifier": {"system": comm_system, "value": prior}}
        ]
    to = settings.recipients if recipients is None else recipients
    if to:
        communication["recipient"] = [{"reference": r} for r in to]
    Communication.model_validate(communication)
    return _with_provenance(
        event,
        scheme,
        settings,
        sent,
        sources,
        flag,
        communication,
        flag_id,
        (comm_system, comm_value),
        comm_value,
    )


def _with_provenance(
    event: AlertEvent,
    scheme: Scheme,
    settings: AlertSettings,
    sent: str,
    sources: list[str],
    flag: FhirJson,
    communication: FhirJson | None,
    flag_id: tuple[str, str],
    comm_id: tuple[str, str] | None,
    key: str,
) -> AlertWrites:
    """The writes with their Provenance: targets by fullUrl (and identifier), the source Observations
    (and, for `febrile`, the temperature) as versioned entities, the service as author with its
    version and grading scheme. `key` (the announcement's identifier value) is its idempotency tag."""
    base = settings.canonical_base
    flag_url = full_url(*flag_id)
    comm_url = full_url(*comm_id) if comm_id is not None else None
    tag = (f"{base}/provenance", key)
    targets = [
        {"reference": flag_url, "type": "Flag", "identifier": {"system": flag_id[0], "value": flag_id[1]}}
    ]
    if comm_id is not None and comm_url is not None:
        targets.append(
            {
                "reference": comm_url,
                "type": "Communication",
                "identifier": {"system": comm_id[0], "value": comm_id[1]},
            }
        )
    entities = list(sources)
    if event.fever is not None and event.fever.ref not in entities:
        entities.append(event.fever.ref)
    version = profiles.software_version()
    provenance: FhirJson = {
        "resourceType": "Provenance",
        "meta": {**_meta(settings, profiles.PROVENANCE_PROFILE), "tag": [{"system": tag[0], "code": tag[1]}]},
        "extension": [_event(base, event.kind)],
        "target": targets,
        "recorded": _instant(sent, event),
        "activity": {"coding": [ACTIVITY["create" if event.kind is EventKind.NEW else "update"]]},
        "agent": [
            {
                "extension": [
                    {"url": profiles.profile_url(base, profiles.SOFTWARE_EXTENSION), "valueString": version},
                    _scheme(base, scheme),
                ],
                "type": {"coding": [AUTHOR_TYPE]},
                "who": {"reference": settings.author, "display": f"neutrowatch {version}"},
            }
        ],
    }
    if entities:
        provenance["entity"] = [{"role": "source", "what": {"reference": ref}} for ref in entities]
    Provenance.model_validate(provenance)
    return AlertWrites(
        flag=flag,
        communication=communication,
        flag_identifier=flag_id,
        communication_identifier=comm_id,
        provenance=provenance,
        provenance_tag=tag,
        flag_full_url=flag_url,
        communication_full_url=comm_url,
        provenance_full_url=full_url(*tag),
    )
