"""The words of the alerts: the Communication's payload and the Flag's code.text, one function per
phrase, composed by `message()` and `flag_text()` (service/output/alerts.py puts them in the resources).

Counts are written as clinicians write them (docs/clinical-reference.md §3, "White-cell picture"):
the ANC in cells/µL, the WBC and platelets in ×10³/µL, haemoglobin in g/dL with one decimal, the
neutrophil fraction in % of the WBC. A white-cell picture the ANC alone does not tell
(service/core/picture.py) is named, and a resolution in that picture is not called a return to normal.
"""

from __future__ import annotations

from collections.abc import Callable

from service.core.episodes import AlertEvent, Assessment, EventKind
from service.core.grading import Scheme
from service.core.picture import Picture, WhiteCells, white_cells

PICTURE = {
    Picture.MARKED_LEUKOCYTOSIS_LOW_NEUTROPHILS: "marked leukocytosis with a low neutrophil fraction: "
    "review the blood film",
    Picture.HYPERLEUKOCYTOSIS: "hyperleukocytosis (WBC > 100 ×10³/µL): review the blood film urgently",
}
RETRACTED_WHAT = {
    "new": "new neutropenia, {band}",
    "worsening": "worsening to {band}",
    "resolved": "resolution of the neutropenia",
    "chronic": "chronic label",
    "febrile": "febrile neutropenia",
    "recurrence": "recurrence, {band}",
}


# -- counts -------------------------------------------------------------------------------------------


def cells(value: float) -> str:
    """An ANC: "1,250 cells/µL"."""
    return f"{value:,.0f} cells/µL"


def thousands(value: float, digits: int) -> str:
    """A count in ×10³/µL (WBC with one decimal, platelets with none): "41.2 ×10³/µL"."""
    return f"{value / 1000:,.{digits}f} ×10³/µL"


def percent(value: float) -> str:
    """A fraction of the WBC: whole percents from 10 %, one decimal below ("0.8 %", "6 %", "56 %")."""
    return f"{value:.0f} %" if value >= 10 else f"{round(value, 1):g} %"


def anc(a: Assessment) -> str:
    """ "ANC 410 cells/µL", or "ANC ≤ 100 cells/µL" for a bound."""
    return f"ANC {'≤ ' if a.at_most else ''}{cells(a.anc)}"


def white_of(a: Assessment) -> WhiteCells:
    """The panel's white-cell picture (the one rule, service/core/picture.py)."""
    return white_cells(a.wbc, a.anc, a.at_most)


def white_count(a: Assessment) -> str | None:
    """ "WBC 41.0 ×10³/µL, neutrophils 1 %", or None when the panel has no WBC."""
    white = white_of(a)
    if white.wbc is None:
        return None
    if white.neutrophil_percent is None:
        return f"WBC {thousands(white.wbc, 1)}"
    bound = "≤ " if white.at_most else ""
    return f"WBC {thousands(white.wbc, 1)}, neutrophils {bound}{percent(white.neutrophil_percent)}"


def blood_counts(a: Assessment) -> str:
    """ "Hb 9.1 g/dL, platelets 45 ×10³/µL" (whichever the panel has)."""
    parts = ([f"Hb {a.hemoglobin:.1f} g/dL"] if a.hemoglobin is not None else []) + (
        [f"platelets {thousands(a.platelets, 0)}"] if a.platelets is not None else []
    )
    return ", ".join(parts)


def cytopenia(a: Assessment) -> str | None:
    """What the other cell lines add: the cytopenia label of a neutropenic panel with its counts; on a
    panel that is not neutropenic (a resolution) or has no label, only the counts it has."""
    if not a.cytopenia or a.band.severity is None:
        return blood_counts(a) or None
    if a.cytopenia == "pancytopenia":
        return f"part of a pancytopenia ({blood_counts(a)})"
    if a.cytopenia == "isolated":
        return f"isolated (haemoglobin and platelets not low: {blood_counts(a)})"
    return f"{a.cytopenia} ({blood_counts(a)})"


def panel(a: Assessment) -> str:
    """The panel now: ANC, when and how, the white count, the other cell lines."""
    now = f"{anc(a)} collected {a.effective} ({a.method.replace('-', ' ')})"
    extra = [p for p in (white_count(a), cytopenia(a)) if p]
    return "; ".join([now, *extra])


def picture(a: Assessment | None) -> Picture | None:
    """The panel's named white-cell picture, if any."""
    return white_of(a).picture if a is not None else None


def picture_phrase(a: Assessment | None) -> str | None:
    """ "marked leukocytosis with a low neutrophil fraction: review the blood film", or None."""
    named = picture(a)
    return PICTURE[named] if named is not None else None


def picture_sentence(a: Assessment | None) -> str:
    """ " Marked leukocytosis with a low neutrophil fraction: review the blood film." or ""."""
    text = picture_phrase(a)
    return f" {text[0].upper()}{text[1:]}." if text else ""


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def memory_phrase(memory: tuple[int, int]) -> str:
    """ "3rd episode in 12 months": the patient's episodes opened within the memory window."""
    count, days = memory
    window = f"{days // 365 * 12} months" if days and days % 365 == 0 else f"{days} days"
    return f"{ordinal(count)} episode in {window}"


def recovering_phrase(recovering: tuple[int, int]) -> str:
    """ "recovering (1 of 3 confirmations)", or "recovery interrupted" when a neutropenic panel ended it."""
    got, needed = recovering
    return f"recovering ({got} of {needed} confirmations)" if got else "recovery interrupted"


# -- the heads of the announcements -------------------------------------------------------------------


def corrected(event: AlertEvent) -> str:
    return f"Corrected ({event.reason}): " if event.revision else ""


def new_head(event: AlertEvent, now: str) -> str:
    return f"{corrected(event)}New neutropenia, {event.band.label}: {now}."


def worsening_head(event: AlertEvent, now: str) -> str:
    return f"{corrected(event)}Neutropenia worsening to {event.band.label}: {now}."


def febrile_head(event: AlertEvent, now: str) -> str:
    fever = event.fever
    reading = f"temperature {fever.celsius:.1f} °C at {fever.effective}" if fever else "fever"
    return (
        f"FEBRILE NEUTROPENIA: {reading} with {now}. Treat as an emergency: empirical antibiotics "
        "within 1 hour per ASCO/IDSA."
    )


def recurrence_head(event: AlertEvent, now: str) -> str:
    """The same episode re-opened within clinical.resolution.reopen_days of its resolution."""
    worst = event.worst.label if event.worst else event.band.label
    return (
        f"{corrected(event)}Neutropenia recurrence, {event.band.label}: {now}; the episode since "
        f"{event.opened} (worst {worst}) re-opens, resolved {event.recurred_after}."
    )


def chronic_head(event: AlertEvent, now: str) -> str:
    return f"Neutropenia episode since {event.opened} is now chronic (open more than 3 months): {now}."


def resolved_head(event: AlertEvent, now: str) -> str:
    """Back in the normal range — unless the white-cell picture says the count is not normal: then
    the ANC has only crossed the threshold, and the text says so."""
    a = event.assessment
    assert a is not None
    worst = event.worst.label if event.worst else event.band.label
    episode = f"Episode since {event.opened}, worst {worst}."
    if picture(a) is not None:
        head = "Neutropenia resolved by the ANC only; the white count is not normal"
        return f"{corrected(event)}{head}: {now}. {episode}"
    return f"{corrected(event)}Neutropenia resolved, ANC back in the {a.band.label} range: {now}. {episode}"


HEADS: dict[EventKind, Callable[[AlertEvent, str], str]] = {
    EventKind.NEW: new_head,
    EventKind.RECURRENCE: recurrence_head,
    EventKind.WORSENING: worsening_head,
    EventKind.FEBRILE: febrile_head,
    EventKind.CHRONIC: chronic_head,
    EventKind.RESOLVED: resolved_head,
}


# -- the sentences after the head ---------------------------------------------------------------------


def chronic_note(event: AlertEvent) -> str:
    chronic = event.chronic and event.kind is not EventKind.CHRONIC
    return " Chronic: episode open more than 3 months." if chronic else ""


def memory_note(event: AlertEvent) -> str:
    """ " 3rd episode in 12 months." or ""."""
    return f" {memory_phrase(event.memory).capitalize()}." if event.memory else ""


def previous(event: AlertEvent) -> str:
    if event.previous_anc is None:
        return "No previous ANC on record."
    return f"Previous ANC {cells(event.previous_anc)} collected {event.previous_effective}."


def scheme_steps(scheme: Scheme) -> str:
    """ "Scheme default: mild <1500, moderate <1000, severe <500 cells/µL" (worst last)."""
    steps = [
        f"{b.label} <{'LLN' if b.below_lln else f'{b.below:g}'}" for b in reversed(scheme.bands) if b.severity
    ]
    return f"Scheme {scheme.name}: {', '.join(steps)} cells/µL."


# -- the texts ----------------------------------------------------------------------------------------


def message(event: AlertEvent, scheme: Scheme) -> str:
    """The Communication's payload."""
    if event.kind is EventKind.RETRACTED:
        return retraction_message(event, scheme)
    a = event.assessment
    assert a is not None
    head = HEADS[event.kind](event, panel(a))
    return (
        f"{head}{picture_sentence(a)}{chronic_note(event)}{memory_note(event)} {previous(event)} "
        f"{scheme_steps(scheme)}"
    )


def retraction_message(event: AlertEvent, scheme: Scheme) -> str:
    """The payload of a withdrawal: what no longer holds and why, the panel now, the episode now."""
    x = event.retracted
    assert x is not None
    what = RETRACTED_WHAT[x.kind.value].format(band=x.band.label)
    head = (
        f"WITHDRAWN: the earlier alert ({what}; ANC {cells(x.anc)} collected {x.effective}) "
        f"no longer holds: a result it rested on was {event.reason}."
    )
    return f"{head}{retraction_now(event.assessment)}{retraction_state(event)} Scheme {scheme.name}."


def retraction_now(a: Assessment | None) -> str:
    if a is None:
        return " That value is no longer on record."
    white = white_count(a)
    return f" The panel now gives ANC {cells(a.anc)} ({a.band.label}{f'; {white}' if white else ''})."


def retraction_state(event: AlertEvent) -> str:
    if event.worst is None:
        return " No neutropenia episode remains; its Flag is marked entered-in-error."
    if event.episode_open:
        return f" The episode remains open, worst {event.worst.label}."
    return f" The episode is closed, worst {event.worst.label}."


def resolved_clause(event: AlertEvent) -> str:
    """ "resolved <time>", qualified when the white-cell picture says the count is not normal."""
    return f"resolved {event.ended}" + (" by the ANC only" if picture(event.assessment) is not None else "")


def flag_text(event: AlertEvent, status: str) -> str:
    """The Flag's code.text: the episode (febrile, worst band, chronic, cytopenia), then its state and
    the latest panel's ANC and white count, and the white-cell picture when there is one."""
    a = event.assessment
    band = event.worst or event.band
    details = [f"{'Febrile neutropenia' if event.febrile else 'Neutropenia'}, {band.label}"]
    if event.chronic:
        details.append("chronic")
    if a is not None and a.cytopenia and a.band.severity is not None:
        details.append(a.cytopenia)
    if event.memory:
        details.append(memory_phrase(event.memory))
    text = ", ".join(details)
    if status == "entered-in-error":
        return text + " (entered in error: withdrawn)"
    clauses = [resolved_clause(event)] if status == "inactive" and event.ended else []
    if event.recovering and status == "active":
        clauses.append(recovering_phrase(event.recovering))
    if a is not None:
        clauses.append(f"latest {anc(a)} collected {a.effective}")
        counts = blood_counts(a) if a.band.severity is None else None
        clauses += [p for p in (white_count(a), counts, picture_phrase(a)) if p]
    return "; ".join([text, *clauses])
