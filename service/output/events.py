"""The JSON records of decisions: the replay contract (EVENTS.jsonl), also logged and stored by
the live loop. Fields are only ever added, never renamed."""

from __future__ import annotations

from typing import Any

from service.core.episodes import AlertEvent, Assessment
from service.core.grading import Scheme
from service.core.observations import LabResult, Rejected
from service.core.panels import NotAssessed, PanelRejection
from service.core.picture import white_cells
from service.core.recipients import Recipients


def event_record(event: AlertEvent, scheme: Scheme, recipients: Recipients | None = None) -> dict[str, Any]:
    a = event.assessment
    x = event.retracted
    record: dict[str, Any] = {
        "patient": event.patient,
        "event": event.kind.value,
        "grade": event.band.severity,
        "anc": _number(a.anc) if a else None,
        "effective": a.effective if a else (x.effective if x else None),
        "observations": list(a.refs) if a else [],
        "episode": event.episode,
        "scheme": scheme.name,
        "grade_label": event.band.label,
        "method": a.method if a else None,
        "anc_at_most": a.at_most if a else None,
        "wbc": _number(a.wbc) if a and a.wbc is not None else None,
        "previous_anc": _number(event.previous_anc) if event.previous_anc is not None else None,
        "previous_effective": event.previous_effective,
        "cytopenia": a.cytopenia if a else None,
        "hemoglobin": _number(a.hemoglobin, 2) if a and a.hemoglobin is not None else None,
        "platelets": _number(a.platelets) if a and a.platelets is not None else None,
        "chronic": event.chronic,
        "febrile": event.febrile,
        "threshold_rule": a.threshold_rule if a else None,
        "picture": _picture(a),
    }
    if a is not None and a.time_note:
        record["effective_note"] = a.time_note
    if a is not None and a.mapped:
        record["mapped_codes"] = [
            _mapped_code(ref, source, concept_map) for ref, source, concept_map in a.mapped
        ]
    if recipients is not None:
        record["recipients"] = list(recipients.refs)
        record["recipient_rule"] = recipients.rule
    if event.fever is not None:
        record["temperature"] = {
            "celsius": round(event.fever.celsius, 2),
            "effective": event.fever.effective,
            "observation": event.fever.ref,
        }
    if event.recovering is not None:
        record["recovering"] = {"confirmations": event.recovering[0], "needed": event.recovering[1]}
    if event.recurred_after is not None:
        record["recurrence"] = {"resolved": event.recurred_after, "count": event.opening}
    if event.memory is not None:
        record["episode_memory"] = {"episodes": event.memory[0], "days": event.memory[1]}
    if event.revision:
        record["correction"] = {"revision": event.revision, "reason": event.reason}
    if x is not None:
        record["retracted"] = {
            "event": x.kind.value,
            "grade": x.band.severity,
            "grade_label": x.band.label,
            "anc": _number(x.anc),
            "effective": x.effective,
        }
        record["episode_status"] = (
            "entered-in-error" if event.worst is None else ("active" if event.episode_open else "inactive")
        )
    return record


def _mapped_code(ref: str, source: str, concept_map: str) -> dict[str, str]:
    """One member read through the site's ConceptMap: which local coding, translated by which map."""
    return {"observation": ref, "code": source, "concept_map": concept_map}


def not_assessed_record(n: NotAssessed) -> dict[str, Any]:
    return {
        "patient": n.patient,
        "event": "not-assessed",
        "grade": None,
        "anc": None,
        "effective": n.effective,
        "observations": list(n.refs),
        "reason": n.reason,
    }


def rejected_record(rejected: Rejected) -> dict[str, Any]:
    record: dict[str, Any] = {
        "patient": rejected.patient,
        "event": "rejected",
        "grade": None,
        "anc": None,
        "effective": rejected.effective,
        "observations": [rejected.ref] if rejected.ref else [],
        "reason": rejected.reason,
        "code": rejected.code,
    }
    if rejected.mapped_from is not None and rejected.concept_map is not None:
        record["mapped_codes"] = [
            _mapped_code(rejected.ref or "", rejected.mapped_from, rejected.concept_map)
        ]
    return record


def panel_rejected_record(rejection: PanelRejection, members: list[LabResult]) -> dict[str, Any]:
    inputs = rejection.rejected.inputs
    mapped = [
        _mapped_code(r.ref, r.mapped_from, r.concept_map)
        for r in inputs
        if r.mapped_from is not None and r.concept_map is not None
    ]
    record: dict[str, Any] = {
        "patient": rejection.patient,
        "event": "rejected",
        "grade": None,
        "anc": None,
        "effective": inputs[0].effective if inputs else members[0].effective,
        "observations": [r.ref for r in inputs],
        "reason": rejection.rejected.reason,
        "code": inputs[0].code if inputs else None,
    }
    if mapped:
        record["mapped_codes"] = mapped
    return record


def stale_record(assessment: Assessment, newest_effective: str | None) -> dict[str, Any]:
    """A panel collected before the newest panel already assessed for the patient: remembered (a
    correction may still revise it) but it opens, worsens and resolves nothing. Visible, not silent."""
    return {
        "patient": assessment.patient,
        "event": "stale",
        "grade": assessment.band.severity,
        "anc": _number(assessment.anc),
        "effective": assessment.effective,
        "observations": list(assessment.refs),
        "reason": "collected before the newest panel already assessed",
        "newest_effective": newest_effective,
    }


def _picture(a: Assessment | None) -> str | None:
    """The white-cell picture the ANC alone does not tell (service/core/picture.py), if any."""
    if a is None:
        return None
    named = white_cells(a.wbc, a.anc, a.at_most).picture
    return named.value if named is not None else None


def _number(value: float, digits: int = 1) -> int | float:
    rounded = round(value, digits)
    return int(rounded) if rounded.is_integer() else rounded
