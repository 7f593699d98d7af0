"""Per-patient neutropenia episodes: a state machine over assessments and temperatures, and
revision when a result that was already assessed is corrected or withdrawn.

Rules of the machine (issue 2; grading from grading.py):
- a panel collected before the newest panel already assessed for the patient is remembered but
  does not open, worsen or resolve an episode (`stale`);
- no open episode and a neutropenic band -> `new`;
- open episode and a band worse than the worst already alerted in it -> `worsening`;
- open episode and a normal band -> `resolved` (the episode closes; a later drop opens a new one);
- an episode open longer than `chronic_after` -> `chronic`, once (issue 4; seed 000: > 3 months);
- fever within 24 h of an ANC < 500, or of an ANC < 1000 that fell by half within 48 h ->
  `febrile`, once per episode (issue 4; IDSA 2010, ASCO/IDSA 2018; rules.py);
- anything else -> no event: never a repeated alert at a band already sent.

Revision (issue 4, "Corrections"): the patient's recent assessments are remembered in arrival
order. When a remembered panel is re-assessed with a corrected value, or loses its value
(entered-in-error, cancelled), the machine is re-run over the revised history and what it now
derives is compared with what was announced: announcements that no longer hold are `retracted`,
and alerts that now hold but were never sent are sent, marked as corrections.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from .grading import Band
from .rules import Rules


class EventKind(StrEnum):
    NEW = "new"
    WORSENING = "worsening"
    RESOLVED = "resolved"
    CHRONIC = "chronic"
    FEBRILE = "febrile"
    RETRACTED = "retracted"


_ONCE_PER_EPISODE = (EventKind.CHRONIC, EventKind.FEBRILE)


@dataclass(frozen=True, slots=True)
class Assessment:
    """One graded panel, in the compact form the patient's history keeps."""

    patient: str
    panel: str  # panel key, unique per patient
    anc: float  # cells/uL
    at_most: bool  # an input carried "<": the true ANC is at most `anc`
    method: str
    wbc: float | None
    band: Band
    effective: str  # collection time as given
    effective_us: int
    refs: tuple[str, ...] = ()  # Observation references used, the ANC source first
    versions: tuple[str | None, ...] = ()
    cytopenia: str | None = None  # isolated | pancytopenia | with anaemia | with thrombocytopenia
    hemoglobin: float | None = None  # g/dL, same panel
    platelets: float | None = None  # cells/uL, same panel
    threshold_rule: str = "scheme"  # which threshold applied (scheme, infant, individual)
    based_on: tuple[str, ...] = ()  # the orders (ServiceRequest references) behind the results
    time_note: str | None = None  # the collection time had no offset and was read in the site's timezone


@dataclass(frozen=True, slots=True)
class Temperature:
    ref: str
    effective: str
    effective_us: int
    celsius: float


@dataclass(frozen=True, slots=True)
class EpisodeState:
    episode: str | None = None  # id of the open episode
    opened: str | None = None  # collection time of the panel that opened it
    opened_us: int | None = None
    worst: Band | None = None  # worst band alerted in the open episode
    current: Band | None = None  # band of the newest assessment
    newest_us: int | None = None  # collection time of the newest assessment
    last_anc: float | None = None
    last_effective: str | None = None
    previous_anc: float | None = None  # the assessment before the newest (for the "falling" test)
    previous_us: int | None = None
    previous_effective: str | None = None
    chronic: bool = False  # the open episode has been announced chronic
    febrile: bool = False  # the open episode has been announced febrile
    last: Assessment | None = None  # the newest assessment


@dataclass(frozen=True, slots=True)
class Alerted:
    """An announcement made, remembered so a revision can tell what no longer holds."""

    episode: str
    kind: EventKind
    band: Band
    panel: str
    anc: float
    effective: str
    revision: int = 0  # the revision that announced it (0: an ordinary event)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.episode, self.kind.value, 0 if self.kind in _ONCE_PER_EPISODE else self.band.rank)


@dataclass(frozen=True, slots=True)
class AlertEvent:
    kind: EventKind
    patient: str
    episode: str
    band: Band  # new/worsening: the band now; resolved: the band it resolved from; retracted: the band withdrawn
    worst: Band | None  # the episode's worst band after this event (None: the episode no longer exists)
    assessment: Assessment | None  # the assessment behind it (None for a withdrawal with no new value)
    opened: str  # collection time of the panel that opened the episode
    previous_anc: float | None
    previous_effective: str | None
    chronic: bool = False  # the episode is (now) chronic
    febrile: bool = False  # the episode is (now) febrile
    episode_open: bool = True  # the episode is still open after this event
    ended: str | None = None  # collection time of the panel that resolved the episode, if it is closed
    fever: Temperature | None = None  # for `febrile`: the reading that made the fever
    retracted: Alerted | None = None  # for `retracted`: the announcement withdrawn
    reason: str | None = None  # for revisions: why ("corrected", "entered-in-error", ...)
    revision: int = 0  # 0 for ordinary events; n for the patient's n-th revision

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.episode, self.kind.value, 0 if self.kind in _ONCE_PER_EPISODE else self.band.rank)


@dataclass(frozen=True, slots=True)
class PatientState:
    machine: EpisodeState = EpisodeState()  # the machine after `base` and every assessment in `history`
    base: EpisodeState = EpisodeState()  # the machine before the first remembered assessment
    history: tuple[Assessment, ...] = ()  # remembered assessments in arrival order
    alerted: tuple[Alerted, ...] = ()  # announcements derived from `history`
    revisions: int = 0
    temperatures: tuple[Temperature, ...] = ()  # recent readings, by collection time


def episode_id(patient: str, panel: str) -> str:
    """Deterministic: the same data gives the same id in replay, in the live loop and after a restart."""
    return hashlib.sha256(f"{patient}\x1f{panel}".encode()).hexdigest()[:32]


# -- fever -----------------------------------------------------------------------------------------


def fevers(temperatures: Iterable[Temperature], rules: Rules) -> list[Temperature]:
    """The readings at which a fever is established: a single reading >= 38.3 C, or the reading at
    which readings >= 38.0 C with none below in between have spanned >= 1 h."""
    out: list[Temperature] = []
    run_start: int | None = None
    for t in temperatures:  # sorted by collection time
        if t.celsius >= rules.fever_single_c:
            out.append(t)
        if t.celsius >= rules.fever_sustained_c:
            if run_start is None:
                run_start = t.effective_us
            elif t.effective_us - run_start >= rules.fever_sustained_us and t.celsius < rules.fever_single_c:
                out.append(t)
        else:
            run_start = None
    return out


def _febrile_fever(state: EpisodeState, temperatures: tuple[Temperature, ...], rules: Rules) -> Temperature | None:
    """The fever that makes the open episode's newest ANC a febrile neutropenia, if any."""
    if state.episode is None or state.febrile or state.last is None or state.newest_us is None:
        return None
    anc = state.last.anc
    falling = (
        anc < rules.febrile_falling_anc_below
        and state.previous_anc is not None
        and state.previous_us is not None
        and state.newest_us - state.previous_us <= rules.febrile_fall_window_us
        and anc <= state.previous_anc * (1 - rules.febrile_fall_fraction)
    )
    if not (anc < rules.febrile_anc_below or falling):
        return None
    for fever in fevers(temperatures, rules):
        if abs(fever.effective_us - state.newest_us) <= rules.fever_window_us:
            return fever
    return None


# -- the machine -------------------------------------------------------------------------------------


def _event(kind: EventKind, s: EpisodeState, band: Band, a: Assessment | None, before: EpisodeState, **kw: object) -> AlertEvent:
    assert s.episode is not None and s.opened is not None
    return AlertEvent(kind, a.patient if a else "", s.episode, band, s.worst, a, s.opened, before.last_anc,
                      before.last_effective, s.chronic, s.febrile, **kw)  # type: ignore[arg-type]


def step(
    state: EpisodeState, a: Assessment, rules: Rules, temperatures: tuple[Temperature, ...] = ()
) -> tuple[EpisodeState, list[AlertEvent], bool]:
    """Apply one assessment. Returns the new state, its events, and whether it was stale."""
    if state.newest_us is not None and a.effective_us < state.newest_us:
        return state, [], True
    moved = replace(state, current=a.band, newest_us=a.effective_us, last_anc=a.anc, last_effective=a.effective,
                    previous_anc=state.last_anc, previous_us=state.newest_us, previous_effective=state.last_effective, last=a)
    if state.episode is None:
        if a.band.severity is None:
            return moved, [], False
        opened = replace(moved, episode=episode_id(a.patient, a.panel), opened=a.effective, opened_us=a.effective_us,
                         worst=a.band, chronic=False, febrile=False)
        return _after(opened, [_event(EventKind.NEW, opened, a.band, a, state)], a, state, rules, temperatures)
    assert state.worst is not None
    if a.band.severity is None:
        resolved = _event(EventKind.RESOLVED, state, state.current or state.worst, a, state, episode_open=False, ended=a.effective)
        return replace(moved, episode=None, opened=None, opened_us=None, worst=None, chronic=False, febrile=False), [resolved], False
    events: list[AlertEvent] = []
    if a.band.rank > state.worst.rank:
        moved = replace(moved, worst=a.band)
        events.append(_event(EventKind.WORSENING, moved, a.band, a, state))
    if not moved.chronic and moved.opened_us is not None and a.effective_us - moved.opened_us > rules.chronic_after_us:
        moved = replace(moved, chronic=True)
        events = [replace(e, chronic=True) for e in events]
        events.append(_event(EventKind.CHRONIC, moved, moved.worst or a.band, a, state))
    return _after(moved, events, a, state, rules, temperatures)


def _after(
    s: EpisodeState, events: list[AlertEvent], a: Assessment, before: EpisodeState, rules: Rules, temperatures: tuple[Temperature, ...]
) -> tuple[EpisodeState, list[AlertEvent], bool]:
    fever = _febrile_fever(s, temperatures, rules)
    if fever is not None:
        s = replace(s, febrile=True)
        events = [replace(e, febrile=True) for e in events]
        events.append(_event(EventKind.FEBRILE, s, s.current or a.band, a, before, fever=fever))
    return s, events, False


def _fold(base: EpisodeState, history: tuple[Assessment, ...], rules: Rules, temperatures: tuple[Temperature, ...]) -> tuple[EpisodeState, list[AlertEvent]]:
    state, events = base, []
    for a in history:
        state, produced, _ = step(state, a, rules, temperatures)
        events.extend(produced)
    return state, events


def _remember(e: AlertEvent) -> Alerted:
    a = e.assessment
    return Alerted(e.episode, e.kind, e.band, a.panel if a else "", a.anc if a else 0.0, a.effective if a else "", e.revision)


def _trim(ps: PatientState, rules: Rules) -> PatientState:
    if len(ps.history) <= rules.history_limit:
        return ps
    cut = len(ps.history) - rules.history_limit
    dropped, kept = ps.history[:cut], ps.history[cut:]
    base, _ = _fold(ps.base, dropped, rules, ps.temperatures)
    panels = {a.panel for a in kept}
    return replace(ps, base=base, history=kept, alerted=tuple(x for x in ps.alerted if x.panel in panels))


def apply(ps: PatientState, a: Assessment, rules: Rules, *, reason: str = "corrected") -> tuple[PatientState, list[AlertEvent], bool]:
    """A panel assessed: a first assessment steps the machine; a re-assessment of a remembered
    panel revises the history. Returns the new state, the events and whether it was stale."""
    index = next((i for i, h in enumerate(ps.history) if h.panel == a.panel), None)
    if index is None:
        machine, events, stale = step(ps.machine, a, rules, ps.temperatures)
        alerted = ps.alerted + tuple(_remember(e) for e in events)
        return _trim(replace(ps, machine=machine, history=ps.history + (a,), alerted=alerted), rules), events, stale
    history = ps.history[:index] + (a,) + ps.history[index + 1 :]
    old = ps.history[index]
    if old.band == a.band and old.effective_us == a.effective_us:
        return replace(ps, history=history), [], False  # same decision, newer values
    new, events = revise(ps, history, a.patient, reason, a, rules)
    return _trim(new, rules), events, False


def withdraw(ps: PatientState, patient: str, panel: str, rules: Rules, *, reason: str) -> tuple[PatientState, list[AlertEvent]]:
    """A remembered panel no longer has an ANC (its result was entered in error or cancelled):
    it leaves the history and what rested on it is retracted."""
    if not any(h.panel == panel for h in ps.history):
        return ps, []
    return revise(ps, tuple(h for h in ps.history if h.panel != panel), patient, reason, None, rules)


def add_temperature(ps: PatientState, t: Temperature, rules: Rules) -> tuple[PatientState, list[AlertEvent]]:
    """A body temperature reading: remembered for the fever rule; may make the open episode febrile."""
    if any(x.ref == t.ref and x.effective_us == t.effective_us and x.celsius == t.celsius for x in ps.temperatures):
        return ps, []
    merged = sorted((*(x for x in ps.temperatures if x.ref != t.ref), t), key=lambda x: (x.effective_us, x.ref))
    newest = max(merged[-1].effective_us, ps.machine.newest_us or 0)
    kept = tuple(x for x in merged if newest - x.effective_us <= rules.temperature_memory_us)[-64:]
    ps = replace(ps, temperatures=kept)
    machine = ps.machine
    fever = _febrile_fever(machine, kept, rules)
    if fever is None or machine.last is None:
        return ps, []
    febrile = replace(machine, febrile=True)
    event = _event(EventKind.FEBRILE, febrile, machine.current or machine.last.band, machine.last,
                   replace(machine, last_anc=machine.previous_anc, last_effective=machine.previous_effective), fever=fever)
    return replace(ps, machine=febrile, alerted=ps.alerted + (_remember(event),)), [event]


# -- revision ----------------------------------------------------------------------------------------


def _episode_worst(episode: str, machine: EpisodeState, derived: list[AlertEvent]) -> Band | None:
    """The episode's worst band after a revision; None when the episode no longer exists at all."""
    if machine.episode == episode:
        return machine.worst
    return next((e.worst for e in reversed(derived) if e.episode == episode), None)


def revise(
    ps: PatientState, history: tuple[Assessment, ...], patient: str, reason: str, assessment: Assessment | None, rules: Rules
) -> tuple[PatientState, list[AlertEvent]]:
    machine, derived = _fold(ps.base, history, rules, ps.temperatures)
    revision = ps.revisions + 1
    derived_keys = {e.key for e in derived}
    announced = {x.key: x for x in ps.alerted}
    events: list[AlertEvent] = []
    for x in ps.alerted:
        if x.key in derived_keys:
            continue
        opened = next((e.opened for e in derived if e.episode == x.episode), x.effective)
        ended = next((e.ended for e in derived if e.episode == x.episode and e.kind is EventKind.RESOLVED), None)
        still_open = x.episode == machine.episode
        events.append(AlertEvent(
            EventKind.RETRACTED, patient, x.episode, x.band, _episode_worst(x.episode, machine, derived), assessment,
            opened, machine.last_anc, machine.last_effective, chronic=still_open and machine.chronic,
            febrile=still_open and machine.febrile, episode_open=still_open, ended=ended, retracted=x, reason=reason,
            revision=revision,
        ))
    for e in derived:
        if e.key not in announced:
            events.append(replace(e, reason=reason, revision=revision))
    alerted = tuple(announced.get(e.key) or _remember(replace(e, revision=revision)) for e in derived)
    return PatientState(machine, ps.base, history, alerted, revision if events else ps.revisions, ps.temperatures), events
