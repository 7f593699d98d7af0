"""`explain`: the decision trail of one patient — why neutrowatch decided what it decided.

The inputs are read by replay's own reader (`Replay.load`, the SQLite engine) and judged by replay's
own loop (`Replay.decide`, the same `panels.decide` the live loop runs); `explain` only listens, through
`decide`'s `trace` hook, and turns each judged panel into a step: its inputs as received and as
normalised, the ANC and its method, the grade, the episode before and after, the events with the rule
that fired, or why nothing was announced. The events it lists are therefore exactly what replay emits
for the patient (the tests hold it to that).

Pure: `build_trail` (replay's traces -> Trail), `rule_for`, `render_text`, `trail_json`, `plot`
(matplotlib, imported only when a PNG is asked for). I/O at the edge: `explain_inputs` (files),
`fetch_patient` (the live FHIR server, through `FhirClient`), `write_png`. Nothing here logs: the trail
holds the patient's data and goes only to the engineer's terminal or the files they named.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from service.fhir import raw
from service.core.anc import PanelRejected, compute_anc
from service.core.codes import LOINC, TERMS, Kind, Prop, cbc_codes, temperature_codes
from service.core.context import CHRONIC_BENIGN_NEUTROPENIA, grading_for
from service.core.episodes import AlertEvent, EventKind, PatientState, fevers
from service.output.alerts import recovering_phrase
from service.fhir.fhirtime import from_epoch_us, to_epoch_us
from service.core.grading import Band, Scheme
from service.core.observations import DEFAULT_READ, LabResult, ReadPolicy, Rejected, canonical_reference
from service.core.panels import Assessment, NotAssessed, PanelRejection, assess, local_reference
from service.core.references import Resolved
from service.core.rules import HOUR_US, Rules
from service.config import Settings
from service.errors import NeutrowatchError
from service.replay.engine import PanelTrace, Replay, documents

UCUM = "http://unitsofmeasure.org"
CANONICAL_UNIT = {Prop.COUNT: "/uL", Prop.PERCENT: "%", Prop.FRACTION: "%", Prop.MASS: "g/dL", Prop.TEMP: "Cel"}
KIND_LABEL = {
    Kind.WBC: "WBC", Kind.NEUT_PCT: "neutrophils %", Kind.SEG_PCT: "segs %", Kind.BAND_PCT: "bands %",
    Kind.NEUT_ABS: "neutrophils #", Kind.SEG_ABS: "segs #", Kind.BAND_ABS: "bands #", Kind.HGB: "haemoglobin",
    Kind.PLT: "platelets", Kind.TEMP: "temperature",
}
REASON_PHRASE = {
    "corrected": "corrected result",
    "updated": "results added to the panel",
    "entered-in-error": "result entered in error",
    "cancelled": "result cancelled",
    "rejected on correction": "the corrected panel is rejected",
    "no longer assessable": "result no longer assessable",
}


class ExplainError(NeutrowatchError):
    """explain cannot run (no data for the patient, matplotlib missing, server unreachable)."""


# -- the trail -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Given:
    """An Observation's value as received, before any normalisation."""

    value: float | None = None
    comparator: str | None = None
    unit: str | None = None
    system: str | None = None
    code: str | None = None
    text: str | None = None  # valueString
    absent: str | None = None  # dataAbsentReason code
    other: str | None = None  # a value of another type (valueCodeableConcept, valueInteger)

    def describe(self) -> str:
        if self.value is not None:
            unit = self.unit if self.unit is not None else (self.code or "(no unit)")
            out = f"{self.comparator or ''}{_fmt(self.value)} {unit}"
            if self.system == UCUM and self.code and self.code != self.unit:
                out += f" [UCUM {self.code}]"
            elif self.system and self.system != UCUM:
                out += " [not UCUM]"
            return out
        if self.text is not None:
            return f"text {self.text[:24]!r}"
        if self.absent is not None:
            return f"dataAbsentReason {self.absent}"
        if self.other is not None:
            return self.other
        return "no value"


@dataclass(frozen=True, slots=True)
class Input:
    ref: str
    version: str | None
    code: str | None  # the LOINC code that matched
    kind: str | None
    status: str | None
    effective: str | None
    effective_us: int | None
    given: Given | None  # None when the raw resource was not found (or could not be decoded)
    value: float | None  # canonical
    unit: str | None  # canonical
    at_most: bool
    role: str  # "ANC source", "used", "cytopenia", "not used: ...", "temperature", "rejected: ..."


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    rule: str  # the rule that fired, e.g. "new: neutropenic with no open episode"
    detail: str  # the values that made it fire
    correction: str | None  # for an event from a revision: why ("corrected result", ...)
    record: dict[str, Any]  # exactly the record replay writes to EVENTS.jsonl


@dataclass(slots=True)
class Step:
    """One decision: a panel judged (first available, or again when a later version of a member
    arrived), or an input rejected on its own."""

    n: int
    kind: str  # "panel" | "temperature" | "rejected-input"
    akey: str
    available: str | None  # meta.lastUpdated of the arrival that caused it (server time)
    trigger: str
    patient: str
    panel: str
    effective: str | None
    effective_us: int | None
    inputs: list[Input]
    outcome: str  # assessed | stale | rejected | not-assessed | no-anc | temperature | rejected-input | quarantined
    reason: str | None = None
    anc: dict[str, Any] | None = None
    grade: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    note: str | None = None  # why nothing (more) was announced
    records: list[dict[str, Any]] = field(default_factory=list)  # every record of this step, in replay's order
    revision_of: int | None = None  # the step that judged this panel before


@dataclass(slots=True)
class Trail:
    patient: str
    scheme: Scheme  # the configured scheme
    rules: Rules
    source: str
    steps: list[Step]
    records: list[dict[str, Any]]  # every record for the patient, in replay's order
    notes: list[str] = field(default_factory=list)

    @property
    def events(self) -> list[Event]:
        return [e for s in self.steps for e in s.events]

    @property
    def rejected_inputs(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "rejected-input"]


# -- helpers ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    rounded = round(float(value), digits)
    return f"{int(rounded)}" if rounded.is_integer() else f"{rounded:g}"


def patient_reference(arg: str) -> str:
    """"123" -> "Patient/123"; a reference ("Patient/123", an absolute URL) is kept as given."""
    arg = arg.strip()
    if not arg:
        raise ExplainError("no patient given")
    return arg if "/" in arg else f"Patient/{arg}"


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


def _available(akey: str) -> tuple[str | None, str | None, str | None]:
    """(meta.lastUpdated, Observation ref, version number) of the arrival an availability key names."""
    if akey.startswith("~"):
        return None, None, None
    parts = akey.split("\x1f")
    try:
        updated = from_epoch_us(int(parts[0]))
    except (ValueError, IndexError):
        updated = None
    return updated, (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else None)


def band_range(scheme: Scheme, band: Band, lln: float | None = None) -> str:
    """The band's ANC interval in cells/uL, from the scheme's own bounds."""
    lower = 0.0
    for b in scheme.bands:
        if b == band:
            break
        if b.below is not None:
            lower = b.below
    if band.below_lln:
        return f"{_fmt(lower)}-<LLN" + (f" ({_fmt(lln)})" if lln is not None else "")
    if band.below is None:
        if any(b.below_lln for b in scheme.bands):  # CTCAE v5: normal from the result's LLN
            return f">= {_fmt(max(lower, lln))}" if lln is not None else f">= {_fmt(lower)} and >= LLN"
        return f">= {_fmt(lower)}"
    return f"< {_fmt(band.below)}" if lower == 0 else f"{_fmt(lower)}-<{_fmt(band.below)}"


def scheme_summary(scheme: Scheme) -> str:
    return ", ".join(f"{b.label} {band_range(scheme, b)}" for b in scheme.bands)


def _episode(ps: PatientState) -> dict[str, Any]:
    m = ps.machine
    view: dict[str, Any] = {"open": m.episode is not None}
    if m.episode is not None:
        view.update(episode=m.episode, opened=m.opened, worst=m.worst.label if m.worst else None,
                    worst_severity=m.worst.severity if m.worst else None,
                    current=m.current.label if m.current else None, febrile=m.febrile, chronic=m.chronic,
                    recovering=m.normals, recurrences=m.opening)
    view.update(last_anc=m.last_anc, last_effective=m.last_effective, remembered=len(ps.history), revisions=ps.revisions)
    return view


def describe_episode(view: dict[str, Any] | None) -> str:
    if view is None:
        return "-"
    if not view["open"]:
        return "no open episode"
    flags = [f for f in ("febrile", "chronic") if view.get(f)]
    flags += [f"{view['recovering']} normal in a row"] if view.get("recovering") else []
    flags += [f"re-opened {view['recurrences']}x"] if view.get("recurrences") else []
    return (f"open {view['episode'][:8]} since {view['opened']}, worst alerted {view['worst']}"
            + (f", now {view['current']}" if view.get("current") and view["current"] != view["worst"] else "")
            + (f" ({', '.join(flags)})" if flags else ""))


# -- rules ----------------------------------------------------------------------------------------------


def _fever_rule(fever_c: float, rules: Rules) -> str:
    if fever_c >= rules.fever_single_c:
        return f"fever >= {rules.fever_single_c:.1f}"
    return f"fever >= {rules.fever_sustained_c:.1f} for {rules.fever_sustained_us / HOUR_US:g} h"


def _anc_rule(a: Assessment | None, rules: Rules) -> str:
    if a is None or a.anc < rules.febrile_anc_below:
        return f"ANC < {rules.febrile_anc_below:g}"
    return (f"ANC < {rules.febrile_falling_anc_below:g} falling >= {rules.febrile_fall_fraction * 100:g} % "
            f"within {rules.febrile_fall_window_us / HOUR_US:g} h")


def rule_for(event: AlertEvent, before: PatientState, rules: Rules) -> tuple[str, str]:
    """(the rule that fired, the values that made it fire) for one event."""
    a = event.assessment
    anc = f"ANC {_fmt(a.anc)}/uL{' (at most)' if a.at_most else ''} at {a.effective}" if a else ""
    kind = event.kind
    if kind is EventKind.NEW:
        label = event.band.label if event.band.label == event.band.severity else f"{event.band.label} ({event.band.severity})"
        return "new: neutropenic with no open episode", f"{anc}: {label}"
    if kind is EventKind.WORSENING:
        worst = before.machine.worst.label if before.machine.worst is not None and not event.revision else None
        than = f" ({worst})" if worst else ""
        return "worsening: worse than the worst alerted", f"{anc}: {event.band.label}, worse than the worst alerted{than}"
    if kind is EventKind.RESOLVED:
        return "resolved: back in the normal band", f"{anc}: normal; the episode ({event.band.label}) closes"
    if kind is EventKind.RECOVERING and event.recovering is not None:
        rule = "recovering: normal, not yet confirmed" if event.recovering[0] else "recovering: neutropenic again"
        return rule, f"{anc}: {event.band.label}; {recovering_phrase(event.recovering)}, the episode stays open"
    if kind is EventKind.RECURRENCE:
        return ("recurrence: neutropenic soon after the announced resolution",
                f"{anc}: {event.band.label}; the episode resolved at {event.recurred_after} re-opens")
    if kind is EventKind.CHRONIC:
        days = rules.chronic_after_us / (24 * HOUR_US)
        return f"chronic: episode open more than {days:g} days", f"open since {event.opened}; {anc}"
    if kind is EventKind.FEBRILE:
        fever = event.fever
        celsius = fever.celsius if fever is not None else rules.fever_single_c
        rule = f"febrile: {_fever_rule(celsius, rules)} within {rules.fever_window_us / HOUR_US:g} h of {_anc_rule(a, rules)}"
        detail = f"{celsius:.1f} Cel at {fever.effective} ({fever.ref})" if fever else ""
        if a is not None:
            detail += f"; {anc}"
            if a.anc >= rules.febrile_anc_below and event.previous_anc is not None:
                detail += f", previous {_fmt(event.previous_anc)}/uL at {event.previous_effective}"
        return rule, detail
    if kind is EventKind.RETRACTED:
        phrase = REASON_PHRASE.get(event.reason or "", event.reason or "revision")
        x = event.retracted
        withdrawn = f"withdraws {x.kind.value} {x.band.label} (ANC {_fmt(x.anc)}/uL at {x.effective})" if x else ""
        status = "no episode remains" if event.worst is None else ("episode still open" if event.episode_open else "episode closed")
        return f"retracted: {phrase}", f"{withdrawn}; {status}"
    return kind.value, anc


def _why_no_event(step: Step, a: Assessment | None, before: PatientState, after: PatientState, rules: Rules,
                  reassessed: bool) -> str | None:
    o = step.outcome
    if o == "stale":
        newest = before.machine.last_effective
        return f"no event: collected before the newest assessed panel ({newest}); remembered, it changes no episode"
    if o == "rejected":
        return f"panel rejected: {step.reason}; a rejected panel never alerts"
    if o == "not-assessed":
        return f"not assessed: {step.reason}"
    if o == "no-anc":
        if not reassessed:
            return "no ANC: the panel holds no final neutrophil result"
        return ("no ANC any more: the panel leaves the patient's history; "
                + ("what rested on it is withdrawn" if step.events else "no announcement rested on it"))
    if o == "temperature":
        return None
    if a is None:
        return None
    if reassessed and not step.events:
        old = next((h for h in before.history if h.panel == a.panel), None)
        if old is None or old.band == a.band:
            return "re-assessed (later version): the same grade, nothing to announce"
        return (f"re-assessed (later version) as {a.band.label}, was {old.band.label}: the revised history needs no "
                "new or withdrawn announcement")
    if step.events:
        return None
    m = after.machine
    if m.episode is None:
        return "no event: not neutropenic and no open episode"
    worst = m.worst.label if m.worst else "?"
    return f"no event: {a.band.label} is not worse than the worst alerted ({worst}); never a repeated alert"


def _temperature_note(members: Sequence[LabResult], after: PatientState, rules: Rules, produced: bool) -> str:
    established = {t.ref for t in fevers(after.temperatures, rules)}
    hits = [m for m in members if m.ref in established]
    if not hits:
        high = [m for m in members if m.value is not None and m.value >= rules.fever_sustained_c]
        if high:
            return (f"no fever yet: >= {rules.fever_sustained_c:.1f} Cel but below {rules.fever_single_c:.1f} and not "
                    f"sustained for {rules.fever_sustained_us / HOUR_US:g} h")
        return "no fever"
    rule = _fever_rule(max(m.value or 0.0 for m in hits), rules).replace("fever ", "")
    if produced:
        return f"fever ({rule} Cel)"
    m = after.machine
    if m.episode is None:
        why = "no open episode"
    elif m.febrile:
        why = "the episode is already febrile (once per episode)"
    elif m.last is None or m.newest_us is None:
        why = "no ANC yet"
    else:
        near = any(abs(h.effective_us - m.newest_us) <= rules.fever_window_us for h in hits)
        why = (f"the newest ANC ({_fmt(m.last.anc)}/uL) is neither < {rules.febrile_anc_below:g} nor falling" if near
               else f"more than {rules.fever_window_us / HOUR_US:g} h from the newest ANC")
    return f"fever ({rule} Cel); not febrile neutropenia: {why}"


# -- building the trail -------------------------------------------------------------------------------------

GivenIndex = Mapping[tuple[str, str | None, int | None], Given]


def _given(index: GivenIndex, ref: str | None, version: str | None, updated_us: int | None) -> Given | None:
    if ref is None:
        return None
    return index.get((ref, version, updated_us))


def _input(r: LabResult, role: str, index: GivenIndex) -> Input:
    term = TERMS.get(r.code)
    return Input(r.ref, r.version, r.code, KIND_LABEL.get(r.kind, r.kind.value), r.status, r.effective, r.effective_us,
                 _given(index, r.ref, r.version, r.updated_us), r.value,
                 CANONICAL_UNIT.get(term.prop) if term else None, r.at_most, role)


def _roles(labs: Sequence[LabResult], used: Sequence[str], cytopenia: bool) -> dict[str, str]:
    roles: dict[str, str] = {}
    for r in labs:
        if used and r.ref == used[0]:
            roles[r.ref] = "ANC source"
        elif r.ref in used:
            roles[r.ref] = "used"
        elif not r.assessable:
            roles[r.ref] = f"not used: {r.status}" + ("" if r.value is not None else ", no value")
        elif r.kind in (Kind.HGB, Kind.PLT):
            roles[r.ref] = "cytopenia" if cytopenia else "not used: cytopenia needs an ANC, Hb and platelets"
        elif not used:
            roles[r.ref] = "not used: no ANC in this panel"
        else:
            roles[r.ref] = "not used: a preferred result was used"
    return roles


def _step(n: int, t: PanelTrace, rules: Rules, index: GivenIndex, earlier: Step | None) -> Step:
    d = t.decision
    labs = [m for m in t.members if m.kind is not Kind.TEMP]
    temps = [m for m in t.members if m.kind is Kind.TEMP]
    updated, arrived_ref, _vv = _available(t.akey)
    if earlier is None:
        trigger = "first available" + (f" ({arrived_ref})" if arrived_ref else "")
    else:
        arrived = next((m for m in t.members if m.ref == arrived_ref), None)
        trigger = (f"{arrived_ref} version {arrived.version} arrived ({arrived.status})" if arrived is not None
                   else f"a newer version of {arrived_ref or 'a member'} was rejected; judged without it")
    outcome = assess(t.patient, t.panel, labs, rules, t.context) if labs else None
    anc = compute_anc(labs) if labs else None
    a = outcome if isinstance(outcome, Assessment) else None
    used: tuple[str, ...] = ()
    if a is not None:
        used = a.refs
    elif isinstance(outcome, PanelRejection):
        used = tuple(r.ref for r in outcome.rejected.inputs)
    elif isinstance(outcome, NotAssessed):
        used = outcome.refs
    roles = _roles(labs, used, a is not None and a.cytopenia is not None)
    inputs = [_input(r, roles[r.ref], index) for r in labs] + [_input(r, "temperature", index) for r in temps]
    primary = next((r for r in labs if r.ref in used[:1]), labs[0] if labs else (temps[0] if temps else None))
    step = Step(n, "panel" if labs else "temperature", t.akey, updated, trigger, t.patient, t.panel,
                primary.effective if primary else None, primary.effective_us if primary else None, inputs, "assessed",
                before=_episode(t.before), after=_episode(d.state if d is not None else t.before), records=list(t.records),
                revision_of=earlier.n if earlier is not None else None)
    if d is None:  # could not be decided: quarantined, the patient's state unchanged
        step.outcome, step.reason = "quarantined", str(t.records[0].get("reason")) if t.records else None
        return step
    if not labs:
        step.outcome = "temperature"
    elif d.rejection is not None:
        step.outcome, step.reason = "rejected", d.rejection.rejected.reason
    elif d.not_assessed is not None:
        step.outcome, step.reason = "not-assessed", d.not_assessed.reason
    elif not d.assessed:
        step.outcome = "no-anc"
    elif d.stale:
        step.outcome = "stale"
    if a is not None:
        lln = anc.lln if anc is not None and not isinstance(anc, PanelRejected) else None
        grading = grading_for(rules, t.context, a.effective_us)
        scheme = grading.scheme or rules.scheme
        step.anc = {"value": a.anc, "unit": "/uL", "at_most": a.at_most, "method": a.method, "wbc": a.wbc, "lln": lln,
                    "observations": list(a.refs), "cytopenia": a.cytopenia, "hemoglobin": a.hemoglobin,
                    "platelets": a.platelets}
        step.grade = {"scheme": scheme.name, "label": a.band.label, "severity": a.band.severity, "rank": a.band.rank,
                      "range": band_range(scheme, a.band, lln), "threshold_rule": a.threshold_rule}
    # the records: [not-assessed] [panel rejected] [stale] then one per event, in that order
    offset = (d.not_assessed is not None) + (d.rejection is not None) + (d.stale and d.assessment is not None)
    for event, record in zip(d.events, t.records[offset:], strict=True):
        rule, detail = rule_for(event, t.before, rules)
        correction = REASON_PHRASE.get(event.reason or "", event.reason) if event.revision and event.kind is not EventKind.RETRACTED else None
        step.events.append(Event(event.kind.value, rule, detail, correction, record))
    reassessed = any(h.panel == t.panel for h in t.before.history)
    if step.outcome == "temperature":
        step.note = _temperature_note(temps, d.state, rules, any(e.kind == "febrile" for e in step.events))
    else:
        step.note = _why_no_event(step, a, t.before, d.state, rules, reassessed)
        if temps:
            fever_note = _temperature_note(temps, d.state, rules, any(e.kind == "febrile" for e in step.events))
            step.note = f"{step.note}; temperature: {fever_note}" if step.note else f"temperature: {fever_note}"
    return step


def _rejected_step(n: int, akey: str, rejected: Rejected, record: dict[str, Any], index: GivenIndex) -> Step:
    updated, _ref, _vv = _available(akey)
    eff_us: int | None
    try:
        eff_us = to_epoch_us(rejected.effective) if rejected.effective else None
    except ValueError:
        eff_us = None
    term = TERMS.get(rejected.code or "")
    given = _given(index, rejected.ref, rejected.version, rejected.updated_us)
    row = Input(rejected.ref or "(no id)", rejected.version, rejected.code, KIND_LABEL.get(term.kind) if term else None,
                None, rejected.effective, eff_us, given, None, None, False, f"rejected: {rejected.reason}")
    return Step(n, "rejected-input", akey, updated, "arrived", rejected.patient or "", "", rejected.effective, eff_us,
                [row], "rejected-input", reason=rejected.reason, records=[record],
                note=f"input rejected: {rejected.reason}; it never alerts (an Observation whose newest version is "
                     "rejected contributes nothing to its panel)")


def build_trail(replay: Replay, patient: str, given: GivenIndex, source: str) -> Trail:
    """Run replay's loop over the loaded input for one patient and keep what it decided, and why."""
    rules = replay.rules
    matches = matcher(patient, replay.read_policy)
    rejected: dict[str, Rejected] = {}

    def stream() -> Iterator[tuple[str, str, str, Any]]:
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

    records: list[dict[str, Any]] = []
    for akey, record, _resources in replay.decide(with_alerts=False, stream=stream(), trace=trace):
        records.append(record)
        if id(record) not in by_record:  # an input rejected on its own (not through a panel)
            steps.append(_rejected_step(len(steps) + 1, akey, rejected[akey], record, given))
    trail = Trail(patient, rules.scheme, rules, source, steps, records)
    if not steps:
        raise ExplainError(f"no monitored Observations of {patient} in {source}")
    subjects = sorted({s.patient for s in steps if s.patient})
    if len(subjects) > 1:
        trail.notes.append(f"the input names this patient in {len(subjects)} ways ({', '.join(subjects)}); replay "
                           "follows each reference as a patient of its own")
    return trail


# -- the edges: files and the live server ------------------------------------------------------------------


def _given_of(resource: raw.Resource) -> Given:
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


def read_given(inputs: Sequence[str | Path], patient: str, policy: ReadPolicy = DEFAULT_READ) -> dict[tuple[str, str | None, int | None], Given]:
    """The patient's Observations as received, by (reference, versionId, meta.lastUpdated): what
    the normalised values came from. Read with replay's own document reader."""
    matches = matcher(patient, policy)
    needle = (local_reference(patient, "Patient") or patient).split("/")[-1].encode()
    index: dict[tuple[str, str | None, int | None], Given] = {}
    for document in documents(inputs):
        if needle not in document:
            continue
        for item in raw.decode(document):
            if not isinstance(item, raw.Resource) or item.resourceType != "Observation" or not item.id:
                continue
            if not matches(item.subject.reference if item.subject is not None else None):
                continue
            meta = item.meta
            updated_us: int | None = None
            if meta is not None and meta.lastUpdated:
                try:
                    updated_us = to_epoch_us(meta.lastUpdated)
                except ValueError:
                    updated_us = None
            index[(f"Observation/{item.id}", meta.versionId if meta else None, updated_us)] = _given_of(item)
    return index


def explain_inputs(inputs: Sequence[str | Path], patient: str, settings: Settings, *, source: str | None = None) -> Trail:
    """The trail of `patient` over files (NDJSON, Bundles, resources), read as replay reads them."""
    patient = patient_reference(patient)
    with Replay(settings.rules, settings.alerts, engine="sqlite", read_policy=settings.read_policy) as replay:
        replay.load(inputs)
        given = read_given(inputs, patient, settings.read_policy)
        return build_trail(replay, patient, given, source or f"{len(inputs)} input(s): " + ", ".join(map(str, inputs)))


async def fetch_patient(settings: Settings, patient: str, *, history: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """`_fetch_patient`; a request that fails is named in the error (which interaction, on which
    resource type, e.g. "Condition search: HTTP 403: forbidden"), never only its status."""
    from service.fhir.errors import FhirError

    doing: list[str] = ["connection"]
    try:
        return await _fetch_patient(settings, patient, history, doing)
    except FhirError as err:
        raise ExplainError(f"explain: {doing[-1]} failed: {err}") from None


async def _fetch_patient(settings: Settings, patient: str, history: bool, doing: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """What replay would read of one patient, from the server named by fhir.base_url: the monitored
    Observations (CBC terms and body temperatures; every version through `_history` unless
    `history` is False), the Patient, its chronic benign neutropenia Conditions, DiagnosticReports
    (panel membership), the orders its results are based on and its active CareTeams. Returns the
    resources and notes on what could not be read."""
    from service.fhir.client import FhirClient
    from service.fhir.errors import FhirHttpError

    notes: list[str] = []
    pid = (local_reference(patient, "Patient") or "").split("/")[-1]
    page = str(settings.fhir.page_size)
    codes = ",".join(f"{LOINC}|{c}" for c in cbc_codes() + temperature_codes())
    async with FhirClient(settings.fhir) as client:
        doing.append("Observation search")
        observations = await client.search_all("Observation", [("subject", patient), ("code", codes), ("_count", page)])
        if history:
            # a resource whose versionId is "1" has no earlier version to read
            older = [o for o in observations if str((o.get("meta") or {}).get("versionId", "")) != "1" and o.get("id")]

            async def versions_of(id: str) -> list[dict[str, Any]]:
                try:
                    return await _history(client, "Observation", id)
                except FhirHttpError as err:
                    if err.status in (404, 410):  # deleted meanwhile: its current version is all there is
                        return []
                    raise

            doing.append("Observation _history read")
            try:
                versions = await asyncio.gather(*(versions_of(o["id"]) for o in older))
            except FhirHttpError as err:  # the server does not offer _history (e.g. 400, 405, 501)
                notes.append(f"_history not available (HTTP {err.status}): current versions only")
            else:
                for o, found in zip(older, versions, strict=True):
                    current = (o.get("meta") or {}).get("versionId")
                    observations.extend(v for v in found if (v.get("meta") or {}).get("versionId") != current)
        else:
            notes.append("current versions only (--no-history)")
        resources: list[dict[str, Any]] = list(observations)
        if pid:
            doing.append("Patient read")
            try:
                resources.append((await client.read("Patient", pid))[0])
            except FhirHttpError as err:
                if err.status not in (404, 410):
                    raise
                notes.append(f"{patient} not found on the server: no birth date")
        doing.append("Condition search")
        resources += await client.search_all(
            "Condition", [("subject", patient), ("code", f"http://snomed.info/sct|{CHRONIC_BENIGN_NEUTROPENIA}")])
        doing.append("DiagnosticReport search")
        resources += await client.search_all("DiagnosticReport", [("subject", patient), ("_count", page)])
        orders = sorted({r["reference"] for o in observations for r in o.get("basedOn") or ()
                         if isinstance(r, dict) and str(r.get("reference", "")).startswith("ServiceRequest/")})
        doing.append("ServiceRequest read")
        for ref in orders:
            try:
                resources.append((await client.read("ServiceRequest", ref.split("/", 1)[1]))[0])
            except (FhirHttpError, ValueError):
                notes.append(f"{ref} could not be read")
        doing.append("CareTeam search")
        resources += await client.search_all("CareTeam", [("subject", patient), ("status", "active")])
    return resources, notes


async def _history(client: Any, resource_type: str, id: str) -> list[dict[str, Any]]:
    """Every version of one resource (`GET [type]/[id]/_history`, paged). FhirClient has no public
    history interaction yet; this goes through its own paging, origin checks and retries."""
    from service.fhir.client import _bundle_object, _entry_resources

    url = f"{client._type_url(resource_type)}/{client._checked_id(id)}/_history"
    found: list[dict[str, Any]] = []
    async for doc, _next, _url in client._walk(url, _bundle_object):
        found.extend(r for r in _entry_resources(doc) if r.get("resourceType") == resource_type)
    return found


def explain_server(settings: Settings, patient: str, *, history: bool = True) -> Trail:
    """The trail of `patient` from the live server: fetched, then read exactly as `--input` reads files."""
    if not settings.fhir.base_url:
        raise ExplainError("no --input and no fhir.base_url in the configuration: nothing to read")
    patient = patient_reference(patient)
    resources, notes = asyncio.run(fetch_patient(settings, patient, history=history))
    with tempfile.TemporaryDirectory(prefix="neutrowatch-explain-") as tmp:
        path = Path(tmp) / "patient.ndjson"
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
        trail = explain_inputs([path], patient, settings, source=f"{settings.fhir.base_url} ({len(resources)} resources)")
    trail.notes.extend(notes)
    return trail


# -- presenting it -----------------------------------------------------------------------------------------------


def _input_json(i: Input) -> dict[str, Any]:
    return {
        "observation": i.ref, "version": i.version, "code": i.code, "kind": i.kind, "status": i.status,
        "effective": i.effective,
        "given": ({k: v for k, v in (("value", i.given.value), ("comparator", i.given.comparator), ("unit", i.given.unit),
                                      ("system", i.given.system), ("code", i.given.code), ("text", i.given.text),
                                      ("dataAbsentReason", i.given.absent), ("other", i.given.other)) if v is not None}
                  if i.given is not None else None),
        "value": i.value, "unit": i.unit, "at_most": i.at_most, "role": i.role,
    }


def trail_json(trail: Trail) -> dict[str, Any]:
    """The trail for machines: every step with its inputs, ANC, grade, episode before/after, events
    with their rule, and `events`: the records exactly as replay writes them."""
    return {
        "patient": trail.patient,
        "scheme": trail.scheme.name,
        "bands": [{"label": b.label, "severity": b.severity, "range": band_range(trail.scheme, b)} for b in trail.scheme.bands],
        "source": trail.source,
        "notes": trail.notes,
        "steps": [
            {
                "n": s.n, "kind": s.kind, "trigger": s.trigger, "available": s.available, "patient": s.patient,
                "panel": s.panel, "effective": s.effective, "outcome": s.outcome, "reason": s.reason,
                "inputs": [_input_json(i) for i in s.inputs], "anc": s.anc, "grade": s.grade,
                "episode_before": s.before, "episode_after": s.after,
                "events": [{"event": e.kind, "rule": e.rule, "detail": e.detail, "correction": e.correction,
                            "record": e.record} for e in s.events],
                "note": s.note, "revision_of": s.revision_of,
            }
            for s in trail.steps
        ],
        "events": trail.records,
    }


def _table(rows: list[list[str]], indent: str) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render_text(trail: Trail) -> str:
    r = trail.rules
    out: list[str] = []
    counts: dict[str, int] = {}
    for e in trail.events:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    panels = sum(1 for s in trail.steps if s.kind == "panel")
    out.append(f"Decision trail of {trail.patient} - scheme {trail.scheme.name}")
    out.append(f"  source:  {trail.source}")
    out.append(f"  bands:   {scheme_summary(trail.scheme)} (cells/uL)")
    out.append(f"  fever:   >= {r.fever_single_c:.1f} Cel once, or >= {r.fever_sustained_c:.1f} Cel for "
               f"{r.fever_sustained_us / HOUR_US:g} h; febrile within {r.fever_window_us / HOUR_US:g} h of ANC < "
               f"{r.febrile_anc_below:g} (or < {r.febrile_falling_anc_below:g} that fell >= {r.febrile_fall_fraction * 100:g} % "
               f"within {r.febrile_fall_window_us / HOUR_US:g} h)")
    out.append(f"  summary: {panels} panel judgements, {sum(1 for s in trail.steps if s.kind == 'temperature')} "
               f"temperature readings, {len(trail.rejected_inputs)} rejected inputs; events: "
               + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
    for note in trail.notes:
        out.append(f"  note:    {note}")
    for s in trail.steps:
        out.append("")
        if s.kind == "temperature":
            out.extend(_temperature_lines(s))
            continue
        head = f"[{s.n}] {s.effective or '(no time)'}"
        if s.kind == "rejected-input":
            out.append(f"{head}  REJECTED INPUT  (available {s.available or 'no lastUpdated'})")
        else:
            again = f"; again, judged before at [{s.revision_of}]" if s.revision_of else ""
            out.append(f"{head}  panel {s.panel}")
            out.append(f"    arrival:  {s.trigger}, available {s.available or '(no lastUpdated: input order)'}{again}")
        rows = [["observation", "code", "term", "status", "as received", "normalised", "role"]]
        for i in s.inputs:
            rows.append([f"{i.ref}" + (f" v{i.version}" if i.version else ""), i.code or "-", i.kind or "-", i.status or "-",
                         i.given.describe() if i.given else "(not found)",
                         (("<=" if i.at_most else "") + f"{_fmt(i.value, 2)} {i.unit}") if i.value is not None else "-", i.role])
        out.extend(_table(rows, "    "))
        if s.anc is not None and s.grade is not None:
            a, g = s.anc, s.grade
            extra = [f"WBC {_fmt(a['wbc'])}/uL"] if a["wbc"] is not None else []
            if a["lln"] is not None:
                extra.append(f"LLN {_fmt(a['lln'])}/uL")
            if a["cytopenia"]:
                extra.append(f"{a['cytopenia']} (Hb {_fmt(a['hemoglobin'], 2)} g/dL, platelets {_fmt(a['platelets'])}/uL)")
            out.append(f"    ANC:      {'<=' if a['at_most'] else ''}{_fmt(a['value'])}/uL by {a['method']}"
                       + (f"; {'; '.join(extra)}" if extra else ""))
            severity = g["severity"] or "not neutropenic"
            label = g["label"] if g["label"] == severity else f"{g['label']} ({severity})"
            out.append(f"    grade:    {label}, {g['range']}/uL in scheme "
                       f"{g['scheme']}; threshold rule: {g['threshold_rule']}")
        if s.kind != "rejected-input":
            out.append(f"    episode:  before: {describe_episode(s.before)}")
            out.append(f"              after:  {describe_episode(s.after)}")
        for e in s.events:
            rec = e.record
            to = _recipients(rec)
            grade = rec.get("grade_label") or rec.get("grade") or ""
            out.append(f"    EVENT     {e.kind.upper()} {grade}{' [correction: ' + e.correction + ']' if e.correction else ''}{to}")
            out.append(f"              rule: {e.rule}")
            if e.detail:
                out.append(f"              why:  {e.detail}")
        if s.note:
            out.append(f"    {'outcome:' if s.events else 'decision:'} {s.note}")
    if trail.rejected_inputs:
        out.append("")
        out.append("Rejected inputs:")
        rows = [[s.inputs[0].ref + (f" v{s.inputs[0].version}" if s.inputs[0].version else ""), s.inputs[0].code or "-",
                 s.effective or "-", s.reason or ""] for s in trail.rejected_inputs]
        out.extend(_table(rows, "  "))
    return "\n".join(out) + "\n"


def _recipients(record: dict[str, Any]) -> str:
    if "recipients" not in record:
        return ""
    if not record["recipients"]:
        return "  (no recipient: no order, care team or configured pool)"
    return f"  to {', '.join(record['recipients'])} ({record['recipient_rule']})"


def _temperature_lines(s: Step) -> list[str]:
    lines = []
    for i in s.inputs:
        given = i.given.describe() if i.given else "(not found)"
        lines.append(f"[{s.n}] {i.effective}  temperature {i.ref}" + (f" v{i.version}" if i.version else "")
                     + f" {i.code}: {given} -> {_fmt(i.value, 2)} Cel; {s.note}")
    for e in s.events:
        rec = e.record
        to = _recipients(rec)
        lines.append(f"    EVENT     {e.kind.upper()} {rec.get('grade_label') or ''}{to}")
        lines.append(f"              rule: {e.rule}")
        if e.detail:
            lines.append(f"              why:  {e.detail}")
    if s.events:
        lines.append(f"    episode:  after: {describe_episode(s.after)}")
    return lines


# -- the PNG timeline ----------------------------------------------------------------------------------------------

NORMAL_COLOUR = "#e5f5e0"
EVENT_STYLE = {
    "new": ("#b30000", "s"), "worsening": ("#67000d", "v"), "resolved": ("#238b45", "^"), "febrile": ("#cc4c02", "*"),
    "chronic": ("#54278f", "D"), "retracted": ("#525252", "X"),
}


def _dt(us: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


def plot_available() -> None:
    """Raise the one-line ExplainError when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ExplainError("--png needs matplotlib: pip install 'neutrowatch[explain]'") from None


def plot(trail: Trail) -> Any:
    """The timeline as a matplotlib Figure (Agg): ANC on a log axis over the scheme's shaded bands,
    events marked and labelled, corrections (superseded values hollow, joined to what replaced
    them), rejected inputs, and body temperatures with the fever thresholds below."""
    plot_available()
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    r = trail.rules
    scheme = trail.scheme
    # the newest judgement of each panel holds its current value; earlier ones were superseded
    latest: dict[tuple[str, str], Step] = {}
    for s in trail.steps:
        if s.kind == "panel":
            latest[(s.patient, s.panel)] = s
    current = [s for s in latest.values() if s.anc is not None and s.effective_us is not None]
    current.sort(key=lambda s: s.effective_us or 0)
    superseded = [s for s in trail.steps if s.kind == "panel" and s.anc is not None and s.effective_us is not None
                  and latest[(s.patient, s.panel)] is not s]
    temps: dict[str, tuple[int, float]] = {}
    for s in trail.steps:
        for i in s.inputs:
            if i.kind == "temperature" and i.value is not None and i.effective_us is not None:
                temps[i.ref] = (i.effective_us, i.value)

    times = [s.effective_us for s in trail.steps if s.effective_us is not None] + [t for t, _ in temps.values()]
    if not times:
        raise ExplainError(f"nothing with a collection time to plot for {trail.patient}")
    start, end = min(times), max(times)
    pad = max((end - start) // 30, 6 * HOUR_US)
    x0, x1 = _dt(start - pad), _dt(end + pad)

    values = [s.anc["value"] for s in current + superseded if s.anc] or [1000.0]
    bounds = [b.below for b in scheme.bands if b.below is not None]
    low = max(10.0, min(min(values) / 2, min(bounds) / 2))
    high = max(max(values) * 2, max(bounds) * 4)

    fig = Figure(figsize=(12, 7.2), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=(3.2, 1))
    ax = fig.add_subplot(grid[0])
    tx = fig.add_subplot(grid[1], sharex=ax)

    # grade bands of the configured scheme, coloured by rank (LLN band: hatched up to the highest LLN reported)
    from matplotlib import colormaps

    ranks = max(b.rank for b in scheme.bands)
    palette = colormaps["YlOrRd"]

    def band_colour(band: Band) -> Any:
        return NORMAL_COLOUR if band.rank == 0 else palette(0.15 + 0.7 * (band.rank - 1) / max(ranks - 1, 1))

    lower = low
    legend: list[Any] = []
    llns = [s.anc["lln"] for s in current if s.anc and s.anc.get("lln")]
    lln = max(llns) if llns else None
    for band in scheme.bands:
        if band.below_lln:
            if lln is not None and lln > lower:
                ax.axhspan(lower, lln, facecolor=band_colour(band), edgecolor="#b2182b", alpha=0.6, lw=0, hatch="///", zorder=1)
            legend.append(Patch(facecolor=band_colour(band), edgecolor="#b2182b", alpha=0.6, hatch="///",
                                label=f"{band.label} ({band_range(scheme, band, lln)})"))
            continue
        top = band.below if band.below is not None else high
        ax.axhspan(lower, top, facecolor=band_colour(band), alpha=0.5, lw=0, zorder=0)
        if band.below is not None:
            ax.axhline(band.below, color="#969696", lw=0.6, ls="--", zorder=1)
        legend.append(Patch(facecolor=band_colour(band), alpha=0.5, label=f"{band.label} ({band_range(scheme, band, lln)})"))
        lower = top
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.set_xlim(x0, x1)
    ax.set_ylabel("ANC (cells/µL, log scale)")

    # the current ANC of each panel: filled; at most ("<"): a downward caret
    xs = [_dt(s.effective_us) for s in current if s.effective_us is not None]
    ys = [s.anc["value"] for s in current if s.anc]
    ax.plot(xs, ys, color="#2b2b2b", lw=1.2, zorder=3)
    for s in current:
        assert s.anc is not None and s.effective_us is not None
        stale = s.outcome == "stale"
        ax.plot([_dt(s.effective_us)], [max(s.anc["value"], low * 1.05)], ls="none", zorder=6,
                marker=7 if s.anc["at_most"] else "o", ms=7 if s.anc["at_most"] else (6 if not stale else 5),
                mfc="#2b2b2b" if not stale else "#bdbdbd", mec="#2b2b2b")
    # corrections: the superseded value hollow, a dotted line to the value that replaced it
    for s in superseded:
        assert s.anc is not None and s.effective_us is not None
        replaced = latest[(s.patient, s.panel)]
        p = (_dt(s.effective_us), max(s.anc["value"], low * 1.05))
        ax.plot([p[0]], [p[1]], marker="o", ms=9, mfc="white", mec="#2171b5", mew=1.6, ls="none", zorder=5)
        if replaced.anc is not None and replaced.effective_us is not None:
            ax.annotate("", xy=(_dt(replaced.effective_us), replaced.anc["value"]), xytext=p, zorder=5,
                        arrowprops={"arrowstyle": "->", "color": "#2171b5", "ls": ":", "lw": 1.4, "shrinkA": 4, "shrinkB": 4})
        else:
            ax.plot([p[0]], [p[1]], marker="x", ms=8, color="#2171b5", ls="none", zorder=6)
            ax.annotate("withdrawn", p, xytext=(6, -12), textcoords="offset points", fontsize=7, color="#2171b5")
    # events: marker on the ANC (or on the fever for a febrile event from a temperature), labelled
    placed: list[tuple[float, int]] = []
    span = max(end - start, 1)
    for s in trail.steps:
        for e in s.events:
            rec = e.record
            colour, marker = EVENT_STYLE.get(e.kind, ("black", "o"))
            withdrawn = rec.get("retracted") or {}
            # a retraction is drawn over the announcement it withdraws
            when = withdrawn.get("effective") or rec.get("effective")
            try:
                t_us = to_epoch_us(when) if when else s.effective_us
            except ValueError:
                t_us = s.effective_us
            if t_us is None:
                continue
            y = withdrawn.get("anc") or rec.get("anc") or low * 1.5
            y = max(float(y), low * 1.05)
            ax.plot([_dt(t_us)], [y], marker=marker, ms=11, color=colour, mec="white", mew=0.8, ls="none", zorder=7)
            # stack labels that would collide
            frac = (t_us - start) / span
            level = sum(1 for f, _ in placed if abs(f - frac) < 0.06)
            placed.append((frac, level))
            if withdrawn:
                label = f"retracted: {withdrawn.get('event')} {withdrawn.get('grade_label') or ''}".rstrip()
            else:
                label = e.kind + (f" {rec.get('grade_label')}" if rec.get("grade_label") and e.kind != "resolved" else "")
            if rec.get("anc") is not None and e.kind != "retracted":
                label += f" ({'≤' if rec.get('anc_at_most') else ''}{_fmt(rec['anc'], 0)})"
            if e.correction:
                label += " [correction]"
            ax.annotate(label, (_dt(t_us), y), xytext=(6, 14 + 13 * level), textcoords="offset points", fontsize=8,
                        color=colour, fontweight="bold", zorder=8,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": colour, "lw": 0.6, "alpha": 0.85},
                        arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6})
            ax.axvline(_dt(t_us), color=colour, lw=0.5, alpha=0.35, zorder=2)
            tx.axvline(_dt(t_us), color=colour, lw=0.5, alpha=0.35, zorder=2)
            fever = rec.get("temperature")
            if e.kind == "febrile" and fever:
                try:
                    f_us = to_epoch_us(fever["effective"])
                except (ValueError, KeyError, TypeError):
                    continue
                tx.plot([_dt(f_us)], [fever["celsius"]], marker="*", ms=14, color=colour, mec="white", mew=0.8, ls="none", zorder=7)
                tx.annotate("febrile", (_dt(f_us), fever["celsius"]), xytext=(8, -4), textcoords="offset points",
                            fontsize=8, color=colour, fontweight="bold", va="top")
    # rejected inputs and rejected panels: a grey cross at the bottom of the ANC axis
    rejected = [s for s in trail.steps if s.outcome in ("rejected-input", "rejected") and s.effective_us is not None]
    if rejected:
        ax.plot([_dt(s.effective_us) for s in rejected if s.effective_us is not None], [low * 1.25] * len(rejected),
                marker="x", ms=7, color="#737373", ls="none", zorder=4)

    # temperatures, with the fever thresholds
    if temps:
        pts = sorted(temps.values())
        tx.plot([_dt(t) for t, _ in pts], [c for _, c in pts], color="#6a51a3", lw=0.8, marker=".", ms=5)
        hot = [(t, c) for t, c in pts if c >= r.fever_sustained_c]
        if hot:
            tx.plot([_dt(t) for t, _ in hot], [c for _, c in hot], ls="none", marker="o", ms=5, color="#cc4c02")
        lo_c = min(min(c for _, c in pts) - 0.3, 36.0)
        hi_c = max(max(c for _, c in pts) + 0.3, r.fever_single_c + 0.5)
        tx.set_ylim(lo_c, hi_c)
    else:
        tx.set_ylim(35.5, r.fever_single_c + 0.7)
        tx.text(0.5, 0.5, "no body temperatures", transform=tx.transAxes, ha="center", va="center", color="#737373")
    tx.axhline(r.fever_single_c, color="#cc4c02", lw=0.9, ls="--")
    tx.axhline(r.fever_sustained_c, color="#fd8d3c", lw=0.9, ls=":")
    tx.text(1.005, r.fever_single_c, f"{r.fever_single_c:.1f} once", transform=tx.get_yaxis_transform(), fontsize=7,
            va="center", color="#cc4c02")
    tx.text(1.005, r.fever_sustained_c, f"{r.fever_sustained_c:.1f} for {r.fever_sustained_us / HOUR_US:g} h",
            transform=tx.get_yaxis_transform(), fontsize=7, va="center", color="#fd8d3c")
    tx.set_ylabel("temperature (°C)")
    tx.grid(axis="y", color="#d9d9d9", lw=0.5)

    locator = mdates.AutoDateLocator(minticks=5, maxticks=12)
    tx.xaxis.set_major_locator(locator)
    tx.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.tick_params(labelbottom=False)
    tx.set_xlabel("collection time (UTC)")

    marks = [Line2D([], [], color="#2b2b2b", marker="o", ls="-", label="ANC (current value)"),
             Line2D([], [], color="#2b2b2b", marker=7, ls="none", label="ANC at most (\"<\")"),
             Line2D([], [], mfc="white", mec="#2171b5", marker="o", ls="none", label="superseded by a correction")]
    if any(s.outcome == "stale" for s in current):
        marks.append(Line2D([], [], mfc="#bdbdbd", mec="#2b2b2b", marker="o", ls="none", label="stale (collected earlier)"))
    if rejected:
        marks.append(Line2D([], [], color="#737373", marker="x", ls="none", label="rejected input/panel"))
    kinds = {e.kind for e in trail.events}
    marks += [Line2D([], [], color=EVENT_STYLE[k][0], marker=EVENT_STYLE[k][1], ls="none", ms=9, label=f"event: {k}")
              for k in EVENT_STYLE if k in kinds]
    ax.legend(handles=legend[::-1] + marks, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title=f"scheme {scheme.name}", title_fontsize=9)
    counts = ", ".join(f"{k} {sum(1 for e in trail.events if e.kind == k)}" for k in EVENT_STYLE if k in kinds) or "no events"
    fig.suptitle(f"{trail.patient} - neutrowatch decision trail, scheme {scheme.name}", fontsize=12, fontweight="bold")
    ax.set_title(f"{len(current)} panels assessed, {len(superseded)} superseded, {len(rejected)} rejected; {counts}",
                 fontsize=9, color="#525252")
    return fig


def write_png(trail: Trail, path: str | Path) -> None:
    fig = plot(trail)
    try:
        fig.savefig(path, format="png")
    except OSError as err:
        raise ExplainError(f"cannot write {path}: {err.strerror or err}") from None


__all__ = ["ExplainError", "Trail", "build_trail", "explain_inputs", "explain_server", "fetch_patient", "patient_reference",
           "plot", "render_text", "rule_for", "trail_json", "write_png"]
