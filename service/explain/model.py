"""The trail's data: a patient's decisions as steps (inputs as received and normalised, ANC, grade,
episode before and after, events with their rule), and the small formatting helpers every view
of it shares (numbers, band ranges, the episode in words)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.core.grading import Band, Scheme
from service.core.rules import Rules
from service.errors import NeutrowatchError
from service.output.events import Decision, EventRecord

UCUM = "http://unitsofmeasure.org"


class ExplainError(NeutrowatchError):
    """explain cannot run (no data for the patient, matplotlib missing, server unreachable)."""


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
            return self._quantity()
        if self.text is not None:
            return f"text {self.text[:24]!r}"
        if self.absent is not None:
            return f"dataAbsentReason {self.absent}"
        if self.other is not None:
            return self.other
        return "no value"

    def _quantity(self) -> str:
        unit = self.unit if self.unit is not None else (self.code or "(no unit)")
        out = f"{self.comparator or ''}{fmt(self.value)} {unit}"
        if self.system == UCUM and self.code and self.code != self.unit:
            out += f" [UCUM {self.code}]"
        elif self.system and self.system != UCUM:
            out += " [not UCUM]"
        return out


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
    record: EventRecord  # exactly the record replay writes to EVENTS.jsonl


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
    # assessed | stale | rejected | not-assessed | no-anc | temperature | rejected-input | quarantined
    outcome: str
    reason: str | None = None
    anc: dict[str, Any] | None = None
    grade: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    note: str | None = None  # why nothing (more) was announced
    records: list[Decision] = field(default_factory=list)  # every record of this step, replay's order
    revision_of: int | None = None  # the step that judged this panel before


@dataclass(slots=True)
class Trail:
    patient: str
    scheme: Scheme  # the configured scheme
    rules: Rules
    source: str
    steps: list[Step]
    records: list[Decision]  # every record for the patient, in replay's order
    notes: list[str] = field(default_factory=list)

    @property
    def events(self) -> list[Event]:
        return [e for s in self.steps for e in s.events]

    @property
    def rejected_inputs(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "rejected-input"]


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    rounded = round(float(value), digits)
    return f"{int(rounded)}" if rounded.is_integer() else f"{rounded:g}"


def patient_reference(arg: str) -> str:
    """ "123" -> "Patient/123"; a reference ("Patient/123", an absolute URL) is kept as given."""
    arg = arg.strip()
    if not arg:
        raise ExplainError("no patient given")
    return arg if "/" in arg else f"Patient/{arg}"


def band_range(scheme: Scheme, band: Band, lln: float | None = None) -> str:
    """The band's ANC interval in cells/uL, from the scheme's own bounds."""
    lower = 0.0
    for b in scheme.bands:
        if b == band:
            break
        if b.below is not None:
            lower = b.below
    if band.below_lln:
        return f"{fmt(lower)}-<LLN" + (f" ({fmt(lln)})" if lln is not None else "")
    if band.below is None:
        if any(b.below_lln for b in scheme.bands):  # CTCAE v5: normal from the result's LLN
            return f">= {fmt(max(lower, lln))}" if lln is not None else f">= {fmt(lower)} and >= LLN"
        return f">= {fmt(lower)}"
    return f"< {fmt(band.below)}" if lower == 0 else f"{fmt(lower)}-<{fmt(band.below)}"


def scheme_summary(scheme: Scheme) -> str:
    return ", ".join(f"{b.label} {band_range(scheme, b)}" for b in scheme.bands)


def describe_episode(view: dict[str, Any] | None) -> str:
    if view is None:
        return "-"
    if not view["open"]:
        return "no open episode"
    flags = [f for f in ("febrile", "chronic") if view.get(f)]
    flags += [f"{view['recovering']} normal in a row"] if view.get("recovering") else []
    flags += [f"re-opened {view['recurrences']}x"] if view.get("recurrences") else []
    return (
        f"open {view['episode'][:8]} since {view['opened']}, worst alerted {view['worst']}"
        + (f", now {view['current']}" if view.get("current") and view["current"] != view["worst"] else "")
        + (f" ({', '.join(flags)})" if flags else "")
    )
