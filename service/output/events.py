"""The JSON records of decisions: the replay contract (EVENTS.jsonl), also logged and stored by
the live loop. Fields are only ever added, never renamed.

Each kind of record is a struct whose fields are in the order the contract writes them; a field
that is only sometimes present is UNSET when absent (omitted from the JSON), a field present with
no value is None (written as null). `encode` is the one way a record becomes its JSON line
(service/output/encoding.py) and `decode_decision` the one way a stored record is read back."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from msgspec import UNSET, UnsetType

from service.core.episodes import AlertEvent, Assessment
from service.core.grading import Scheme
from service.core.observations import LabResult, Rejected
from service.core.panels import NotAssessed, PanelRejection
from service.core.picture import white_cells
from service.core.recipients import Recipients

Number = int | float  # a value rounded for the record: an int when it is whole (`_number`)
QUARANTINED = "quarantined"


class MappedCode(msgspec.Struct, frozen=True):
    """One member read through the site's ConceptMap: which local coding, translated by which map."""

    observation: str
    code: str
    concept_map: str


class TemperatureReading(msgspec.Struct, frozen=True):
    """`temperature` of a febrile event: the reading that made the fever."""

    celsius: float
    effective: str
    observation: str


class Recovering(msgspec.Struct, frozen=True):
    confirmations: int  # normal panels in a row
    needed: int


class Recurrence(msgspec.Struct, frozen=True):
    resolved: str  # collection time of the resolution the episode re-opens
    count: int


class EpisodeMemory(msgspec.Struct, frozen=True):
    episodes: int
    days: int


class Correction(msgspec.Struct, frozen=True):
    revision: int
    reason: str | None


class RetractedAlert(msgspec.Struct, frozen=True):
    """`retracted`: the announcement withdrawn."""

    event: str
    grade: str | None
    grade_label: str
    anc: Number
    effective: str


class EventRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An alert event (new, worsening, resolved, retracted, ...: `event` is its EventKind). The
    fields with a default are those the contract gained after its first release: a record a store
    kept from before them still reads (each is always given when a record is built)."""

    patient: str
    event: str
    grade: str | None
    anc: Number | None
    effective: str | None
    observations: list[str]
    episode: str
    scheme: str
    grade_label: str
    method: str | None
    anc_at_most: bool | None
    wbc: Number | None
    previous_anc: Number | None
    previous_effective: str | None
    cytopenia: str | None = None
    hemoglobin: Number | None = None
    platelets: Number | None = None
    chronic: bool = False
    febrile: bool = False
    threshold_rule: str | None = None
    picture: str | None = None
    effective_note: str | UnsetType = UNSET
    mapped_codes: list[MappedCode] | UnsetType = UNSET
    recipients: list[str] | UnsetType = UNSET
    recipient_rule: str | UnsetType = UNSET
    temperature: TemperatureReading | UnsetType = UNSET
    recovering: Recovering | UnsetType = UNSET
    recurrence: Recurrence | UnsetType = UNSET
    episode_memory: EpisodeMemory | UnsetType = UNSET
    correction: Correction | UnsetType = UNSET
    retracted: RetractedAlert | UnsetType = UNSET
    episode_status: str | UnsetType = UNSET


class NotAssessedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A panel that reached no assessment, with the reason."""

    patient: str
    event: str = "not-assessed"
    grade: None = None
    anc: None = None
    effective: str
    observations: list[str]
    reason: str


class RejectedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A result, or a panel, that could not be read: the reason, never an alert."""

    patient: str | None
    event: str = "rejected"
    grade: None = None
    anc: None = None
    effective: str | None
    observations: list[str]
    reason: str
    code: str | None
    mapped_codes: list[MappedCode] | UnsetType = UNSET


class StaleRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A panel collected before the newest already assessed (`stale_record`)."""

    patient: str
    event: str = "stale"
    grade: str | None
    anc: Number
    effective: str
    observations: list[str]
    reason: str
    newest_effective: str | None = None  # (gained after the first release)


class QuarantinedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A panel that could not be decided (service/output/outcomes.py `failure_record`)."""

    patient: str
    event: str = QUARANTINED
    grade: None = None
    anc: None = None
    effective: str | None
    observations: list[str]
    reason: str
    panel: str


Decision = EventRecord | NotAssessedRecord | RejectedRecord | StaleRecord | QuarantinedRecord


class _Kind(msgspec.Struct):
    event: str


_decode_kind = msgspec.json.Decoder(_Kind).decode
_decoders: dict[str, Callable[[bytes | str], Decision]] = {
    "not-assessed": msgspec.json.Decoder(NotAssessedRecord).decode,
    "rejected": msgspec.json.Decoder(RejectedRecord).decode,
    "stale": msgspec.json.Decoder(StaleRecord).decode,
    QUARANTINED: msgspec.json.Decoder(QuarantinedRecord).decode,
}
_decode_event = msgspec.json.Decoder(EventRecord).decode


def decode_decision(data: bytes | str) -> Decision:
    """A stored record read back whole, as the struct of its kind (any key order: PostgreSQL's jsonb
    keeps its own)."""
    decode = _decoders.get(_decode_kind(data).event, _decode_event)
    return decode(data)


def event_record(event: AlertEvent, scheme: Scheme, recipients: Recipients | None = None) -> EventRecord:
    a = event.assessment
    x = event.retracted
    return EventRecord(
        patient=event.patient,
        event=event.kind.value,
        grade=event.band.severity,
        anc=_number(a.anc) if a else None,
        effective=a.effective if a else (x.effective if x else None),
        observations=list(a.refs) if a else [],
        episode=event.episode,
        scheme=scheme.name,
        grade_label=event.band.label,
        method=a.method if a else None,
        anc_at_most=a.at_most if a else None,
        wbc=_number(a.wbc) if a and a.wbc is not None else None,
        previous_anc=_number(event.previous_anc) if event.previous_anc is not None else None,
        previous_effective=event.previous_effective,
        cytopenia=a.cytopenia if a else None,
        hemoglobin=_number(a.hemoglobin, 2) if a and a.hemoglobin is not None else None,
        platelets=_number(a.platelets) if a and a.platelets is not None else None,
        chronic=event.chronic,
        febrile=event.febrile,
        threshold_rule=a.threshold_rule if a else None,
        picture=_picture(a),
        effective_note=a.time_note if a is not None and a.time_note else UNSET,
        mapped_codes=[MappedCode(ref, source, concept_map) for ref, source, concept_map in a.mapped]
        if a is not None and a.mapped
        else UNSET,
        recipients=list(recipients.refs) if recipients is not None else UNSET,
        recipient_rule=recipients.rule if recipients is not None else UNSET,
        temperature=TemperatureReading(round(event.fever.celsius, 2), event.fever.effective, event.fever.ref)
        if event.fever is not None
        else UNSET,
        recovering=Recovering(*event.recovering) if event.recovering is not None else UNSET,
        recurrence=Recurrence(event.recurred_after, event.opening)
        if event.recurred_after is not None
        else UNSET,
        episode_memory=EpisodeMemory(*event.memory) if event.memory is not None else UNSET,
        correction=Correction(event.revision, event.reason) if event.revision else UNSET,
        retracted=RetractedAlert(x.kind.value, x.band.severity, x.band.label, _number(x.anc), x.effective)
        if x is not None
        else UNSET,
        episode_status=_episode_status(event) if x is not None else UNSET,
    )


def _episode_status(event: AlertEvent) -> str:
    """What a retraction leaves of the episode."""
    return "entered-in-error" if event.worst is None else ("active" if event.episode_open else "inactive")


def not_assessed_record(n: NotAssessed) -> NotAssessedRecord:
    return NotAssessedRecord(
        patient=n.patient, effective=n.effective, observations=list(n.refs), reason=n.reason
    )


def rejected_record(rejected: Rejected) -> RejectedRecord:
    mapped: list[MappedCode] | UnsetType = UNSET
    if rejected.mapped_from is not None and rejected.concept_map is not None:
        mapped = [MappedCode(rejected.ref or "", rejected.mapped_from, rejected.concept_map)]
    return RejectedRecord(
        patient=rejected.patient,
        effective=rejected.effective,
        observations=[rejected.ref] if rejected.ref else [],
        reason=rejected.reason,
        code=rejected.code,
        mapped_codes=mapped,
    )


def panel_rejected_record(rejection: PanelRejection, members: list[LabResult]) -> RejectedRecord:
    inputs = rejection.rejected.inputs
    mapped = [
        MappedCode(r.ref, r.mapped_from, r.concept_map)
        for r in inputs
        if r.mapped_from is not None and r.concept_map is not None
    ]
    return RejectedRecord(
        patient=rejection.patient,
        effective=inputs[0].effective if inputs else members[0].effective,
        observations=[r.ref for r in inputs],
        reason=rejection.rejected.reason,
        code=inputs[0].code if inputs else None,
        mapped_codes=mapped or UNSET,
    )


def stale_record(assessment: Assessment, newest_effective: str | None) -> StaleRecord:
    """A panel collected before the newest panel already assessed for the patient: remembered (a
    correction may still revise it) but it opens, worsens and resolves nothing. Visible, not silent."""
    return StaleRecord(
        patient=assessment.patient,
        grade=assessment.band.severity,
        anc=_number(assessment.anc),
        effective=assessment.effective,
        observations=list(assessment.refs),
        reason="collected before the newest panel already assessed",
        newest_effective=newest_effective,
    )


def _picture(a: Assessment | None) -> str | None:
    """The white-cell picture the ANC alone does not tell (service/core/picture.py), if any."""
    if a is None:
        return None
    named = white_cells(a.wbc, a.anc, a.at_most).picture
    return named.value if named is not None else None


def _number(value: float, digits: int = 1) -> int | float:
    rounded = round(value, digits)
    return int(rounded) if rounded.is_integer() else rounded
