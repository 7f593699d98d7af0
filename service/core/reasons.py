"""Why the core decided what it decided, as data: which febrile criteria fired, why a panel raised
no event, what became of the fevers a panel brought. Carried on the decisions (`AlertEvent`,
`PanelDecision`) where the rules are applied, so a reader (`explain`) renders them instead of
deriving the rules again. Plain values only: no logic here.

The rules these name are those of transitions.py and fever.py (reference §3; fever and febrile
neutropenia: IDSA 2010, ASCO/IDSA 2018, thresholds in rules.py)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FeverRule(StrEnum):
    """How a fever was established."""

    SINGLE = "single"  # one reading >= fever_single_c
    SUSTAINED = "sustained"  # readings >= fever_sustained_c, none below in between, over fever_sustained_us


class AncRule(StrEnum):
    """Which ANC criterion made a fever a febrile neutropenia."""

    BELOW = "below"  # ANC < febrile_anc_below
    FALLING = "falling"  # ANC < febrile_falling_anc_below that fell by febrile_fall_fraction in the window


@dataclass(frozen=True, slots=True)
class FebrileRule:
    """The criteria behind a `febrile` event."""

    fever: FeverRule
    anc: AncRule


class NoEvent(StrEnum):
    """Why an assessed panel announced nothing of its own."""

    STALE = "stale"  # collected before the newest panel assessed: remembered, it moves no episode
    NOT_NEUTROPENIC = "not neutropenic"  # a normal band and no open episode
    NOT_WORSE = "not worse"  # an open episode, and no worse than its worst alerted band
    REVISION_UNCHANGED = "revision unchanged"  # re-assessed: the revised history changes no announcement
    NO_ANC = "no anc"  # the panel holds no final neutrophil result


class NotFebrile(StrEnum):
    """Why a fever made no febrile neutropenia."""

    NO_EPISODE = "no open episode"
    ALREADY_FEBRILE = "already febrile"  # once per episode
    ANC_NOT_LOW = "anc not low"  # the newest ANC is neither low enough nor falling fast enough
    TOO_FAR = "too far"  # collected more than fever_window_us from the newest ANC


@dataclass(frozen=True, slots=True)
class FeverConsidered:
    """The body temperatures of a panel, as the fever rule judged them."""

    fever: FeverRule | None  # the strongest fever among the readings; None: none is a fever
    high: bool = False  # no fever, but a reading >= fever_sustained_c (a sustained run may follow)
    febrile: bool = False  # the panel's decision announced a febrile neutropenia
    not_febrile: NotFebrile | None = None  # a fever without a febrile event: why
    newest_anc: float | None = None  # for ANC_NOT_LOW: the ANC it was judged against (cells/uL)
