"""The decision trail from replay: replay's own reader (`Replay.load`, the SQLite engine) and loop
(`Replay.decide`, the same `panels.decide` the live loop runs) judge the patient's inputs; this
module only listens, through `decide`'s `trace` hook, and turns each judged panel into a `Step`
with the core's decision and reasons (`PanelDecision`, service/core/reasons.py) put in words by
prose.py. The events it lists are therefore exactly what replay emits for the patient."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from service.config import Settings
from service.core.anc import PanelRejected, compute_anc
from service.core.codes import TERMS, Kind, Prop
from service.core.context import grading_for
from service.core.episodes import Assessment, PatientState
from service.core.observations import DEFAULT_READ, LabResult, ReadPolicy, Rejected, canonical_reference
from service.core.panels import (
    COLLECTED_AFTER_RECORDED,
    COLLECTED_BEFORE_1900,
    COLLECTED_BEFORE_BIRTH,
    PanelDecision,
    local_reference,
)
from service.core.rules import Rules
from service.explain.model import (
    Event,
    ExplainError,
    Given,
    Input,
    Step,
    Trail,
    band_range,
    patient_reference,
)
from service.explain.prose import correction, fever_note, panel_note, rule_for
from service.fhir import model, raw
from service.fhir.fhirtime import from_epoch_us, to_epoch_us
from service.fhir.references import Resolved
from service.output.events import Decision, EventRecord, QuarantinedRecord
from service.replay.decisions import PanelTrace
from service.replay.engine import Replay, documents
from service.replay.rows import Available

CANONICAL_UNIT = {
    Prop.COUNT: "/uL",
    Prop.PERCENT: "%",
    Prop.FRACTION: "%",
    Prop.MASS: "g/dL",
    Prop.TEMP: "Cel",
}
KIND_LABEL = {
    Kind.WBC: "WBC",
    Kind.NEUT_PCT: "neutrophils %",
    Kind.SEG_PCT: "segs %",
    Kind.BAND_PCT: "bands %",
    Kind.NEUT_ABS: "neutrophils #",
    Kind.SEG_ABS: "segs #",
    Kind.BAND_ABS: "bands #",
    Kind.HGB: "haemoglobin",
    Kind.PLT: "platelets",
    Kind.TEMP: "temperature",
}

TIME_REJECTIONS = (COLLECTED_AFTER_RECORDED, COLLECTED_BEFORE_BIRTH, COLLECTED_BEFORE_1900)

GivenIndex = Mapping[tuple[str, str | None, int | None], Given]


def matcher(patient: str, policy: ReadPolicy = DEFAULT_READ) -> Callable[[str | None], bool]:
    """Does a subject reference name this patient? Both sides in their canonical spelling (reference
    §9: `Patient/x`, `Patient/x/_history/2` and the absolute URL under the base are one patient; a
    patient on another server is not the local one of the same id)."""
    wanted = canonical_reference(patient, "Patient", policy)
    key = wanted.key if isinstance(wanted, Resolved) else patient

    def matches(ref: str | None) -> bool:
        if not ref:
            return False
        got = canonical_reference(ref, "Patient", policy)
        return (got.key if isinstance(got, Resolved) else ref) == key

    return matches


def _available(akey: str) -> tuple[str | None, str | None]:
    """(meta.lastUpdated, Observation ref) of the arrival an availability key names."""
    if akey.startswith("~"):
        return None, None
    parts = akey.split("\x1f")
    try:
        updated = from_epoch_us(int(parts[0]))
    except (ValueError, IndexError):
        updated = None
    return updated, (parts[1] if len(parts) > 1 and parts[1] else None)


def _episode(ps: PatientState) -> dict[str, Any]:
    m = ps.machine
    view: dict[str, Any] = {"open": m.episode is not None}
    if m.episode is not None:
        view.update(
            episode=m.episode,
            opened=m.opened,
            worst=m.worst.label if m.worst else None,
            worst_severity=m.worst.severity if m.worst else None,
            current=m.current.label if m.current else None,
            febrile=m.febrile,
            chronic=m.chronic,
            recovering=m.normals,
            recurrences=m.opening,
        )
    view.update(
        last_anc=m.last_anc,
        last_effective=m.last_effective,
        remembered=len(ps.history),
        revisions=ps.revisions,
    )
    return view


# -- one judged panel ------------------------------------------------------------------------------------


def _input(r: LabResult, role: str, index: GivenIndex) -> Input:
    term = TERMS.get(r.code)
    code = (
        r.code if r.mapped_from is None else f"{r.code} (from {r.mapped_from} by ConceptMap {r.concept_map})"
    )
    return Input(
        ref=r.ref,
        version=r.version,
        code=code,
        kind=KIND_LABEL.get(r.kind, r.kind.value),
        status=r.status,
        effective=r.effective,
        effective_us=r.effective_us,
        given=index.get((r.ref, r.version, r.updated_us)),
        value=r.value,
        unit=CANONICAL_UNIT.get(term.prop) if term else None,
        at_most=r.at_most,
        role=role,
    )


def _role(r: LabResult, used: Sequence[str], cytopenia: bool) -> str:
    if used and r.ref == used[0]:
        return "ANC source"
    if r.ref in used:
        return "used"
    if not r.assessable:
        return f"not used: {r.status}" + ("" if r.value is not None else ", no value")
    if r.kind in (Kind.HGB, Kind.PLT):
        return "cytopenia" if cytopenia else "not used: cytopenia needs an ANC, Hb and platelets"
    return "not used: a preferred result was used" if used else "not used: no ANC in this panel"


def _used(d: PanelDecision | None) -> tuple[str, ...]:
    """The results the decision rests on, the ANC source first."""
    if d is None:
        return ()
    if d.assessment is not None:
        return d.assessment.refs
    if d.rejection is not None:
        return tuple(r.ref for r in d.rejection.rejected.inputs)
    return d.not_assessed.refs if d.not_assessed is not None else ()


def _roles(labs: Sequence[LabResult], d: PanelDecision | None) -> dict[str, str]:
    """Each result's part in the decision. A panel rejected for its collection time was never
    graded: its implausible members are named, the others were not used."""
    used = _used(d)
    if d is not None and d.rejection is not None and d.rejection.rejected.reason in TIME_REJECTIONS:
        rejected = f"rejected: {d.rejection.rejected.reason}"
        return {r.ref: rejected if r.ref in used else "not used: the panel is rejected" for r in labs}
    cytopenia = d is not None and d.assessment is not None and d.assessment.cytopenia is not None
    return {r.ref: _role(r, used, cytopenia) for r in labs}


def _trigger(t: PanelTrace, earlier: Step | None) -> str:
    _updated, arrived_ref = _available(t.akey)
    if earlier is None:
        return "first available" + (f" ({arrived_ref})" if arrived_ref else "")
    arrived = next((m for m in t.members if m.ref == arrived_ref), None)
    if arrived is not None:
        return f"{arrived_ref} version {arrived.version} arrived ({arrived.status})"
    return f"a newer version of {arrived_ref or 'a member'} was rejected; judged without it"


def _outcome(d: PanelDecision, labs: Sequence[LabResult]) -> tuple[str, str | None]:
    if d.rejection is not None:
        return "rejected", d.rejection.rejected.reason
    if not labs:
        return "temperature", None
    if d.not_assessed is not None:
        return "not-assessed", d.not_assessed.reason
    if not d.assessed:
        return "no-anc", None
    return ("stale" if d.stale else "assessed"), None


def _graded(
    a: Assessment, labs: Sequence[LabResult], t: PanelTrace, rules: Rules
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The step's ANC and grade: the assessment, with the lower limit of normal the results carried
    and the scheme it was graded in (the patient's own threshold may name another)."""
    anc = compute_anc(labs, rules.neutrophil_pct_with_bands_is_segmented)
    lln = anc.lln if anc is not None and not isinstance(anc, PanelRejected) else None
    scheme = grading_for(rules, t.context, a.effective_us).scheme or rules.scheme
    return (
        {
            "value": a.anc,
            "unit": "/uL",
            "at_most": a.at_most,
            "method": a.method,
            "wbc": a.wbc,
            "lln": lln,
            "observations": list(a.refs),
            "cytopenia": a.cytopenia,
            "hemoglobin": a.hemoglobin,
            "platelets": a.platelets,
        },
        {
            "scheme": scheme.name,
            "label": a.band.label,
            "severity": a.band.severity,
            "rank": a.band.rank,
            "range": band_range(scheme, a.band, lln),
            "threshold_rule": a.threshold_rule,
        },
    )


def _events(d: PanelDecision, t: PanelTrace, rules: Rules) -> list[Event]:
    # the records: [not-assessed] [panel rejected] [stale] then one per event, in that order
    offset = (d.not_assessed is not None) + (d.rejection is not None) + (d.stale and d.assessment is not None)
    out = []
    for event, record in zip(d.events, t.records[offset:], strict=True):
        assert isinstance(record, EventRecord)  # (an event's record)
        rule, detail = rule_for(event, t.before, rules)
        out.append(Event(event.kind.value, rule, detail, correction(event), record))
    return out


def _note(step: Step, d: PanelDecision, rules: Rules) -> str | None:
    note = panel_note(d, bool(step.events))
    if d.fever is None:
        return note
    fever = fever_note(d.fever, rules)
    if step.kind == "temperature":
        return fever
    return f"{note}; temperature: {fever}" if note else f"temperature: {fever}"


def _step(n: int, t: PanelTrace, rules: Rules, index: GivenIndex, earlier: Step | None) -> Step:
    d = t.decision
    labs = [m for m in t.members if m.kind is not Kind.TEMP]
    temps = [m for m in t.members if m.kind is Kind.TEMP]
    used = _used(d)
    roles = _roles(labs, d)
    inputs = [_input(r, roles[r.ref], index) for r in labs] + [_input(r, "temperature", index) for r in temps]
    primary = next((r for r in labs if r.ref in used[:1]), labs[0] if labs else (temps[0] if temps else None))
    step = Step(
        n=n,
        kind="panel" if labs else "temperature",
        akey=t.akey,
        available=_available(t.akey)[0],
        trigger=_trigger(t, earlier),
        patient=t.patient,
        panel=t.panel,
        effective=primary.effective if primary else None,
        effective_us=primary.effective_us if primary else None,
        inputs=inputs,
        outcome="assessed",
        before=_episode(t.before),
        after=_episode(d.state if d is not None else t.before),
        records=list(t.records),
        revision_of=earlier.n if earlier is not None else None,
    )
    if d is None:  # could not be decided: quarantined, the patient's state unchanged
        first = t.records[0] if t.records else None
        step.outcome, step.reason = (
            "quarantined",
            first.reason if isinstance(first, QuarantinedRecord) else None,
        )
        return step
    step.outcome, step.reason = _outcome(d, labs)
    if d.assessment is not None:
        step.anc, step.grade = _graded(d.assessment, labs, t, rules)
    step.events = _events(d, t, rules)
    step.note = _note(step, d, rules)
    return step


def _rejected_step(n: int, akey: str, rejected: Rejected, record: Decision, index: GivenIndex) -> Step:
    eff_us: int | None
    try:
        eff_us = to_epoch_us(rejected.effective) if rejected.effective else None
    except ValueError:
        eff_us = None
    term = TERMS.get(rejected.code or "")
    given = index.get((rejected.ref, rejected.version, rejected.updated_us)) if rejected.ref else None
    row = Input(
        ref=rejected.ref or "(no id)",
        version=rejected.version,
        code=rejected.code,
        kind=KIND_LABEL.get(term.kind) if term else None,
        status=None,
        effective=rejected.effective,
        effective_us=eff_us,
        given=given,
        value=None,
        unit=None,
        at_most=False,
        role=f"rejected: {rejected.reason}",
    )
    return Step(
        n=n,
        kind="rejected-input",
        akey=akey,
        available=_available(akey)[0],
        trigger="arrived",
        patient=rejected.patient or "",
        panel="",
        effective=rejected.effective,
        effective_us=eff_us,
        inputs=[row],
        outcome="rejected-input",
        reason=rejected.reason,
        records=[record],
        note=f"input rejected: {rejected.reason}; it never alerts (an Observation whose newest "
        "version is rejected contributes nothing to its panel)",
    )


# -- the whole trail ---------------------------------------------------------------------------------------


def build_trail(replay: Replay, patient: str, given: GivenIndex, source: str) -> Trail:
    """Run replay's loop over the loaded input for one patient and keep what it decided, and why."""
    rules = replay.rules
    matches = matcher(patient, replay.read_policy)
    rejected: dict[str, Rejected] = {}

    def stream() -> Iterator[Available]:
        for item in replay.stream():
            payload = item[3]
            if isinstance(payload, Rejected):
                if not matches(payload.patient):
                    continue
                rejected[item[0]] = payload
            elif not matches(item[1]):
                continue
            yield item

    steps: list[Step] = []
    by_record: dict[int, Step] = {}
    last_by_panel: dict[tuple[str, str], Step] = {}

    def trace(t: PanelTrace) -> None:
        step = _step(len(steps) + 1, t, rules, given, last_by_panel.get((t.patient, t.panel)))
        last_by_panel[(t.patient, t.panel)] = step
        steps.append(step)
        for record in t.records:
            by_record[id(record)] = step

    records: list[Decision] = []
    for akey, record, _resources in replay.decide(with_alerts=False, stream=stream(), trace=trace):
        records.append(record)
        if id(record) not in by_record:  # an input rejected on its own (not through a panel)
            steps.append(_rejected_step(len(steps) + 1, akey, rejected[akey], record, given))
    if not steps:
        raise ExplainError(f"no monitored Observations of {patient} in {source}")
    trail = Trail(
        patient=patient, scheme=rules.scheme, rules=rules, source=source, steps=steps, records=records
    )
    subjects = sorted({s.patient for s in steps if s.patient})
    if len(subjects) > 1:
        trail.notes.append(
            f"the input names this patient in {len(subjects)} ways ({', '.join(subjects)}); "
            "replay follows each reference as a patient of its own"
        )
    return trail


# -- the inputs as received --------------------------------------------------------------------------------


def _given_of(resource: model.Resource) -> Given:
    q = resource.valueQuantity
    if q is not None and q.value is not None:
        return Given(q.value, q.comparator, q.unit, q.system, q.code)
    if resource.valueString is not None:
        return Given(text=resource.valueString)
    if resource.dataAbsentReason is not None:
        codes = [c.code for c in resource.dataAbsentReason.coding or () if c.code]
        return Given(absent=codes[0] if codes else "given")
    if resource.valueCodeableConcept is not None:
        return Given(other="valueCodeableConcept")
    if resource.valueInteger is not None:
        return Given(other=f"valueInteger {resource.valueInteger}")
    return Given()


def _updated_us(resource: model.Resource) -> int | None:
    meta = resource.meta
    if meta is None or not meta.lastUpdated:
        return None
    try:
        return to_epoch_us(meta.lastUpdated)
    except ValueError:
        return None


def read_given(
    inputs: Sequence[str | Path], patient: str, policy: ReadPolicy = DEFAULT_READ
) -> dict[tuple[str, str | None, int | None], Given]:
    """The patient's Observations as received, by (reference, versionId, meta.lastUpdated): what
    the normalised values came from. Read with replay's own document reader."""
    matches = matcher(patient, policy)
    needle = (local_reference(patient, "Patient") or patient).split("/")[-1].encode()
    index: dict[tuple[str, str | None, int | None], Given] = {}
    for document in documents(inputs):
        if needle not in document:
            continue
        for item in raw.decode(document):
            if not isinstance(item, model.Resource) or item.resourceType != "Observation" or not item.id:
                continue
            if matches(item.subject.reference if item.subject is not None else None):
                version = item.meta.versionId if item.meta else None
                index[(f"Observation/{item.id}", version, _updated_us(item))] = _given_of(item)
    return index


def explain_inputs(
    inputs: Sequence[str | Path], patient: str, settings: Settings, *, source: str | None = None
) -> Trail:
    """The trail of `patient` over files (NDJSON, Bundles, resources), read as replay reads them."""
    patient = patient_reference(patient)
    with Replay(settings.rules, settings.alerts, engine="sqlite", read_policy=settings.read_policy) as replay:
        replay.load(inputs)
        given = read_given(inputs, patient, settings.read_policy)
        source = source or f"{len(inputs)} input(s): " + ", ".join(map(str, inputs))
        return build_trail(replay, patient, given, source)
