"""The episode state machine: one assessment's transition (`step`), and the machine run over a
history (`fold`).

Rules of the machine (grading from grading.py; reference §3):
- a panel collected before the newest panel already assessed for the patient is remembered but
  does not open, worsen or resolve an episode (`stale`);
- no open episode and a neutropenic band -> `new`;
- open episode and a band worse than the worst already alerted in it -> `worsening`;
- open episode and a normal band -> `recovering` (a Flag update, no Communication) until
  rules.resolution_confirmations normal panels in a row spanning rules.resolution_min_us confirm
  it -> `resolved` (the episode closes); a neutropenic panel before that ends the recovery: the
  episode stays open (`recovering` with 0 confirmations when no worsening announces it);
- a neutropenic panel within rules.reopen_us of an announced resolution -> `recurrence`: the same
  episode re-opens; grades and the fever are announced afresh within the re-opening (a later drop
  opens a new episode);
- every episode carries how many episodes the patient opened within rules.memory_us (`memory`);
- an episode open longer than `chronic_after` -> `chronic`, once (default > 3 months, a local choice);
- fever within 24 h of an ANC < 500, or of an ANC < 1000 that fell by half within 48 h ->
  `febrile`, once per episode (IDSA 2010, ASCO/IDSA 2018; rules.py); a reading that
  arrives after its CBC pairs with the first assessment of the open episode it makes febrile, as if
  it had arrived first (history.add_temperature), so the order of arrival does not decide;
- anything else -> no event: never a repeated alert at a band already sent.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from service.core.episodes import (
    AlertEvent,
    Assessment,
    ClosedEpisode,
    EpisodeState,
    EventKind,
    Temperature,
    episode_id,
)
from service.core.fever import febrile_fever
from service.core.grading import Band
from service.core.rules import DAY_US, Rules


def alert_event(
    kind: EventKind,
    s: EpisodeState,
    band: Band,
    a: Assessment | None,
    before: EpisodeState,
    rules: Rules,
    **kw: Any,
) -> AlertEvent:
    """The `kind` event of the episode as it stands in `s`, the patient's previous ANC as in `before`."""
    assert s.episode is not None and s.opened is not None
    memory = (s.memory, rules.memory_us // DAY_US) if s.memory >= 2 else None
    return AlertEvent(
        kind,
        a.patient if a else "",
        s.episode,
        band,
        s.worst,
        a,
        s.opened,
        before.last_anc,
        before.last_effective,
        s.chronic,
        s.febrile,
        opening=s.opening,
        memory=memory,
        **kw,
    )


def step(
    state: EpisodeState, a: Assessment, rules: Rules, temperatures: tuple[Temperature, ...] = ()
) -> tuple[EpisodeState, list[AlertEvent], bool]:
    """Apply one assessment. Returns the new state, its events, and whether it was stale."""
    if state.newest_us is not None and a.effective_us < state.newest_us:
        return state, [], True
    moved = replace(
        state,
        current=a.band,
        newest_us=a.effective_us,
        last_anc=a.anc,
        last_effective=a.effective,
        previous_anc=state.last_anc,
        previous_us=state.newest_us,
        previous_effective=state.last_effective,
        last=a,
    )
    if state.episode is None:
        if a.band.severity is None:
            return moved, [], False
        closed = state.closed
        if closed is not None and rules.reopen_us and a.effective_us - closed.ended_us <= rules.reopen_us:
            return _reopen(moved, closed, a, state, rules, temperatures)
        return _open(moved, a, state, rules, temperatures)
    if a.band.severity is None:
        return _normal(moved, a, state, rules)
    return _neutropenic(moved, a, state, rules, temperatures)


def _open(
    moved: EpisodeState,
    a: Assessment,
    before: EpisodeState,
    rules: Rules,
    temperatures: tuple[Temperature, ...],
) -> tuple[EpisodeState, list[AlertEvent], bool]:
    """A neutropenic panel with no open episode (nor one to re-open): a new episode."""
    window = rules.memory_us
    recent = tuple(t for t in before.openings if a.effective_us - t <= window)
    openings = recent + (a.effective_us,) if window else ()
    opened = replace(
        moved,
        episode=episode_id(a.patient, a.panel),
        opened=a.effective,
        opened_us=a.effective_us,
        worst=a.band,
        announced=a.band,
        chronic=False,
        febrile=False,
        opening=0,
        updates=0,
        closed=None,
        openings=openings,
        memory=len(openings),
    )
    events = [alert_event(EventKind.NEW, opened, a.band, a, before, rules)]
    return _after(opened, events, a, before, rules, temperatures)


def _reopen(
    moved: EpisodeState,
    closed: ClosedEpisode,
    a: Assessment,
    before: EpisodeState,
    rules: Rules,
    temperatures: tuple[Temperature, ...],
) -> tuple[EpisodeState, list[AlertEvent], bool]:
    """A neutropenic panel soon after an announced resolution: the same episode again, its grade
    announced afresh (a later worsening is announced even up to a grade the episode had before)."""
    worst = a.band if a.band.rank > closed.worst.rank else closed.worst
    s = replace(
        moved,
        episode=closed.episode,
        opened=closed.opened,
        opened_us=closed.opened_us,
        worst=worst,
        announced=a.band,
        chronic=closed.chronic,
        febrile=False,
        opening=closed.opening + 1,
        updates=closed.updates,
        closed=None,
        memory=closed.memory,
    )
    events = [alert_event(EventKind.RECURRENCE, s, a.band, a, before, rules, recurred_after=closed.ended)]
    s, events = _chronic(s, events, a, before, rules)
    return _after(s, events, a, before, rules, temperatures)


def _normal(
    moved: EpisodeState, a: Assessment, state: EpisodeState, rules: Rules
) -> tuple[EpisodeState, list[AlertEvent], bool]:
    """A normal panel in an open episode: resolved once confirmed, else recovering."""
    assert state.worst is not None and state.episode is not None and state.opened is not None
    since_us = a.effective_us if not state.normals or state.normal_since_us is None else state.normal_since_us
    normals = state.normals + 1
    was = state.recovering_from if state.normals else state.current
    if normals >= rules.resolution_confirmations and a.effective_us - since_us >= rules.resolution_min_us:
        resolved = alert_event(
            EventKind.RESOLVED,
            state,
            was or state.worst,
            a,
            state,
            rules,
            episode_open=False,
            ended=a.effective,
        )
        closed = ClosedEpisode(
            state.episode,
            state.opened,
            state.opened_us or 0,
            state.worst,
            state.chronic,
            a.effective,
            a.effective_us,
            state.opening,
            state.updates,
            state.memory,
        )
        gone = replace(
            moved,
            episode=None,
            opened=None,
            opened_us=None,
            worst=None,
            announced=None,
            chronic=False,
            febrile=False,
            normals=0,
            normal_since_us=None,
            recovering_from=None,
            opening=0,
            updates=0,
            closed=closed if rules.reopen_us else None,
            memory=0,
        )
        return gone, [resolved], False
    s = replace(
        moved, normals=normals, normal_since_us=since_us, recovering_from=was, updates=state.updates + 1
    )
    recovering = (normals, rules.resolution_confirmations)
    event = alert_event(
        EventKind.RECOVERING, s, a.band, a, state, rules, recovering=recovering, update=s.updates
    )
    return s, [event], False


def _neutropenic(
    moved: EpisodeState,
    a: Assessment,
    state: EpisodeState,
    rules: Rules,
    temperatures: tuple[Temperature, ...],
) -> tuple[EpisodeState, list[AlertEvent], bool]:
    """A neutropenic panel in an open episode: worsening when worse than announced since it (re-)opened;
    a recovery under way ends (the Flag says so)."""
    assert state.worst is not None
    announced = state.announced or state.worst
    moved = replace(moved, normals=0, normal_since_us=None, recovering_from=None)
    events: list[AlertEvent] = []
    if a.band.rank > announced.rank:
        worst = a.band if a.band.rank > state.worst.rank else state.worst
        moved = replace(moved, worst=worst, announced=a.band)
        events.append(alert_event(EventKind.WORSENING, moved, a.band, a, state, rules))
    elif state.normals:
        moved = replace(moved, updates=state.updates + 1)
        events.append(
            alert_event(
                EventKind.RECOVERING,
                moved,
                a.band,
                a,
                state,
                rules,
                recovering=(0, rules.resolution_confirmations),
                update=moved.updates,
            )
        )
    moved, events = _chronic(moved, events, a, state, rules)
    return _after(moved, events, a, state, rules, temperatures)


def _chronic(
    s: EpisodeState, events: list[AlertEvent], a: Assessment, before: EpisodeState, rules: Rules
) -> tuple[EpisodeState, list[AlertEvent]]:
    """An episode open longer than rules.chronic_after_us becomes chronic, once."""
    if s.chronic or s.opened_us is None or a.effective_us - s.opened_us <= rules.chronic_after_us:
        return s, events
    s = replace(s, chronic=True)
    events = [replace(e, chronic=True) for e in events]
    events.append(alert_event(EventKind.CHRONIC, s, s.worst or a.band, a, before, rules))
    return s, events


def _after(
    s: EpisodeState,
    events: list[AlertEvent],
    a: Assessment,
    before: EpisodeState,
    rules: Rules,
    temperatures: tuple[Temperature, ...],
) -> tuple[EpisodeState, list[AlertEvent], bool]:
    febrile = febrile_fever(s, temperatures, rules)
    if febrile is not None:
        fever, why = febrile
        s = replace(s, febrile=True)
        events = [replace(e, febrile=True) for e in events]
        events.append(
            alert_event(
                EventKind.FEBRILE, s, s.current or a.band, a, before, rules, fever=fever, febrile_rule=why
            )
        )
    return s, events, False


def fold(
    base: EpisodeState, history: tuple[Assessment, ...], rules: Rules, temperatures: tuple[Temperature, ...]
) -> tuple[EpisodeState, list[AlertEvent]]:
    """The machine run from `base` over `history`: the state it reaches and every event on the way."""
    state, events = base, []
    for a in history:
        state, produced, _ = step(state, a, rules, temperatures)
        events.extend(produced)
    return state, events
