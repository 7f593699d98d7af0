"""The JSON records of decisions: the replay contract (EVENTS.jsonl), also logged and stored by
the live loop. Fields are only ever added, never renamed."""

from __future__ import annotations

from typing import Any

from .clinical.episodes import AlertEvent
from .clinical.grading import Scheme
from .clinical.observations import LabResult, Rejected
from .clinical.panels import PanelRejection


def event_record(event: AlertEvent, scheme: Scheme) -> dict[str, Any]:
    a = event.assessment
    return {
        "patient": event.patient,
        "event": event.kind.value,
        "grade": event.band.severity,
        "anc": _number(a.anc.value),
        "effective": a.effective,
        "observations": [r.ref for r in a.anc.inputs],
        "episode": event.episode,
        "scheme": scheme.name,
        "grade_label": event.band.label,
        "method": a.anc.method,
        "anc_at_most": a.anc.at_most,
        "wbc": _number(a.anc.wbc) if a.anc.wbc is not None else None,
        "previous_anc": _number(event.previous_anc) if event.previous_anc is not None else None,
        "previous_effective": event.previous_effective,
    }


def rejected_record(rejected: Rejected) -> dict[str, Any]:
    return {
        "patient": rejected.patient,
        "event": "rejected",
        "grade": None,
        "anc": None,
        "effective": rejected.effective,
        "observations": [rejected.ref] if rejected.ref else [],
        "reason": rejected.reason,
        "code": rejected.code,
    }


def panel_rejected_record(rejection: PanelRejection, members: list[LabResult]) -> dict[str, Any]:
    inputs = rejection.rejected.inputs
    return {
        "patient": rejection.patient,
        "event": "rejected",
        "grade": None,
        "anc": None,
        "effective": inputs[0].effective if inputs else members[0].effective,
        "observations": [r.ref for r in inputs],
        "reason": rejection.rejected.reason,
        "code": inputs[0].code if inputs else None,
    }


def _number(value: float) -> int | float:
    rounded = round(value, 1)
    return int(rounded) if rounded.is_integer() else rounded
