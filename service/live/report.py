"""What the poll cycle tells as it goes: the counts of a cycle (`CycleReport`), its progress between
steps for /readyz and the metrics (`Progress`), the log line of one step (`StepTally`), and each
judged panel's records as the store keeps them, counted and logged (`panel_records`). The cycle's
control flow is service/live/worker.py's."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field

import structlog

from service import metrics
from service.core.undecided import panel_unassessed
from service.live.store.base import PanelWork
from service.output.events import EventRecord, RejectedRecord
from service.output.outcomes import Judged
from service.output.transaction import StoredRecord, outbox_writes

log = structlog.get_logger("neutrowatch.worker")


@dataclass
class CycleReport:
    pages: int = 0
    observations: int = 0
    new_versions: int = 0
    panels_assessed: int = 0
    events: dict[str, int] = field(default_factory=dict)
    written: int = 0
    delivered_all: bool = True
    temperature_searches: int = 0
    cursor: str | None = None
    search_pages: int = 0  # pages of the main search (`pages` counts temperature searches' pages too)
    steps: int = 0  # steps taken (each: at most poll.max_pages_per_step pages, decided, posted, committed)
    caught_up: bool = False  # the search was read to its end (False: stopped between steps)


@dataclass
class Progress:
    """What /readyz and the metrics say about the cycle in progress: updated after every step, so a
    long catch-up is visibly working (a step committed recently) or visibly stuck (none did)."""

    step_at: float | None = (
        None  # local time the last step committed (read, decided, delivered, cursor moved)
    )
    catching_up: bool = False  # a cycle has committed a step and has not yet read to the end of the search
    pages: int = 0  # pages of the main search read so far by the cycle in progress
    lag_seconds: float | None = None  # now - the newest meta.lastUpdated read, after the last step
    writes_pending: bool = (
        False  # the last step ended with writes the server has not confirmed (the cursor stayed)
    )


@dataclass(frozen=True, slots=True)
class StepTally:
    """A cycle's counts at one moment (`of`): a step's own counts are the difference of two."""

    pages: int
    observations: int
    new: int
    panels: int
    written: int
    events: int

    @classmethod
    def of(cls, report: CycleReport) -> StepTally:
        return cls(
            pages=report.search_pages,
            observations=report.observations,
            new=report.new_versions,
            panels=report.panels_assessed,
            written=report.written,
            events=sum(report.events.values()),
        )

    def log_step(self, report: CycleReport, *, committed: bool, lag: float | None, caught_up: bool) -> None:
        """The log line of the step that began at this tally and brought the cycle to `report`."""
        pages, observations, new, panels, written, events = (
            now - then for now, then in zip(astuple(StepTally.of(report)), astuple(self), strict=True)
        )
        log.info(
            "poll step",
            step=report.steps,
            pages=pages,
            observations=observations,
            new=new,
            panels=panels,
            events=events,
            written=written,
            committed=committed,
            cursor=report.cursor,
            lag_seconds=None if lag is None else round(lag, 1),
            caught_up=caught_up,
            cycle_pages=report.search_pages,
        )


def panel_records(work: PanelWork, step: Judged, report: CycleReport) -> list[StoredRecord]:
    """The judged panel's records as the store keeps them (each alert with its outbox write),
    counted and logged."""
    d = step.decision
    if d is None:
        ((record, _none),) = step.records
        metrics.PANEL_FAILURES.labels(type(step.error).__name__).inc()
        log.error(
            "panel quarantined: could not be decided",
            patient=work.patient,
            panel=work.panel,
            observations=record.observations,
            error_type=type(step.error).__name__,
        )
        return [(record, None)]
    metrics.count_unassessed(panel_unassessed(d, work.results))
    if d.assessed:
        report.panels_assessed += 1
        metrics.PANELS.inc()
    if d.stale:
        metrics.STALE_PANELS.inc()
        log.info("stale panel: collected before the newest assessed", patient=work.patient, panel=work.panel)
    records: list[StoredRecord] = []
    for record, alert in step.records:
        if alert is None:
            if isinstance(record, RejectedRecord):
                metrics.REJECTIONS.labels(metrics.reason_label(record.reason)).inc()
                log.warning("panel rejected", patient=work.patient, panel=work.panel, reason=record.reason)
            records.append((record, None))
            continue
        assert isinstance(record, EventRecord)  # (only an event has alert writes)
        records.append((record, outbox_writes(alert, record.event)))
        metrics.ALERTS.labels(record.event, record.grade or "none").inc()
        report.events[record.event] = report.events.get(record.event, 0) + 1
        log.info(
            "alert decided",
            patient=work.patient,
            alert=record.event,
            grade=record.grade,
            episode=record.episode,
            observations=record.observations,
        )
    return records
