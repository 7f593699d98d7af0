"""Which results belong to one collection (a panel), and the assessment of a panel.

A panel is the results of one patient with the same specimen reference, else the same
DiagnosticReport, else the same collection instant (reference §1.2).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from service.core import arrival
from service.core.anc import PanelRejected, best_result, compute_anc
from service.core.codes import Kind
from service.core.context import PatientContext, grading_for
from service.core.episodes import AlertEvent, Assessment, EventKind, PatientState, Temperature
from service.core.fever import fever_considered
from service.core.grading import Band
from service.core.history import add_temperature, apply, withdraw
from service.core.observations import LabResult
from service.core.reasons import FeverConsidered, NoEvent
from service.core.rules import DAY_US, Rules

_NO_CONTEXT = PatientContext()  # the default: nothing known of the patient (frozen, so shared)


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
    """Specimen, else DiagnosticReport, else collection instant (`arrival.panel_key`, which replay
    applies to the same three keys)."""
    return arrival.panel_key(
        specimen_key(result.specimen), report_key(report) if report else None, collection_key(result)
    )


@dataclass(frozen=True, slots=True)
class PanelRejection:
    patient: str
    panel: str
    rejected: PanelRejected


def cytopenia(results: Iterable[LabResult], rules: Rules) -> tuple[str | None, float | None, float | None]:
    """(isolated | pancytopenia | with anaemia | with thrombocytopenia, Hb g/dL, platelets /uL);
    the label is None unless both haemoglobin and platelets are in the panel."""
    results = tuple(results)
    hb = best_result(results, Kind.HGB)
    plt = best_result(results, Kind.PLT)
    hb_value = hb.value if hb is not None else None
    plt_value = plt.value if plt is not None else None
    if hb_value is None or plt_value is None:
        return None, hb_value, plt_value
    low_hb = hb_value < rules.hemoglobin_below_g_dl
    low_plt = plt_value < rules.platelets_below_per_ul
    label = {
        (True, True): "pancytopenia",
        (False, False): "isolated",
        (True, False): "with anaemia",
        (False, True): "with thrombocytopenia",
    }[(low_hb, low_plt)]
    return label, hb_value, plt_value


@dataclass(frozen=True, slots=True)
class NotAssessed:
    patient: str
    panel: str
    effective: str
    reason: str
    refs: tuple[str, ...]


def assess(
    patient: str,
    panel: str,
    results: Iterable[LabResult],
    rules: Rules,
    context: PatientContext = _NO_CONTEXT,
) -> Assessment | PanelRejection | NotAssessed | None:
    """None when the panel has nothing to assess (no neutrophil result, or none final yet)."""
    results = tuple(results)
    outcome = compute_anc(results, rules.neutrophil_pct_with_bands_is_segmented)
    if outcome is None:
        return None
    if isinstance(outcome, PanelRejected):
        return PanelRejection(patient, panel, outcome)
    primary = outcome.inputs[0]
    grading = grading_for(rules, context, primary.effective_us)
    refs = tuple(r.ref for r in outcome.inputs)
    if grading.scheme is None:
        return NotAssessed(patient, panel, primary.effective, grading.reason or "not assessed", refs)
    label, hb, plt = cytopenia(results, rules)
    based_on = tuple(sorted({ref for r in results for ref in r.based_on}))
    return Assessment(
        patient,
        panel,
        outcome.value,
        outcome.at_most,
        outcome.method,
        outcome.wbc,
        grading.scheme.grade(outcome.value, outcome.lln),
        primary.effective,
        primary.effective_us,
        refs,
        tuple(r.version for r in outcome.inputs),
        label,
        hb,
        plt,
        grading.rule,
        based_on,
        primary.time_note,
        _mapped(results),
    )


def _mapped(results: tuple[LabResult, ...]) -> tuple[tuple[str, str, str], ...]:
    """(Observation, local "system|code", ConceptMap) of each member the site's ConceptMap translated."""
    return tuple(
        (r.ref, r.mapped_from, r.concept_map)
        for r in results
        if r.mapped_from is not None and r.concept_map is not None
    )


@dataclass(frozen=True, slots=True)
class PanelDecision:
    state: PatientState  # the patient's state after the panel
    events: tuple[AlertEvent, ...] = ()
    rejection: PanelRejection | None = None
    not_assessed: NotAssessed | None = None
    assessed: bool = False  # the panel had an ANC to grade
    stale: bool = False  # collected before the newest panel already assessed
    assessment: Assessment | None = None  # the panel's assessment, when it had an ANC to grade
    newest_effective: str | None = None  # for a stale panel: the collection time of the newest one assessed
    no_event: NoEvent | None = None  # why the panel announced nothing of its own (not set for a rejection)
    revised_from: Band | None = None  # for a re-assessed panel: the band it had before
    withdrawn: bool = False  # assessed before, the panel has no ANC now: it left the patient's history
    fever: FeverConsidered | None = None  # the panel's body temperatures, as the fever rule judged them


def implausible_time(
    results: Iterable[LabResult], rules: Rules, context: PatientContext, clock_us: int | None
) -> PanelRejected | None:
    """The panel's members whose collection time cannot be true, with the reason, or None.

    Later than the result was recorded: each result's meta.lastUpdated bounds its own collection
    time (a result without one is bounded by `clock_us`, the reading clock: the newest
    meta.lastUpdated read, or now); earlier than the patient's birth or than 1900. Such a time would
    otherwise stand as the patient's newest (or oldest) collection and turn every real panel after
    it into a stale one, silencing the patient."""
    late: list[LabResult] = []
    early: list[LabResult] = []
    floor = rules.earliest_collection_us
    born = context.birth_us - DAY_US if context.birth_us is not None else None
    for r in results:
        bound = r.updated_us if r.updated_us is not None else clock_us
        if bound is not None and r.effective_us > bound + rules.collection_slack_us:
            late.append(r)
        elif r.effective_us < floor or (born is not None and r.effective_us < born):
            early.append(r)
    if late:
        return PanelRejected(COLLECTED_AFTER_RECORDED, tuple(late))
    if early:
        reason = (
            COLLECTED_BEFORE_1900 if any(r.effective_us < floor for r in early) else COLLECTED_BEFORE_BIRTH
        )
        return PanelRejected(reason, tuple(early))
    return None


COLLECTED_AFTER_RECORDED = "collection time later than the result was recorded"
COLLECTED_BEFORE_BIRTH = "collection time before the patient's birth date"
COLLECTED_BEFORE_1900 = "collection time before 1900"


def decide(
    state: PatientState,
    patient: str,
    panel: str,
    results: Iterable[LabResult],
    rules: Rules,
    context: PatientContext = _NO_CONTEXT,
    clock_us: int | None = None,
) -> PanelDecision:
    """One panel through the whole core: collection times checked, temperatures remembered, ANC,
    grade, episode (and revision when the panel was assessed before). The same function serves
    replay and the live loop, so replay is the live loop's oracle. `clock_us`: the reading clock,
    bounding the collection time of a result that has no meta.lastUpdated."""
    results = tuple(results)
    impossible = implausible_time(results, rules, context, clock_us)
    if impossible is not None:
        # Never alerts, never becomes the patient's newest collection; if the panel was assessed
        # before (a correction moved its time), what rested on it goes.
        state, withdrawn = withdraw(state, patient, panel, rules, reason="rejected on correction")
        return PanelDecision(state, tuple(withdrawn), rejection=PanelRejection(patient, panel, impossible))
    events: list[AlertEvent] = []
    temperatures = [r for r in results if r.kind is Kind.TEMP]
    readings = tuple(
        Temperature(r.ref, r.effective, r.effective_us, r.value)  # type: ignore[arg-type]  # assessable: set
        for r in temperatures
        if r.assessable
    )
    for reading in readings:
        state, produced = add_temperature(state, reading, rules)
        events.extend(produced)
    labs = tuple(r for r in results if r.kind is not Kind.TEMP)
    decision = _labs(state, patient, panel, labs, rules, context, events)
    if not temperatures:
        return decision
    febrile = any(e.kind is EventKind.FEBRILE for e in decision.events)
    return replace(decision, fever=fever_considered(decision.state, readings, febrile, rules))


def _labs(
    state: PatientState,
    patient: str,
    panel: str,
    labs: tuple[LabResult, ...],
    rules: Rules,
    context: PatientContext,
    events: list[AlertEvent],
) -> PanelDecision:
    """The laboratory results of a panel through ANC, grade and episode; `events`: those its
    temperatures already produced."""
    if not labs:
        return PanelDecision(state, tuple(events))
    outcome = assess(patient, panel, labs, rules, context)
    if isinstance(outcome, NotAssessed):
        return PanelDecision(state, tuple(events), not_assessed=outcome)
    if isinstance(outcome, PanelRejection):
        # An implausible panel never alerts; if it was assessed before, what rested on it goes.
        state, withdrawn = withdraw(state, patient, panel, rules, reason="rejected on correction")
        return PanelDecision(state, tuple(events + withdrawn), rejection=outcome)
    previous = next((h for h in state.history if h.panel == panel), None)
    if outcome is None:
        state, withdrawn = withdraw(state, patient, panel, rules, reason=_withdrawal_reason(labs))
        return PanelDecision(
            state,
            tuple(events + withdrawn),
            no_event=None if previous else NoEvent.NO_ANC,
            withdrawn=previous is not None,
        )
    reason = _revision_reason(previous, outcome) if previous is not None else "corrected"
    newest = state.machine.last_effective
    state, produced, stale = apply(state, outcome, rules, reason=reason)
    events = [*events, *produced]
    return PanelDecision(
        state,
        tuple(events),
        assessed=True,
        stale=stale,
        assessment=outcome,
        newest_effective=newest if stale else None,
        revised_from=previous.band if previous else None,
        no_event=_no_event(state, stale, previous, bool(events)),
    )


def _no_event(
    after: PatientState, stale: bool, previous: Assessment | None, announced: bool
) -> NoEvent | None:
    """Why an assessed panel announced nothing: stale (whatever its temperatures announced), else,
    when the panel's decision announced nothing at all, a revision that changed no announcement, or
    the episode rules' "never a repeated alert" (reference §3)."""
    if stale:
        return NoEvent.STALE
    if announced:
        return None
    if previous is not None:
        return NoEvent.REVISION_UNCHANGED
    return NoEvent.NOT_NEUTROPENIC if after.machine.episode is None else NoEvent.NOT_WORSE


def _withdrawal_reason(results: tuple[LabResult, ...]) -> str:
    statuses = {r.status for r in results}
    for status in ("entered-in-error", "cancelled"):
        if status in statuses:
            return status
    return "no longer assessable"


def _revision_reason(previous: Assessment, now: Assessment) -> str:
    """'corrected' when a result used before changed version; 'updated' when results were added."""
    before = dict(zip(previous.refs, previous.versions, strict=True))
    if any(
        ref in before and before[ref] != version for ref, version in zip(now.refs, now.versions, strict=True)
    ):
        return "corrected"
    return "updated"


def local_reference(ref: str | None, resource_type: str) -> str | None:
    """ "Observation/x", ".../fhir/Observation/x" or "Observation/x/_history/2" -> "Observation/x"."""
    if not ref:
        return None
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1]:
        return f"{resource_type}/{parts[-1]}"
    return None


def report_members(
    report_id: str, results: Iterable[str | None], specimens: Iterable[str | None]
) -> list[tuple[str, Report]]:
    """(Observation reference, Report) for each result of a DiagnosticReport."""
    distinct = {s for s in specimens if s}
    report = Report(f"DiagnosticReport/{report_id}", distinct.pop() if len(distinct) == 1 else None)
    members = (local_reference(r, "Observation") for r in results)
    return [(m, report) for m in members if m is not None]
