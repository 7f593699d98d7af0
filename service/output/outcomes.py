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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.config import AlertSettings
from service.core.context import PatientContext
from service.core.episodes import AlertEvent, PatientState
from service.core.grading import Scheme
from service.core.observations import LabResult
from service.core.panels import PanelDecision, decide
from service.core.recipients import Recipients
from service.core.rules import Rules
from service.output.alerts import AlertWrites, build
from service.output.events import (
    Decision,
    QuarantinedRecord,
    event_record,
    not_assessed_record,
    panel_rejected_record,
    stale_record,
)

Record = tuple[Decision, AlertWrites | None]  # a decision record, with its alert writes when it is an alert


@dataclass(frozen=True, slots=True)
class PanelOutcome:
    """The records of one decided panel, in order; each event record with its alert writes."""

    records: tuple[Record, ...]


def panel_outcome(
    decision: PanelDecision,
    members: Sequence[LabResult],
    recipients: Sequence[Recipients],
    scheme: Scheme,
    alerts: AlertSettings,
    *,
    sent: str,
) -> PanelOutcome:
    """Records of `decision`: not-assessed, rejected, stale, then each event with its writes built
    and validated. `recipients`: one per event, in order. Raises whatever building raises: the
    caller contains it (`failure_record`)."""
    out: list[Record] = []
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


def failure_record(
    patient: str, panel: str, members: Sequence[LabResult], err: BaseException
) -> QuarantinedRecord:
    """The record of a panel that could not be decided: kept and visible, never an alert. The
    reason names the exception's class only (its message may quote the input: PHI)."""
    return QuarantinedRecord(
        patient=patient,
        effective=min(members, key=lambda m: m.effective_us).effective if members else None,
        observations=sorted({m.ref for m in members}),
        reason=f"could not be decided: {type(err).__name__}",
        panel=panel,
    )


@dataclass(frozen=True, slots=True)
class Judged:
    """One panel judged: the patient's state after it (as before it when quarantined), the core's
    decision (None: quarantined, `error` says why) and its records, each event's with its writes."""

    state: PatientState
    decision: PanelDecision | None
    records: tuple[Record, ...]
    error: Exception | None = None


def quarantined(
    before: PatientState, patient: str, panel: str, members: Sequence[LabResult], err: Exception
) -> Judged:
    """A panel that could not be decided: its one record, the patient's state left as it was."""
    return Judged(before, None, ((failure_record(patient, panel, members, err), None),), err)


def judged(
    before: PatientState,
    patient: str,
    panel: str,
    members: Sequence[LabResult],
    rules: Rules,
    context: PatientContext,
    clock_us: int | None,
) -> PanelDecision | Judged:
    """The core's decision on a panel, or the panel quarantined when deciding raised."""
    try:
        return decide(before, patient, panel, members, rules, context, clock_us)
    except Exception as err:  # noqa: BLE001 - contained to this panel (module docstring)
        return quarantined(before, patient, panel, members, err)


def orders(event: AlertEvent) -> tuple[str, ...]:
    """The orders (ServiceRequest references) an event's results are based on: who is told depends
    on them."""
    return event.assessment.based_on if event.assessment else ()


def concluded(
    before: PatientState,
    patient: str,
    panel: str,
    members: Sequence[LabResult],
    decision: PanelDecision,
    recipients: Callable[[tuple[str, ...]], Recipients],
    scheme: Scheme,
    alerts: AlertSettings,
    *,
    sent: str | None,
) -> Judged:
    """A decided panel's records and writes (`panel_outcome`): `recipients` of each event's `orders`;
    `sent` the instant the alerts are sent (None: the first assessment's collection time). Quarantined
    when any of it raises."""
    try:
        to = [recipients(orders(event)) for event in decision.events]
        at = sent or next((e.assessment.effective for e in decision.events if e.assessment), "")
        outcome = panel_outcome(decision, members, to, scheme, alerts, sent=at)
    except Exception as err:  # noqa: BLE001 - contained to this panel (module docstring)
        return quarantined(before, patient, panel, members, err)
    return Judged(decision.state, decision, outcome.records)
