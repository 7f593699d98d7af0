"""Per-patient neutropenia episodes: a state machine over assessments, and revision when a result
that was already assessed is corrected or withdrawn.

Rules of the machine (issue 2; grading from grading.py):
- a panel collected before the newest panel already assessed for the patient is remembered but
  does not open, worsen or resolve an episode (`stale`);
- no open episode and a neutropenic band -> `new`;
- open episode and a band worse than the worst already alerted in it -> `worsening`;
- open episode and a normal band -> `resolved` (the episode closes; a later drop opens a new one);
- an episode open longer than `chronic_after` -> `chronic`, once (issue 4; seed 000: > 3 months);
- anything else -> no event: never a repeated alert at a band already sent.

Revision (issue 4, "Corrections"): the patient's recent assessments are remembered in arrival
order. When a remembered panel is re-assessed with a corrected value, or loses its value
(entered-in-error, cancelled), the machine is re-run over the revised history and what it now
derives is compared with what was announced: announcements that no longer hold are `retracted`,
and alerts that now hold but were never sent are sent, marked as corrections.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from enum import StrEnum

from .grading import Band

DAY_US = 86_400_000_000
CHRONIC_AFTER_US = 91 * DAY_US  # "more than 3 months" (issue 4, seed 000)
HISTORY_LIMIT = 24  # assessments remembered per patient for revision


class EventKind(StrEnum):
    NEW = "new"
    WORSENING = "worsening"
    RESOLVED = "resolved"
    CHRONIC = "chronic"
    RETRACTED = "retracted"


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
    chronic: bool = False  # the open episode has been announced chronic


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
        return (self.episode, self.kind.value, self.band.rank)


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
    episode_open: bool = True  # the episode is still open after this event
    ended: str | None = None  # collection time of the panel that resolved the episode, if it is closed
    retracted: Alerted | None = None  # for `retracted`: the announcement withdrawn
    reason: str | None = None  # for revisions: why ("corrected", "entered-in-error", ...)
    revision: int = 0  # 0 for ordinary events; n for the patient's n-th revision

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.episode, self.kind.value, self.band.rank)


@dataclass(frozen=True, slots=True)
class PatientState:
    machine: EpisodeState = EpisodeState()  # the machine after `base` and every assessment in `history`
    base: EpisodeState = EpisodeState()  # the machine before the first remembered assessment
    history: tuple[Assessment, ...] = ()  # remembered assessments in arrival order
    alerted: tuple[Alerted, ...] = ()  # announcements derived from `history`
    revisions: int = 0


def episode_id(patient: str, panel: str) -> str:
    """Deterministic: the same data gives the same id in replay, in the live loop and after a restart."""
    return hashlib.sha256(f"{patient}\x1f{panel}".encode()).hexdigest()[:32]


def step(state: EpisodeState, a: Assessment, chronic_after_us: int = CHRONIC_AFTER_US) -> tuple[EpisodeState, list[AlertEvent], bool]:
    """Apply one assessment. Returns the new state, its events, and whether it was stale."""
    if state.newest_us is not None and a.effective_us < state.newest_us:
        return state, [], True
    moved = replace(state, current=a.band, newest_us=a.effective_us, last_anc=a.anc, last_effective=a.effective)

    def event(kind: EventKind, s: EpisodeState, band: Band) -> AlertEvent:
        assert s.episode is not None and s.opened is not None
        closing = kind is EventKind.RESOLVED
        return AlertEvent(kind, a.patient, s.episode, band, s.worst, a, s.opened, state.last_anc, state.last_effective,
                          s.chronic, episode_open=not closing, ended=a.effective if closing else None)

    if state.episode is None:
        if a.band.severity is None:
            return moved, [], False
        opened = replace(moved, episode=episode_id(a.patient, a.panel), opened=a.effective, opened_us=a.effective_us,
                         worst=a.band, chronic=False)
        return opened, [event(EventKind.NEW, opened, a.band)], False
    assert state.worst is not None
    if a.band.severity is None:
        resolved = event(EventKind.RESOLVED, state, state.current or state.worst)
        return replace(moved, episode=None, opened=None, opened_us=None, worst=None, chronic=False), [resolved], False
    events: list[AlertEvent] = []
    if a.band.rank > state.worst.rank:
        moved = replace(moved, worst=a.band)
        events.append(event(EventKind.WORSENING, moved, a.band))
    if not moved.chronic and moved.opened_us is not None and a.effective_us - moved.opened_us > chronic_after_us:
        moved = replace(moved, chronic=True)
        events = [replace(e, chronic=True) for e in events]
        events.append(event(EventKind.CHRONIC, moved, moved.worst or a.band))
    return moved, events, False


def _fold(base: EpisodeState, history: tuple[Assessment, ...], chronic_after_us: int) -> tuple[EpisodeState, list[AlertEvent]]:
    state, events = base, []
    for a in history:
        state, produced, _ = step(state, a, chronic_after_us)
        events.extend(produced)
    return state, events


def _remember(e: AlertEvent) -> Alerted:
    a = e.assessment
    return Alerted(e.episode, e.kind, e.band, a.panel if a else "", a.anc if a else 0.0, a.effective if a else "", e.revision)


def _trim(ps: PatientState, chronic_after_us: int, limit: int) -> PatientState:
    if len(ps.history) <= limit:
        return ps
    dropped, kept = ps.history[: len(ps.history) - limit], ps.history[len(ps.history) - limit :]
    base, _ = _fold(ps.base, dropped, chronic_after_us)
    panels = {a.panel for a in kept}
    return replace(ps, base=base, history=kept, alerted=tuple(x for x in ps.alerted if x.panel in panels))


def apply(
    ps: PatientState,
    a: Assessment,
    *,
    reason: str = "corrected",
    chronic_after_us: int = CHRONIC_AFTER_US,
    limit: int = HISTORY_LIMIT,
) -> tuple[PatientState, list[AlertEvent], bool]:
    """A panel assessed: a first assessment steps the machine; a re-assessment of a remembered
    panel revises the history. Returns the new state, the events and whether it was stale."""
    index = next((i for i, h in enumerate(ps.history) if h.panel == a.panel), None)
    if index is None:
        machine, events, stale = step(ps.machine, a, chronic_after_us)
        alerted = ps.alerted + tuple(_remember(e) for e in events)
        return _trim(replace(ps, machine=machine, history=ps.history + (a,), alerted=alerted), chronic_after_us, limit), events, stale
    if _same_grade(ps.history[index], a):
        history = ps.history[:index] + (a,) + ps.history[index + 1 :]  # same decision, newer values
        return replace(ps, history=history), [], False
    history = ps.history[:index] + (a,) + ps.history[index + 1 :]
    new, events = revise(ps, history, a.patient, reason, a, chronic_after_us)
    return _trim(new, chronic_after_us, limit), events, False


def withdraw(
    ps: PatientState, patient: str, panel: str, *, reason: str, chronic_after_us: int = CHRONIC_AFTER_US
) -> tuple[PatientState, list[AlertEvent]]:
    """A remembered panel no longer has an ANC (its result was entered in error or cancelled):
    it leaves the history and what rested on it is retracted."""
    if not any(h.panel == panel for h in ps.history):
        return ps, []
    return revise(ps, tuple(h for h in ps.history if h.panel != panel), patient, reason, None, chronic_after_us)


def _same_grade(old: Assessment, new: Assessment) -> bool:
    return old.band == new.band and old.effective_us == new.effective_us


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
    chronic_after_us: int = CHRONIC_AFTER_US,
) -> tuple[PatientState, list[AlertEvent]]:
    machine, derived = _fold(ps.base, history, chronic_after_us)
    revision = ps.revisions + 1
    derived_keys = {e.key for e in derived}
    announced_keys = {x.key for x in ps.alerted}
    events: list[AlertEvent] = []
    for x in ps.alerted:
        if x.key in derived_keys:
            continue
        opened = next((e.opened for e in derived if e.episode == x.episode), x.effective)
        ended = next((e.ended for e in derived if e.episode == x.episode and e.kind is EventKind.RESOLVED), None)
        events.append(AlertEvent(
            EventKind.RETRACTED, patient, x.episode, x.band, _episode_worst(x.episode, machine, derived), assessment,
            opened, machine.last_anc, machine.last_effective, chronic=x.episode == machine.episode and machine.chronic,
            episode_open=x.episode == machine.episode, ended=ended, retracted=x, reason=reason, revision=revision,
        ))
    for e in derived:
        if e.key not in announced_keys:
            events.append(replace(e, reason=reason, revision=revision))
    announced = {x.key: x for x in ps.alerted}
    alerted = tuple(announced.get(e.key) or _remember(replace(e, revision=revision)) for e in derived)
    return PatientState(machine, ps.base, history, alerted, revision if events else ps.revisions), events
