"""The core's reasons in words: the rule behind each event, why a panel announced nothing, what
became of a panel's fevers. Only renders what the core decided (`AlertEvent.febrile_rule`,
`PanelDecision.no_event`, `PanelDecision.fever`, service/core/reasons.py); the thresholds quoted
are the configured ones (rules.py)."""

from __future__ import annotations

from service.core.episodes import AlertEvent, EventKind, PatientState
from service.core.panels import PanelDecision
from service.core.reasons import AncRule, FebrileRule, FeverConsidered, FeverRule, NoEvent, NotFebrile
from service.core.rules import HOUR_US, Rules
from service.explain.model import fmt
from service.output.texts import recovering_phrase

REASON_PHRASE = {
    "corrected": "corrected result",
    "updated": "results added to the panel",
    "entered-in-error": "result entered in error",
    "cancelled": "result cancelled",
    "rejected on correction": "the corrected panel is rejected",
    "no longer assessable": "result no longer assessable",
}


def hours(us: int) -> str:
    return f"{us / HOUR_US:g} h"


def fever_threshold(rule: FeverRule, rules: Rules, unit: str = "") -> str:
    """The fever criterion in Celsius: ">= 38.3", ">= 38.0 for 1 h" (with `unit` " Cel":
    ">= 38.0 Cel for 1 h")."""
    if rule is FeverRule.SINGLE:
        return f">= {rules.fever_single_c:.1f}{unit}"
    return f">= {rules.fever_sustained_c:.1f}{unit} for {hours(rules.fever_sustained_us)}"


def anc_threshold(rule: AncRule, rules: Rules) -> str:
    if rule is AncRule.BELOW:
        return f"ANC < {rules.febrile_anc_below:g}"
    return (
        f"ANC < {rules.febrile_falling_anc_below:g} falling >= {rules.febrile_fall_fraction * 100:g} % "
        f"within {hours(rules.febrile_fall_window_us)}"
    )


def rule_for(event: AlertEvent, before: PatientState, rules: Rules) -> tuple[str, str]:
    """(the rule that fired, the values that made it fire) for one event."""
    a = event.assessment
    anc = f"ANC {fmt(a.anc)}/uL{' (at most)' if a.at_most else ''} at {a.effective}" if a else ""
    kind = event.kind
    if kind is EventKind.RECOVERING and event.recovering is not None:
        rule = (
            "recovering: normal, not yet confirmed"
            if event.recovering[0]
            else "recovering: neutropenic again"
        )
        return (
            rule,
            f"{anc}: {event.band.label}; {recovering_phrase(event.recovering)}, the episode stays open",
        )
    if kind is EventKind.RECURRENCE:
        return (
            "recurrence: neutropenic soon after the announced resolution",
            f"{anc}: {event.band.label}; the episode resolved at {event.recurred_after} re-opens",
        )
    if kind is EventKind.NEW:
        band = event.band
        label = band.label if band.label == band.severity else f"{band.label} ({band.severity})"
        return "new: neutropenic with no open episode", f"{anc}: {label}"
    if kind is EventKind.WORSENING:
        worst = before.machine.worst
        than = f" ({worst.label})" if worst is not None and not event.revision else ""
        return (
            "worsening: worse than the worst alerted",
            f"{anc}: {event.band.label}, worse than the worst alerted{than}",
        )
    if kind is EventKind.RESOLVED:
        return "resolved: back in the normal band", f"{anc}: normal; the episode ({event.band.label}) closes"
    if kind is EventKind.CHRONIC:
        days = rules.chronic_after_us / (24 * HOUR_US)
        return f"chronic: episode open more than {days:g} days", f"open since {event.opened}; {anc}"
    if kind is EventKind.FEBRILE and event.febrile_rule is not None:
        return _febrile(event, event.febrile_rule, anc, rules)
    if kind is EventKind.RETRACTED:
        return _retracted(event)
    return kind.value, anc


def _febrile(event: AlertEvent, why: FebrileRule, anc: str, rules: Rules) -> tuple[str, str]:
    rule = (
        f"febrile: fever {fever_threshold(why.fever, rules)} within {hours(rules.fever_window_us)} of "
        f"{anc_threshold(why.anc, rules)}"
    )
    fever = event.fever
    detail = f"{fever.celsius:.1f} Cel at {fever.effective} ({fever.ref})" if fever else ""
    if event.assessment is not None:
        detail += f"; {anc}"
        if why.anc is AncRule.FALLING and event.previous_anc is not None:
            detail += f", previous {fmt(event.previous_anc)}/uL at {event.previous_effective}"
    return rule, detail


def _retracted(event: AlertEvent) -> tuple[str, str]:
    phrase = REASON_PHRASE.get(event.reason or "", event.reason or "revision")
    x = event.retracted
    withdrawn = f"withdraws {x.kind.value} {x.band.label} (ANC {fmt(x.anc)}/uL at {x.effective})" if x else ""
    if event.worst is None:
        status = "no episode remains"
    else:
        status = "episode still open" if event.episode_open else "episode closed"
    return f"retracted: {phrase}", f"{withdrawn}; {status}"


def correction(event: AlertEvent) -> str | None:
    """For an alert a revision sent (not a retraction): why the revision happened."""
    if not event.revision or event.kind is EventKind.RETRACTED:
        return None
    return REASON_PHRASE.get(event.reason or "", event.reason)


def panel_note(d: PanelDecision, announced: bool) -> str | None:
    """Why a judged panel announced nothing (more), from its decision; `announced`: it produced events."""
    if d.rejection is not None:
        return f"panel rejected: {d.rejection.rejected.reason}; a rejected panel never alerts"
    if d.not_assessed is not None:
        return f"not assessed: {d.not_assessed.reason}"
    if d.withdrawn:
        return "no ANC any more: the panel leaves the patient's history; " + (
            "what rested on it is withdrawn" if announced else "no announcement rested on it"
        )
    return _no_event(d)


def _no_event(d: PanelDecision) -> str | None:
    why, a = d.no_event, d.assessment
    if why is NoEvent.NO_ANC:
        return "no ANC: the panel holds no final neutrophil result"
    if why is NoEvent.STALE:
        return (
            f"no event: collected before the newest assessed panel ({d.newest_effective}); remembered, "
            "it changes no episode"
        )
    if a is None or why is None:
        return None
    if why is NoEvent.REVISION_UNCHANGED:
        if d.revised_from is None or d.revised_from == a.band:
            return "re-assessed (later version): the same grade, nothing to announce"
        return (
            f"re-assessed (later version) as {a.band.label}, was {d.revised_from.label}: the revised "
            "history needs no new or withdrawn announcement"
        )
    if why is NoEvent.NOT_NEUTROPENIC:
        return "no event: not neutropenic and no open episode"
    worst = d.state.machine.worst.label if d.state.machine.worst else "?"
    return f"no event: {a.band.label} is not worse than the worst alerted ({worst}); never a repeated alert"


NOT_FEBRILE = {
    NotFebrile.NO_EPISODE: "no open episode",
    NotFebrile.ALREADY_FEBRILE: "the episode is already febrile (once per episode)",
}


def fever_note(f: FeverConsidered, rules: Rules) -> str:
    """A panel's temperatures as the fever rule judged them."""
    if f.fever is None:
        if f.high:
            return (
                f"no fever yet: >= {rules.fever_sustained_c:.1f} Cel but below "
                f"{rules.fever_single_c:.1f} and not sustained for {hours(rules.fever_sustained_us)}"
            )
        return "no fever"
    fever = f"fever ({fever_threshold(f.fever, rules, ' Cel')})"
    if f.febrile or f.not_febrile is None:
        return fever
    return f"{fever}; not febrile neutropenia: {_not_febrile(f.not_febrile, f.newest_anc, rules)}"


def _not_febrile(why: NotFebrile, newest_anc: float | None, rules: Rules) -> str:
    if why is NotFebrile.ANC_NOT_LOW:
        return f"the newest ANC ({fmt(newest_anc)}/uL) is neither < {rules.febrile_anc_below:g} nor falling"
    if why is NotFebrile.TOO_FAR:
        return f"more than {hours(rules.fever_window_us)} from the newest ANC"
    return NOT_FEBRILE[why]
