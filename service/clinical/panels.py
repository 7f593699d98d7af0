"""Which results belong to one collection (a panel), and the assessment of a panel.

A panel is the results of one patient with the same specimen reference, else the same
DiagnosticReport, else the same collection instant (issue 2, "Panel").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .anc import Anc, PanelRejected, compute_anc
from .episodes import AlertEvent, Assessment, EpisodeState, step
from .grading import Scheme
from .observations import LabResult


@dataclass(frozen=True, slots=True)
class Report:
    """What a DiagnosticReport says about one of its results."""

    report: str  # "DiagnosticReport/<id>"
    specimen: str | None  # the report's specimen when it names exactly one


def specimen_key(specimen: str | None) -> str | None:
    return "specimen:" + specimen if specimen else None


def report_key(report: Report) -> str:
    return specimen_key(report.specimen) or "report:" + report.report


def collection_key(result: LabResult) -> str:
    return f"effective:{result.effective_us}"


def panel_key(result: LabResult, report: Report | None) -> str:
    """Specimen, else DiagnosticReport, else collection instant. (replay applies the same
    precedence in SQL, as COALESCE over these three keys.)"""
    return specimen_key(result.specimen) or (report_key(report) if report else None) or collection_key(result)


@dataclass(frozen=True, slots=True)
class PanelRejection:
    patient: str
    panel: str
    rejected: PanelRejected


def assess(
    patient: str, panel: str, results: Iterable[LabResult], scheme: Scheme
) -> Assessment | PanelRejection | None:
    """None when the panel has nothing to assess (no neutrophil result, or none final yet)."""
    outcome = compute_anc(results)
    if outcome is None:
        return None
    if isinstance(outcome, PanelRejected):
        return PanelRejection(patient, panel, outcome)
    primary = outcome.inputs[0]
    return Assessment(patient, panel, outcome, scheme.grade(outcome.value, outcome.lln), primary.effective, primary.effective_us)


@dataclass(frozen=True, slots=True)
class PanelDecision:
    state: EpisodeState  # the patient's state after the panel
    event: AlertEvent | None = None
    rejection: PanelRejection | None = None
    assessed: bool = False  # the panel had an ANC to grade
    stale: bool = False  # collected before the newest panel already assessed


def decide(state: EpisodeState, patient: str, panel: str, results: Iterable[LabResult], scheme: Scheme) -> PanelDecision:
    """One panel through the whole core: ANC, grade, episode step. The same function serves
    replay and the live loop, so replay is the live loop's oracle."""
    outcome = assess(patient, panel, results, scheme)
    if outcome is None:
        return PanelDecision(state)
    if isinstance(outcome, PanelRejection):
        return PanelDecision(state, rejection=outcome)
    new_state, event, stale = step(state, outcome)
    return PanelDecision(new_state, event, assessed=True, stale=stale)


__all__ = ["Anc", "Assessment", "PanelRejection", "Report", "assess", "collection_key", "decide", "PanelDecision", "panel_key", "report_key", "specimen_key"]


def local_reference(ref: str | None, resource_type: str) -> str | None:
    """"Observation/x", ".../fhir/Observation/x" or "Observation/x/_history/2" -> "Observation/x"."""
    if not ref:
        return None
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1]:
        return f"{resource_type}/{parts[-1]}"
    return None


def report_members(report_id: str, results: Iterable[str | None], specimens: Iterable[str | None]) -> list[tuple[str, Report]]:
    """(Observation reference, Report) for each result of a DiagnosticReport."""
    distinct = {s for s in specimens if s}
    report = Report(f"DiagnosticReport/{report_id}", distinct.pop() if len(distinct) == 1 else None)
    members = (local_reference(r, "Observation") for r in results)
    return [(m, report) for m in members if m is not None]
