"""The trail rendered: as text for the engineer's terminal (`render_text`) and as JSON for
machines (`trail_json`, whose `events` are the records exactly as replay writes them)."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET

from service.explain.model import Input, Step, Trail, band_range, describe_episode, fmt, scheme_summary
from service.explain.prose import hours
from service.output.events import EventRecord


def _given_json(i: Input) -> dict[str, Any] | None:
    g = i.given
    if g is None:
        return None
    fields = (
        ("value", g.value),
        ("comparator", g.comparator),
        ("unit", g.unit),
        ("system", g.system),
        ("code", g.code),
        ("text", g.text),
        ("dataAbsentReason", g.absent),
        ("other", g.other),
    )
    return {k: v for k, v in fields if v is not None}


def _input_json(i: Input) -> dict[str, Any]:
    return {
        "observation": i.ref,
        "version": i.version,
        "code": i.code,
        "kind": i.kind,
        "status": i.status,
        "effective": i.effective,
        "given": _given_json(i),
        "value": i.value,
        "unit": i.unit,
        "at_most": i.at_most,
        "role": i.role,
    }


def _step_json(s: Step) -> dict[str, Any]:
    return {
        "n": s.n,
        "kind": s.kind,
        "trigger": s.trigger,
        "available": s.available,
        "patient": s.patient,
        "panel": s.panel,
        "effective": s.effective,
        "outcome": s.outcome,
        "reason": s.reason,
        "inputs": [_input_json(i) for i in s.inputs],
        "anc": s.anc,
        "grade": s.grade,
        "episode_before": s.before,
        "episode_after": s.after,
        "events": [
            {
                "event": e.kind,
                "rule": e.rule,
                "detail": e.detail,
                "correction": e.correction,
                "record": msgspec.to_builtins(e.record),
            }
            for e in s.events
        ],
        "note": s.note,
        "revision_of": s.revision_of,
    }


def trail_json(trail: Trail) -> dict[str, Any]:
    """The trail for machines: every step with its inputs, ANC, grade, episode before/after, events
    with their rule, and `events`: the records exactly as replay writes them."""
    return {
        "patient": trail.patient,
        "scheme": trail.scheme.name,
        "bands": [
            {"label": b.label, "severity": b.severity, "range": band_range(trail.scheme, b)}
            for b in trail.scheme.bands
        ],
        "source": trail.source,
        "notes": trail.notes,
        "steps": [_step_json(s) for s in trail.steps],
        "events": [msgspec.to_builtins(r) for r in trail.records],
    }


def _versioned(i: Input) -> str:
    return i.ref + (f" v{i.version}" if i.version else "")


def _table(rows: list[list[str]], indent: str) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _header(trail: Trail) -> list[str]:
    r = trail.rules
    counts: dict[str, int] = {}
    for e in trail.events:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    panels = sum(1 for s in trail.steps if s.kind == "panel")
    temperatures = sum(1 for s in trail.steps if s.kind == "temperature")
    out = [
        f"Decision trail of {trail.patient} - scheme {trail.scheme.name}",
        f"  source:  {trail.source}",
        f"  bands:   {scheme_summary(trail.scheme)} (cells/uL)",
        f"  fever:   >= {r.fever_single_c:.1f} Cel once, or >= {r.fever_sustained_c:.1f} Cel for "
        f"{hours(r.fever_sustained_us)}; febrile within {hours(r.fever_window_us)} of ANC < "
        f"{r.febrile_anc_below:g} (or < {r.febrile_falling_anc_below:g} that fell >= "
        f"{r.febrile_fall_fraction * 100:g} % within {hours(r.febrile_fall_window_us)})",
        f"  summary: {panels} panel judgements, {temperatures} temperature readings, "
        f"{len(trail.rejected_inputs)} rejected inputs; events: "
        + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"),
    ]
    return out + [f"  note:    {note}" for note in trail.notes]


def _inputs_table(s: Step) -> list[str]:
    rows = [["observation", "code", "term", "status", "as received", "normalised", "role"]]
    for i in s.inputs:
        normalised = f"{'<=' if i.at_most else ''}{fmt(i.value, 2)} {i.unit}" if i.value is not None else "-"
        rows.append(
            [
                _versioned(i),
                i.code or "-",
                i.kind or "-",
                i.status or "-",
                i.given.describe() if i.given else "(not found)",
                normalised,
                i.role,
            ]
        )
    return _table(rows, "    ")


def _anc_lines(anc: dict[str, Any], grade: dict[str, Any]) -> list[str]:
    extra = [f"WBC {fmt(anc['wbc'])}/uL"] if anc["wbc"] is not None else []
    if anc["lln"] is not None:
        extra.append(f"LLN {fmt(anc['lln'])}/uL")
    if anc["cytopenia"]:
        extra.append(
            f"{anc['cytopenia']} (Hb {fmt(anc['hemoglobin'], 2)} g/dL, platelets {fmt(anc['platelets'])}/uL)"
        )
    severity = grade["severity"] or "not neutropenic"
    label = grade["label"] if grade["label"] == severity else f"{grade['label']} ({severity})"
    return [
        f"    ANC:      {'<=' if anc['at_most'] else ''}{fmt(anc['value'])}/uL by {anc['method']}"
        + (f"; {'; '.join(extra)}" if extra else ""),
        f"    grade:    {label}, {grade['range']}/uL in scheme {grade['scheme']}; "
        f"threshold rule: {grade['threshold_rule']}",
    ]


def _recipients(record: EventRecord) -> str:
    if record.recipients is UNSET:
        return ""
    if not record.recipients:
        return "  (no recipient: no order, care team or configured pool)"
    return f"  to {', '.join(record.recipients)} ({record.recipient_rule})"


def _event_lines(s: Step) -> list[str]:
    out = []
    for e in s.events:
        rec = e.record
        grade = rec.grade_label or rec.grade or ""
        fix = f" [correction: {e.correction}]" if e.correction else ""
        out.append(f"    EVENT     {e.kind.upper()} {grade}{fix}{_recipients(rec)}")
        out.append(f"              rule: {e.rule}")
        if e.detail:
            out.append(f"              why:  {e.detail}")
    return out


def _panel_lines(s: Step) -> list[str]:
    head = f"[{s.n}] {s.effective or '(no time)'}"
    if s.kind == "rejected-input":
        out = [f"{head}  REJECTED INPUT  (available {s.available or 'no lastUpdated'})"]
    else:
        again = f"; again, judged before at [{s.revision_of}]" if s.revision_of else ""
        out = [
            f"{head}  panel {s.panel}",
            f"    arrival:  {s.trigger}, available {s.available or '(no lastUpdated: input order)'}{again}",
        ]
    out += _inputs_table(s)
    if s.anc is not None and s.grade is not None:
        out += _anc_lines(s.anc, s.grade)
    if s.kind != "rejected-input":
        out.append(f"    episode:  before: {describe_episode(s.before)}")
        out.append(f"              after:  {describe_episode(s.after)}")
    out += _event_lines(s)
    if s.note:
        out.append(f"    {'outcome:' if s.events else 'decision:'} {s.note}")
    return out


def _temperature_lines(s: Step) -> list[str]:
    lines = []
    for i in s.inputs:
        given = i.given.describe() if i.given else "(not found)"
        lines.append(
            f"[{s.n}] {i.effective}  temperature {_versioned(i)}"
            + f" {i.code}: {given} -> {fmt(i.value, 2)} Cel; {s.note}"
        )
    lines += _event_lines(s)
    if s.events:
        lines.append(f"    episode:  after: {describe_episode(s.after)}")
    return lines


def _rejected_inputs(trail: Trail) -> list[str]:
    if not trail.rejected_inputs:
        return []
    rows = [
        [_versioned(s.inputs[0]), s.inputs[0].code or "-", s.effective or "-", s.reason or ""]
        for s in trail.rejected_inputs
    ]
    return ["", "Rejected inputs:", *_table(rows, "  ")]


def render_text(trail: Trail) -> str:
    out = _header(trail)
    for s in trail.steps:
        out.append("")
        out += _temperature_lines(s) if s.kind == "temperature" else _panel_lines(s)
    out += _rejected_inputs(trail)
    return "\n".join(out) + "\n"
