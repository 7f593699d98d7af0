"""Per-patient neutropenia episodes: a small state machine that turns assessments into events.

Rules (issue 2; grading from grading.py):
- a panel collected before the newest panel already assessed for the patient is recorded but
  does not open, worsen or resolve an episode (`stale`);
- no open episode and a neutropenic band -> `new`;
- open episode and a band worse than the worst already alerted in it -> `worsening`;
- open episode and a normal band -> `resolved` (the episode closes; a later drop opens a new one);
- anything else -> no event: never a repeated alert at a band already sent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from enum import StrEnum

from .anc import Anc
from .grading import Band


class EventKind(StrEnum):
    NEW = "new"
    WORSENING = "worsening"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Assessment:
    patient: str
    panel: str  # panel key, unique per patient
    anc: Anc
    band: Band
    effective: str
    effective_us: int


@dataclass(frozen=True, slots=True)
class EpisodeState:
    episode: str | None = None  # id of the open episode
    opened: str | None = None  # collection time of the panel that opened it
    worst: Band | None = None  # worst band alerted in the open episode
    current: Band | None = None  # band of the newest assessment
    newest_us: int | None = None  # collection time of the newest assessment
    last_anc: float | None = None
    last_effective: str | None = None


@dataclass(frozen=True, slots=True)
class AlertEvent:
    kind: EventKind
    patient: str
    episode: str
    band: Band  # new/worsening: the band now; resolved: the band it resolved from
    worst: Band  # worst band alerted in the episode (before this event for `resolved`)
    assessment: Assessment
    opened: str  # collection time of the panel that opened the episode
    previous_anc: float | None
    previous_effective: str | None


def episode_id(patient: str, panel: str) -> str:
    """Deterministic: the same data gives the same id in replay, in the live loop and after a restart."""
    digest = hashlib.sha256(f"{patient}\x1f{panel}".encode()).hexdigest()
    return digest[:32]


def step(state: EpisodeState, a: Assessment) -> tuple[EpisodeState, AlertEvent | None, bool]:
    """Apply one assessment. Returns the new state, the event if any, and whether it was stale."""
    if state.newest_us is not None and a.effective_us < state.newest_us:
        return state, None, True
    moved = replace(
        state, current=a.band, newest_us=a.effective_us, last_anc=a.anc.value, last_effective=a.effective
    )

    def event(kind: EventKind, episode: str, band: Band, worst: Band, opened: str) -> AlertEvent:
        return AlertEvent(kind, a.patient, episode, band, worst, a, opened, state.last_anc, state.last_effective)

    if state.episode is None:
        if a.band.severity is None:
            return moved, None, False
        episode = episode_id(a.patient, a.panel)
        opened = replace(moved, episode=episode, opened=a.effective, worst=a.band)
        return opened, event(EventKind.NEW, episode, a.band, a.band, a.effective), False
    assert state.worst is not None and state.opened is not None
    if a.band.severity is None:
        closed = replace(moved, episode=None, opened=None, worst=None)
        resolved_from = state.current or state.worst
        resolved = event(EventKind.RESOLVED, state.episode, resolved_from, state.worst, state.opened)
        return closed, resolved, False
    if a.band.rank > state.worst.rank:
        worse = replace(moved, worst=a.band)
        return worse, event(EventKind.WORSENING, state.episode, a.band, a.band, state.opened), False
    return moved, None, False
