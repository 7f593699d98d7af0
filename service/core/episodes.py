"""Per-patient neutropenia episodes, as records: the assessment and the temperature the machine
reads, its state, the events it announces and the announcements it remembers, and what is kept per
patient (reference §3).

The machine is transitions.py; fevers, the febrile rule and the temperature memory are fever.py;
applying an assessment, a withdrawal or a temperature to a patient's history, and revising it, is
history.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from service.core.grading import Band
from service.core.reasons import FebrileRule


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
