"""What a decided panel becomes — its decision records and the alert writes of its events — and what
a panel that could not be decided becomes: a quarantine record. One implementation for replay and the
live loop, so that replay predicts exactly what the live loop can send.

Failure containment: whatever goes wrong while one panel is decided or its writes are built (a
defect, a value no writer accepts, a resource no model validates) stays with that panel. The caller
keeps the patient's state as it was before the panel, stores or prints the quarantine record
(the exception's class as the reason: never its message, which may quote the input), and goes on
with every other panel and patient. Replay builds (and so validates) every alert even when its
resources are not asked for, so `replay` and `replay --alerts` decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.output.alerts import AlertWrites, build
from service.core.grading import Scheme
from service.core.observations import LabResult
from service.core.panels import PanelDecision
from service.core.recipients import Recipients
from service.config import AlertSettings
from service.output.events import event_record, not_assessed_record, panel_rejected_record, stale_record

QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True)
class PanelOutcome:
    """The records of one decided panel, in order; each event record with its alert writes."""

    records: tuple[tuple[dict[str, Any], AlertWrites | None], ...]


def panel_outcome(
    decision: PanelDecision, members: Sequence[LabResult], recipients: Sequence[Recipients], scheme: Scheme,
    alerts: AlertSettings, *, sent: str,
) -> PanelOutcome:
    """Records of `decision`: not-assessed, rejected, stale, then each event with its writes built
    and validated. `recipients`: one per event, in order. Raises whatever building raises: the
    caller contains it (`failure_record`)."""
    out: list[tuple[dict[str, Any], AlertWrites | None]] = []
    if decision.not_assessed is not None:
        out.append((not_assessed_record(decision.not_assessed), None))
    if decision.rejection is not None:
        out.append((panel_rejected_record(decision.rejection, list(members)), None))
    if decision.stale and decision.assessment is not None:
        out.append((stale_record(decision.assessment, decision.newest_effective), None))
    for event, to in zip(decision.events, recipients, strict=True):
        writes = build(event, scheme, alerts, sent=sent, recipients=to.refs)
        out.append((event_record(event, scheme, to), writes))
    return PanelOutcome(tuple(out))


def failure_record(patient: str, panel: str, members: Sequence[LabResult], err: BaseException) -> dict[str, Any]:
    """The record of a panel that could not be decided: kept and visible, never an alert. The
    reason names the exception's class only (its message may quote the input: PHI)."""
    refs = sorted({m.ref for m in members})
    return {
        "patient": patient,
        "event": QUARANTINED,
        "grade": None,
        "anc": None,
        "effective": min(members, key=lambda m: m.effective_us).effective if members else None,
        "observations": refs,
        "reason": f"could not be decided: {type(err).__name__}",
        "panel": panel,
    }
