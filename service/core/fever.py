"""Fever and febrile neutropenia: the readings at which a fever is established, whether a fever and
the open episode's newest ANC make a febrile neutropenia (IDSA 2010, ASCO/IDSA 2018; rules.py),
what the fever rule made of a panel's readings, and which readings a patient's memory keeps.

The temperature memory is bounded so that the arrival order never decides what is forgotten:
readings are remembered by COLLECTION time (`remembered_temperatures`): every reading from the
oldest remembered assessment (or the newest panel, if older) less the fever window and the
sustained-fever span on — readings collected after the newest panel included, since they may pair
with a CBC not read yet — plus the last reading before that (it carries a sustained run under way).
Panels collected earlier are stale or can no longer be revised, so within that horizon a panel still
to be judged finds exactly the fevers of the whole record, whatever order the readings came in (a
reading collected days later and read first used to evict the fever beside an earlier draw when
memory followed the newest reading seen, and a correction days later retracted a febrile alert for
want of its fever). Over rules.temperature_memory_cap the earliest collected go first.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from service.core.episodes import EpisodeState, PatientState, Temperature
from service.core.reasons import AncRule, FebrileRule, FeverConsidered, FeverRule, NotFebrile
from service.core.rules import Rules


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


def febrile_fever(
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
    return remembered_in_order(sorted(readings, key=collection_order), horizon_us, rules)


def remembered_in_order(
    ordered: Sequence[Temperature], horizon_us: int | None, rules: Rules
) -> tuple[Temperature, ...]:
    """`remembered_temperatures` of readings already in collection order."""
    start = 0
    if horizon_us is not None:
        start = max(bisect_left(ordered, (horizon_us, ""), key=collection_order) - 1, 0)
    start = max(start, len(ordered) - rules.temperature_memory_cap)
    return ordered[start:] if isinstance(ordered, tuple) else tuple(ordered[start:])


def collection_order(t: Temperature) -> tuple[int, str]:
    """The order the memory keeps: collection time, then reference."""
    return t.effective_us, t.ref
