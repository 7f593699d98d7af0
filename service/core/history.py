"""A patient's remembered history: an assessment applied (`apply`), a panel withdrawn (`withdraw`),
a temperature added (`add_temperature`), and revision when a result that was already assessed is
corrected or withdrawn.

Revision (corrections, reference §1.5): the patient's recent assessments are remembered in arrival
order. When a remembered panel is re-assessed with a corrected value, or loses its value
(entered-in-error, cancelled), the machine is re-run over the revised history and what it now
derives is compared with what was announced: announcements that no longer hold are `retracted`,
and alerts that now hold but were never sent are sent, marked as corrections.

The history is bounded so that the arrival order never decides what is forgotten: it keeps
`history_limit` assessments; panels stale in the fold go first (earliest collected first; they
changed nothing and a correction finds them stale again), then the earliest arrivals into `base`, so
a back-load of old panels cannot push the newest out (`_trim`). The temperature memory follows the
history (fever.py).
"""

from __future__ import annotations

from bisect import insort
from dataclasses import replace

from service.core.episodes import (
    Alerted,
    AlertEvent,
    Assessment,
    EpisodeState,
    EventKind,
    PatientState,
    Temperature,
)
from service.core.fever import collection_order, febrile_fever, remembered_in_order, temperature_horizon
from service.core.grading import Band
from service.core.rules import Rules
from service.core.transitions import alert_event, fold, step


def _remember(e: AlertEvent) -> Alerted:
    a = e.assessment
    return Alerted(
        e.episode,
        e.kind,
        e.band,
        a.panel if a else "",
        a.anc if a else 0.0,
        a.effective if a else "",
        e.revision,
        e.opening,
        e.update,
    )


def _stale_in_order(base: EpisodeState, history: tuple[Assessment, ...]) -> list[bool]:
    """Which remembered assessments `step` finds stale when the history is folded from `base`."""
    newest, out = base.newest_us, []
    for h in history:
        stale = newest is not None and h.effective_us < newest
        out.append(stale)
        newest = newest if stale else h.effective_us
    return out


def _trim(ps: PatientState, rules: Rules) -> PatientState:
    """Over history_limit, panels go in this order: first those stale in the fold (collected before a
    panel that arrived earlier — a back-load, a late result), earliest collected first: they never
    moved the machine nor announced anything, so dropping them changes neither, and a correction of
    one finds it stale again; then the earliest arrivals, folded into `base`. Dropping arrivals
    alone let a burst of late old panels push out the newest ones, whose correction is the likely
    one (it was then judged as a new panel, e.g. `resolved` instead of `retracted`). The temperature
    memory follows the history (temperature_horizon)."""
    if len(ps.history) <= rules.history_limit:
        return ps
    excess = len(ps.history) - rules.history_limit
    stale = [i for i, flag in enumerate(_stale_in_order(ps.base, ps.history)) if flag]
    gone = set(sorted(stale, key=lambda i: (ps.history[i].effective_us, i))[:excess])
    history = tuple(h for i, h in enumerate(ps.history) if i not in gone)
    cut = max(len(history) - rules.history_limit, 0)
    dropped, kept = history[:cut], history[cut:]
    base, _ = fold(ps.base, dropped, rules, ps.temperatures)
    panels = {a.panel for a in kept}
    ps = replace(ps, base=base, history=kept, alerted=tuple(x for x in ps.alerted if x.panel in panels))
    return replace(
        ps, temperatures=remembered_in_order(ps.temperatures, temperature_horizon(ps, rules), rules)
    )  # kept in collection order


def apply(
    ps: PatientState, a: Assessment, rules: Rules, *, reason: str = "corrected"
) -> tuple[PatientState, list[AlertEvent], bool]:
    """A panel assessed: a first assessment steps the machine; a re-assessment of a remembered
    panel revises the history. Returns the new state, the events and whether it was stale."""
    index = next((i for i, h in enumerate(ps.history) if h.panel == a.panel), None)
    if index is None:
        machine, events, stale = step(ps.machine, a, rules, ps.temperatures)
        alerted = ps.alerted + tuple(_remember(e) for e in events)
        return (
            _trim(replace(ps, machine=machine, history=ps.history + (a,), alerted=alerted), rules),
            events,
            stale,
        )
    history = ps.history[:index] + (a,) + ps.history[index + 1 :]
    old = ps.history[index]
    if old.band == a.band and old.effective_us == a.effective_us:
        return replace(ps, history=history), [], False  # same decision, newer values
    new, events = revise(ps, history, a.patient, reason, a, rules)
    return _trim(new, rules), events, False


def withdraw(
    ps: PatientState, patient: str, panel: str, rules: Rules, *, reason: str
) -> tuple[PatientState, list[AlertEvent]]:
    """A remembered panel no longer has an ANC (its result was entered in error or cancelled):
    it leaves the history and what rested on it is retracted."""
    if not any(h.panel == panel for h in ps.history):
        return ps, []
    return revise(ps, tuple(h for h in ps.history if h.panel != panel), patient, reason, None, rules)


def add_temperature(ps: PatientState, t: Temperature, rules: Rules) -> tuple[PatientState, list[AlertEvent]]:
    """A body temperature reading: remembered for the fever rule; may make the open episode febrile.

    The open episode's remembered assessments are judged again with it (the fold a revision makes):
    the first one it makes febrile is announced, as if the reading had been there when that panel
    was judged. So a reading that arrives after a later CBC of the same episode still pairs with
    the earlier draw it was taken beside; the febrile decision does not depend on the order the
    readings arrive in. A reading below 38.0 C makes no fever (it can only break a run), so it
    is only remembered; a fever learned after its episode closed is not announced (the alert asks
    for emergency treatment of an open neutropenia)."""
    known = next((x for x in ps.temperatures if x.ref == t.ref), None)
    if known == t:
        return ps, []
    readings = [x for x in ps.temperatures if x.ref != t.ref] if known is not None else list(ps.temperatures)
    insort(readings, t, key=collection_order)  # the memory is kept in collection order
    kept = remembered_in_order(readings, temperature_horizon(ps, rules), rules)
    ps = replace(ps, temperatures=kept)
    machine = ps.machine
    if (
        machine.episode is None
        or machine.febrile
        or t.celsius < min(rules.fever_sustained_c, rules.fever_single_c)
    ):
        return ps, []
    _, derived = fold(ps.base, ps.history, rules, kept)
    opening = (machine.episode, machine.opening)
    event = next(
        (e for e in derived if e.kind is EventKind.FEBRILE and (e.episode, e.opening) == opening), None
    )
    if event is not None:
        event = replace(event, worst=machine.worst, chronic=machine.chronic)  # the Flag as it stands now
    else:  # the newest panel, when it is no longer in the history (folded into `base`)
        febrile = febrile_fever(machine, kept, rules)
        if febrile is None or machine.last is None:
            return ps, []
        event = alert_event(
            EventKind.FEBRILE,
            replace(machine, febrile=True),
            machine.current or machine.last.band,
            machine.last,
            replace(machine, last_anc=machine.previous_anc, last_effective=machine.previous_effective),
            rules,
            fever=febrile[0],
            febrile_rule=febrile[1],
        )
    return replace(ps, machine=replace(machine, febrile=True), alerted=ps.alerted + (_remember(event),)), [
        event
    ]


# -- revision ----------------------------------------------------------------------------------------


def _episode_worst(episode: str, machine: EpisodeState, derived: list[AlertEvent]) -> Band | None:
    """The episode's worst band after a revision; None when the episode no longer exists at all."""
    if machine.episode == episode:
        return machine.worst
    return next((e.worst for e in reversed(derived) if e.episode == episode), None)


def revise(
    ps: PatientState,
    history: tuple[Assessment, ...],
    patient: str,
    reason: str,
    assessment: Assessment | None,
    rules: Rules,
) -> tuple[PatientState, list[AlertEvent]]:
    machine, derived = fold(ps.base, history, rules, ps.temperatures)
    revision = ps.revisions + 1
    announced = {x.key: x for x in ps.alerted}
    # A febrile never announced for an episode that is closed now stays unannounced, as in
    # add_temperature: a fever learned after its episode closed (kept in memory as long as the
    # panels it pairs with) must not re-open that episode's Flag on the next, unrelated, correction.
    current = (machine.episode, machine.opening)
    derived = [
        e
        for e in derived
        if not (e.kind is EventKind.FEBRILE and e.key not in announced and (e.episode, e.opening) != current)
    ]
    derived_keys = {e.key for e in derived}
    events: list[AlertEvent] = []
    for x in ps.alerted:
        if x.key in derived_keys:
            continue
        opened = next((e.opened for e in derived if e.episode == x.episode), x.effective)
        ended = next(
            (e.ended for e in derived if e.episode == x.episode and e.kind is EventKind.RESOLVED), None
        )
        still_open = x.episode == machine.episode
        events.append(
            AlertEvent(
                EventKind.RETRACTED,
                patient,
                x.episode,
                x.band,
                _episode_worst(x.episode, machine, derived),
                assessment,
                opened,
                machine.last_anc,
                machine.last_effective,
                chronic=still_open and machine.chronic,
                febrile=still_open and machine.febrile,
                episode_open=still_open,
                ended=ended,
                retracted=x,
                reason=reason,
                revision=revision,
                opening=x.opening,
            )
        )
    for e in derived:
        if e.key not in announced:
            events.append(replace(e, reason=reason, revision=revision))
    alerted = tuple(announced.get(e.key) or _remember(replace(e, revision=revision)) for e in derived)
    return PatientState(
        machine, ps.base, history, alerted, revision if events else ps.revisions, ps.temperatures
    ), events
