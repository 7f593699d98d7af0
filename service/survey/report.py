"""A survey as JSON (docs/survey.md documents its shape) and as the text report for a terminal."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from service.survey.tally import CodeCount, Survey

_OTHERS_SHOWN = 15


def _ordered(codes: Iterable[CodeCount]) -> list[CodeCount]:
    return sorted(codes, key=lambda c: (-c.count, c.system or "", c.code or "", c.display or ""))


def _counts(counter: Counter[str]) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _code_json(c: CodeCount) -> dict[str, Any]:
    candidate = c.hint.candidate if c.hint is not None else None
    return {
        "system": c.system,
        "code": c.code,
        "display": c.display,
        "count": c.count,
        "standing": c.standing,
        "loinc": c.loinc,
        "candidate": asdict(candidate) if candidate is not None else None,
        "caution": c.hint.caution if c.hint is not None else None,
        "units": _counts(c.units),
        "statuses": _counts(c.statuses),
        "beside_bands": c.beside_bands,
    }


def survey_json(survey: Survey, source: str) -> dict[str, Any]:
    codes = _ordered(survey.codes.values())
    unmonitored = [c for c in codes if c.standing == "unmonitored"]
    unmonitored.sort(key=lambda c: c.hint is None or c.hint.candidate is None)  # candidates first (stable)
    return {
        "source": {
            "kind": source,
            "resources": survey.resources,
            "observations": survey.observations,
            "undecodable": survey.undecodable,
            "other_types": _counts(survey.other_types),
        },
        "observations": [_code_json(c) for c in codes],
        "unmonitored": [
            {k: v for k, v in _code_json(c).items() if k in _UNMONITORED_FIELDS} for c in unmonitored
        ],
        "not_assessed": _counts(survey.not_assessed),
        "panels": asdict(survey.panels),
        "unresolved_references": _counts(survey.unresolved_references),
        "temperatures_rejected": _counts(survey.temperatures_rejected),
        "rejected": _counts(survey.rejected),
    }


_UNMONITORED_FIELDS = frozenset({"system", "code", "display", "count", "candidate", "caution", "units"})


def _name(c: CodeCount) -> str:
    system = (c.system or "(no system)").rstrip("/").rsplit("/", 1)[-1]
    return f"{system}|{c.code or '(no code)'}  {c.display or ''}".rstrip()


def _units(c: CodeCount) -> str:
    return ", ".join(f"{u} {n:,}" for u, n in c.units.most_common(3))


def _section(title: str, lines: list[str]) -> list[str]:
    return [title] + ([f"  {line}" for line in lines] or ["  (none)"]) + [""]


def _counter_lines(counter: Counter[str]) -> list[str]:
    return [f"{n:>8,}  {reason}" for reason, n in _counts(counter).items()]


def render_text(survey: Survey, source: str) -> str:
    codes = _ordered(survey.codes.values())
    known = [c for c in codes if c.standing != "unmonitored"]
    hinted = [
        c
        for c in codes
        if c.standing == "unmonitored" and c.hint is not None and c.hint.candidate is not None
    ]
    cautions = [c for c in codes if c.standing == "unmonitored" and c.hint is not None and c.hint.caution]
    others = [c for c in codes if c.standing == "unmonitored" and c.hint is None]
    p = survey.panels
    out = [
        f"neutrowatch survey of {source}: {survey.observations:,} Observations in "
        f"{survey.resources:,} resources ({survey.undecodable:,} undecodable)",
        "",
    ]
    out += _section(
        "Monitored and mapped codes (count, code, standing, units, statuses)",
        [
            f"{c.count:>8,}  {_name(c)}  [{c.standing} {c.loinc}]  units: {_units(c)}  statuses: "
            + ", ".join(f"{s} {n:,}" for s, n in c.statuses.most_common())
            for c in known
        ],
    )
    out += _section(
        "Unmonitored codes with a likely term (a hint to review, never a mapping)",
        [line for c in hinted for line in _hinted(c)],
    )
    out += _section(
        "Unmonitored codes that look close but are not candidates",
        [f"{c.count:>8,}  {_name(c)}  CAUTION: {c.hint.caution}" for c in cautions if c.hint is not None],
    )
    out += _section(
        f"Other unmonitored codes ({len(others)}; the {min(len(others), _OTHERS_SHOWN)} most frequent)",
        [f"{c.count:>8,}  {_name(c)}  units: {_units(c)}" for c in others[:_OTHERS_SHOWN]],
    )
    out += _section("Results not assessed because of their status", _counter_lines(survey.not_assessed))
    out += _section(
        "Panels (monitored, mapped and candidate codes, candidates as if mapped; by specimen, else "
        "collection time)",
        [
            f"{p.total:>8,}  panels with a WBC, differential, haemoglobin or platelets",
            f"{p.wbc_without_differential:>8,}  with a WBC but no differential",
            f"{p.differential_without_wbc:>8,}  with a differential but no WBC",
            f"{p.neutrophil_pct_beside_bands:>8,}  with a neutrophil % beside a bands %",
        ],
    )
    out += _section("References that cannot be resolved", _counter_lines(survey.unresolved_references))
    out += _section(
        "Temperatures rejected by the core, and why", _counter_lines(survey.temperatures_rejected)
    )
    out += _section(
        "All rejections by the core (monitored, mapped, candidates as if mapped)",
        _counter_lines(survey.rejected),
    )
    return "\n".join(out) + "\n"


def _hinted(c: CodeCount) -> list[str]:
    assert c.hint is not None and c.hint.candidate is not None
    candidate = c.hint.candidate
    lines = [
        f"{c.count:>8,}  {_name(c)}  units: {_units(c)}",
        f"          candidate: LOINC {candidate.loinc} {candidate.loinc_display} ({candidate.term}; "
        f"from the {candidate.basis})",
    ]
    if candidate.note:
        lines.append(f"          note: {candidate.note}")
    if c.beside_bands:
        lines.append(
            f"          beside a bands % in {c.beside_bands:,} panels: review whether it is segmented "
            "neutrophils (769-0) there"
        )
    return lines
