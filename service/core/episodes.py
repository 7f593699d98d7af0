"""Per-patient neutropenia episodes: a state machine over assessments and temperatures, and
revision when a result that was already assessed is corrected or withdrawn.

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
  it had arrived first (`add_temperature`), so the order of arrival does not decide;
- anything else -> no event: never a repeated alert at a band already sent.

Revision (corrections, reference §1.5): the patient's recent assessments are remembered in arrival
order. When a remembered panel is re-assessed with a corrected value, or loses its value
(entered-in-error, cancelled), the machine is re-run over the revised history and what it now
derives is compared with what was announced: announcements that no longer hold are `retracted`,
and alerts that now hold but were never sent are sent, marked as corrections.

Bounded memories, chosen so that the arrival order never decides what is forgotten:
- temperatures are remembered by COLLECTION time (`remembered_temperatures`): every reading from
  the oldest remembered assessment (or the newest panel, if older) less the fever window and the
  sustained-fever span on — readings collected after the newest panel included, since they may pair
  with a CBC not read yet — plus the last reading before that (it carries a sustained run under
  way). Panels collected earlier are stale or can no longer be revised, so within that horizon a
  panel still to be judged finds exactly the fevers of the whole record, whatever order the
  readings came in (a reading collected days later and read first used to evict the fever beside
  an earlier draw when memory followed the newest reading seen, and a correction days later
  retracted a febrile alert for want of its fever). Over rules.temperature_memory_cap the earliest
  collected go first;
- the history keeps `history_limit` assessments: panels stale in the fold go first (earliest
  collected first; they changed nothing and a correction finds them stale again), then the earliest
  arrivals into `base`, so a back-load of old panels cannot push the newest out (`_trim`).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from service.core.grading import Band
from service.core.reasons import AncRule, FebrileRule, FeverConsidered, FeverRule, NotFebrile
from service.core.rules import DAY_US, Rules


class EventKind(StrEnum):
    NEW = "new"
    WORSENING = "worsening"
    RESOLVED = "resolved"
    CHRONIC = "chronic"
    FEBRILE = "febrile"
    RETRACTED = "retracted"
    RECOVERING = "recovering"
    RECURRENCE = "recurrence"


_ONCE_PER_EPISODE = (EventKind.CHRONIC, EventKind.FEBRILE)


def _slot(kind: EventKind, band: Band, update: int) -> int:
    """The announcement's place within its episode opening: once-per-episode kinds have one,
    `recovering` one per Flag update, the others one per band."""
    if kind in _ONCE_PER_EPISODE:
        return 0
    return update if kind is EventKind.RECOVERING else band.rank


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
    # (Observation, "system|code", ConceptMap) of each member read through the site's ConceptMap
    mapped: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Temperature:
    ref: str
    effective: str
    effective_us: int
    celsius: float


@dataclass(frozen=True, slots=True)
class ClosedEpisode:
    """The episode whose resolution was announced last: a neutropenic panel within rules.reopen_us
    of `ended_us` re-opens it."""

    episode: str
    opened: str
    opened_us: int
    worst: Band
    chronic: bool
    ended: str
    ended_us: int
    opening: int
    updates: int
    memory: int


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
    announced: Band | None = None  # worst band announced since the episode (re-)opened
    normals: int = 0  # normal panels in a row in the open episode (a recovery under way)
    normal_since_us: int | None = None  # collection time of the first of them
    recovering_from: Band | None = None  # band of the last neutropenic panel before them
    opening: int = 0  # how many times the open episode has re-opened (recurrences)
    updates: int = 0  # `recovering` Flag updates made in the open episode
    closed: ClosedEpisode | None = None  # the last announced resolution, while a recurrence may re-open it
    openings: tuple[int, ...] = ()  # collection times of episodes opened within rules.memory_us
    memory: int = 0  # the open episode is the patient's n-th within rules.memory_us (0: not counted)


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
    opening: int = 0  # the episode's re-opening it was made in
    update: int = 0  # for `recovering`: which Flag update

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.episode, self.kind.value, _slot(self.kind, self.band, self.update), self.opening)


@dataclass(frozen=True, slots=True)
class AlertEvent:
    kind: EventKind
    patient: str
    episode: str
    # new/worsening: the band now; resolved: the band it resolved from; retracted: the band withdrawn
    band: Band
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
    febrile_rule: FebrileRule | None = None  # for `febrile`: the fever and ANC criteria that fired
    opening: int = 0  # 0: the episode as opened; n: after its n-th recurrence
    update: int = 0  # for `recovering`: the n-th Flag update of the episode
    recovering: tuple[int, int] | None = None  # (normal panels in a row, needed); 0: the recovery ended
    recurred_after: str | None = None  # for `recurrence`: collection time of the resolution it re-opens
    memory: tuple[int, int] | None = None  # (n, days): the patient's n-th episode (n >= 2) within `days`

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.episode, self.kind.value, _slot(self.kind, self.band, self.update), self.opening)


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


def fever_rule(fever: Temperature, rules: Rules) -> FeverRule:
    """How a reading that `fevers` returned established the fever."""
    return FeverRule.SINGLE if fever.celsius >= rules.fever_single_c else FeverRule.SUSTAINED


def _anc_rule(state: EpisodeState, rules: Rules) -> AncRule | None:
    """The febrile ANC criterion the newest ANC meets, if any: below febrile_anc_below, else below
    febrile_falling_anc_below having fallen by febrile_fall_fraction within the fall window."""
    if state.last is None or state.newest_us is None:
        return None
    anc = state.last.anc
    if anc < rules.febrile_anc_below:
        return AncRule.BELOW
    falling = (
        anc < rules.febrile_falling_anc_below
        and state.previous_anc is not None
        and state.previous_us is not None
        and state.newest_us - state.previous_us <= rules.febrile_fall_window_us
        and anc <= state.previous_anc * (1 - rules.febrile_fall_fraction)
    )
    return AncRule.FALLING if falling else None


def _near(fever: Temperature, state: EpisodeState, rules: Rules) -> bool:
    """Collected within the fever window of the newest ANC."""
    return state.newest_us is not None and abs(fever.effective_us - state.newest_us) <= rules.fever_window_us


def _febrile_fever(
    state: EpisodeState, temperatures: tuple[Temperature, ...], rules: Rules
) -> tuple[Temperature, FebrileRule] | None:
    """The fever that makes the open episode's newest ANC a febrile neutropenia, if any, with the
    criteria it met."""
    anc = _anc_rule(state, rules) if state.episode is not None and not state.febrile else None
    if anc is None:
        return None
    fever = next((t for t in fevers(temperatures, rules) if _near(t, state, rules)), None)
    return (fever, FebrileRule(fever_rule(fever, rules), anc)) if fever is not None else None


def fever_considered(
    ps: PatientState, readings: Sequence[Temperature], febrile: bool, rules: Rules
) -> FeverConsidered:
    """What the fever rule made of a panel's readings, in the patient's state after the panel:
    whether one is a fever (in the whole remembered record), and for a fever that announced no
    febrile neutropenia (`febrile` False), why."""
    established = {t.ref for t in fevers(ps.temperatures, rules)}
    hits = [t for t in readings if t.ref in established]
    if not hits:
        return FeverConsidered(None, high=any(t.celsius >= rules.fever_sustained_c for t in readings))
    rule = fever_rule(max(hits, key=lambda t: t.celsius), rules)
    m = ps.machine
    if febrile:
        return FeverConsidered(rule, febrile=True)
    if m.episode is None:
        return FeverConsidered(rule, not_febrile=NotFebrile.NO_EPISODE)
    if m.febrile:
        return FeverConsidered(rule, not_febrile=NotFebrile.ALREADY_FEBRILE)
    if not any(_near(t, m, rules) for t in hits):
        return FeverConsidered(rule, not_febrile=NotFebrile.TOO_FAR)
    newest = m.last.anc if m.last else None
    return FeverConsidered(rule, not_febrile=NotFebrile.ANC_NOT_LOW, newest_anc=newest)


# -- the machine -------------------------------------------------------------------------------------


def _event(
    kind: EventKind,
    s: EpisodeState,
    band: Band,
    a: Assessment | None,
    before: EpisodeState,
    rules: Rules,
    **kw: Any,
) -> AlertEvent:
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
    events = [_event(EventKind.NEW, opened, a.band, a, before, rules)]
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
    events = [_event(EventKind.RECURRENCE, s, a.band, a, before, rules, recurred_after=closed.ended)]
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
        resolved = _event(
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
    event = _event(EventKind.RECOVERING, s, a.band, a, state, rules, recovering=recovering, update=s.updates)
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
        events.append(_event(EventKind.WORSENING, moved, a.band, a, state, rules))
    elif state.normals:
        moved = replace(moved, updates=state.updates + 1)
        events.append(
            _event(
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
    events.append(_event(EventKind.CHRONIC, s, s.worst or a.band, a, before, rules))
    return s, events


def _after(
    s: EpisodeState,
    events: list[AlertEvent],
    a: Assessment,
    before: EpisodeState,
    rules: Rules,
    temperatures: tuple[Temperature, ...],
) -> tuple[EpisodeState, list[AlertEvent], bool]:
    febrile = _febrile_fever(s, temperatures, rules)
    if febrile is not None:
        fever, why = febrile
        s = replace(s, febrile=True)
        events = [replace(e, febrile=True) for e in events]
        events.append(
            _event(EventKind.FEBRILE, s, s.current or a.band, a, before, rules, fever=fever, febrile_rule=why)
        )
    return s, events, False


def _fold(
    base: EpisodeState, history: tuple[Assessment, ...], rules: Rules, temperatures: tuple[Temperature, ...]
) -> tuple[EpisodeState, list[AlertEvent]]:
    state, events = base, []
    for a in history:
        state, produced, _ = step(state, a, rules, temperatures)
        events.extend(produced)
    return state, events


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
    base, _ = _fold(ps.base, dropped, rules, ps.temperatures)
    panels = {a.panel for a in kept}
    ps = replace(ps, base=base, history=kept, alerted=tuple(x for x in ps.alerted if x.panel in panels))
    return replace(
        ps, temperatures=_bounded(ps.temperatures, temperature_horizon(ps, rules), rules)
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
    insort(readings, t, key=_collection_order)  # the memory is kept in collection order
    kept = _bounded(readings, temperature_horizon(ps, rules), rules)
    ps = replace(ps, temperatures=kept)
    machine = ps.machine
    if (
        machine.episode is None
        or machine.febrile
        or t.celsius < min(rules.fever_sustained_c, rules.fever_single_c)
    ):
        return ps, []
    _, derived = _fold(ps.base, ps.history, rules, kept)
    opening = (machine.episode, machine.opening)
    event = next(
        (e for e in derived if e.kind is EventKind.FEBRILE and (e.episode, e.opening) == opening), None
    )
    if event is not None:
        event = replace(event, worst=machine.worst, chronic=machine.chronic)  # the Flag as it stands now
    else:  # the newest panel, when it is no longer in the history (folded into `base`)
        febrile = _febrile_fever(machine, kept, rules)
        if febrile is None or machine.last is None:
            return ps, []
        event = _event(
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


# -- temperature memory ------------------------------------------------------------------------------


def temperature_horizon(ps: PatientState, rules: Rules) -> int | None:
    """The earliest collection time a reading can still matter at: the fever window and the
    sustained span before the oldest remembered assessment (a correction re-judges every one of
    them) or before the newest panel (a panel collected earlier is stale and judges no fever), if
    that is older. None before the first assessment: the first panel may be collected at any time."""
    times = [h.effective_us for h in ps.history]
    if ps.machine.newest_us is not None:
        times.append(ps.machine.newest_us)
    return min(times) - rules.fever_window_us - rules.fever_sustained_us if times else None


def remembered_temperatures(
    readings: Iterable[Temperature], horizon_us: int | None, rules: Rules
) -> tuple[Temperature, ...]:
    """The readings kept, in collection order (`fevers` reads them so), chosen by collection time
    and never by arrival: a reading collected days after the newest panel may pair with a CBC not
    read yet, and is kept like any other.

    - Readings collected before `horizon_us` go, except the last of them: it carries whether a run
      >= fever_sustained_c was under way at the horizon, so every reading from horizon +
      fever_sustained_us on is a fever exactly when it is one in the whole record.
    - Over rules.temperature_memory_cap the earliest collected go next, the same way (the first one
      kept carries the run): reached only by a patient with that many readings since the horizon,
      and then the fevers lost are those of the oldest panels (for a correction of one) or of the
      earliest readings before a first CBC, never a reading collected later than one kept.

    Nothing in between is thinned out: a reading below 38.0 C that looks redundant may be the one
    that separates two readings >= 38.0 C arriving later (a false sustained fever without it)."""
    return _bounded(sorted(readings, key=_collection_order), horizon_us, rules)


def _bounded(ordered: Sequence[Temperature], horizon_us: int | None, rules: Rules) -> tuple[Temperature, ...]:
    """`remembered_temperatures` of readings already in collection order."""
    start = 0
    if horizon_us is not None:
        start = max(bisect_left(ordered, (horizon_us, ""), key=_collection_order) - 1, 0)
    start = max(start, len(ordered) - rules.temperature_memory_cap)
    return ordered[start:] if isinstance(ordered, tuple) else tuple(ordered[start:])


def _collection_order(t: Temperature) -> tuple[int, str]:
    return t.effective_us, t.ref


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
    machine, derived = _fold(ps.base, history, rules, ps.temperatures)
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
