"""Episodes: transitions, chronicity and revision on corrections.
Each row is a patient's sequence of panels and the events expected. Bands: the default scheme
(test_grading); chronic: > 3 months (a local default)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from service.core.episodes import Assessment, EventKind, PatientState
from service.core.grading import DEFAULT
from service.core.history import apply, withdraw
from service.core.panels import decide
from service.core.reasons import NoEvent
from service.core.rules import DAY_US, Rules
from service.core.transitions import step
from tests.builders import normalised, observation, result

# One normal panel resolves (resolution.confirmations 1, min_hours 0, reopen_days 0, memory off):
# the rows here test the transitions, fever and revision; confirmed resolution and recurrence are
# tested in test_resolution.py.
RULES = Rules(resolution_confirmations=1, resolution_min_us=0, reopen_us=0, memory_us=0)


def assessment(anc: float, day: int, panel: str | None = None, version: str = "1") -> Assessment:
    return Assessment(
        "Patient/p",
        panel or f"panel-day{day}",
        anc,
        False,
        "reported-absolute",
        None,
        DEFAULT.grade(anc),
        f"2026-01-01+{day}d",
        day * DAY_US,
        (f"Observation/{panel or day}",),
        (version,),
    )


def label(e) -> str:
    return f"{e.kind.value}:{e.band.label}"


def run(sequence):
    """sequence of (anc, day) first assessments, or ('fix', day, anc) corrections, ('withdraw', day)."""
    ps, out = PatientState(), []
    for item in sequence:
        if item[0] == "fix":
            _, day, anc = item
            ps, events, _ = apply(ps, assessment(anc, day, version="2"), RULES)
        elif item[0] == "withdraw":
            ps, events = withdraw(ps, "Patient/p", f"panel-day{item[1]}", RULES, reason="entered-in-error")
        else:
            anc, day, *panel = item
            ps, events, stale = apply(ps, assessment(anc, day, *panel), RULES)
            if stale:
                out.append("stale")
                continue
        out.append(",".join(label(e) for e in events) or "-")
    return out, ps


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        # normal stays quiet
        ([(3000, 1), (2500, 2)], ["-", "-"]),
        # no open episode and grade >= mild -> new
        ([(3000, 1), (1200, 2)], ["-", "new:mild"]),
        # open episode, worse than worst alerted -> worsening; same or better -> nothing
        (
            [(1200, 1), (800, 2), (900, 3), (300, 4), (450, 5)],
            ["new:mild", "worsening:moderate", "-", "worsening:severe", "-"],
        ),
        # straight to severe, then improving: no repeated alert at a grade already sent
        ([(300, 1), (700, 2), (1200, 3), (400, 4)], ["new:severe", "-", "-", "-"]),
        # >= 1500 resolves with the grade it resolved from; a later drop opens a new episode
        ([(800, 1), (1200, 2), (1500, 3), (1400, 4)], ["new:moderate", "-", "resolved:mild", "new:mild"]),
        # a panel collected before the newest assessed one changes nothing
        ([(1200, 5), (300, 3), (2000, 4), (1300, 6)], ["new:mild", "stale", "stale", "-"]),
        # the same collection time as the newest is not older (a second specimen drawn at once)
        ([(1200, 5), (400, 5, "second-specimen")], ["new:mild", "worsening:severe"]),
        # chronic: open more than 3 months (91 days) -> once, alongside nothing else
        ([(1200, 1), (1300, 60), (1250, 93), (1100, 120)], ["new:mild", "-", "chronic:mild", "-"]),
        # a worsening on the day it becomes chronic carries both events
        ([(1200, 1), (700, 95)], ["new:mild", "worsening:moderate,chronic:moderate"]),
        # --- corrections ---
        # the only severe value corrected to normal: the alert is withdrawn
        ([(400, 1), ("fix", 1, 1800)], ["new:severe", "retracted:severe"]),
        # a worsening corrected away: the worsening is withdrawn, the episode stays
        ([(1200, 1), (300, 2), ("fix", 2, 1100)], ["new:mild", "worsening:severe", "retracted:severe"]),
        # a normal value corrected to severe: a (corrected) new episode
        ([(1800, 1), ("fix", 1, 400)], ["-", "new:severe"]),
        # a correction that keeps the band changes nothing
        ([(400, 1), ("fix", 1, 350)], ["new:severe", "-"]),
        # the resolving value corrected to moderate: resolution withdrawn (episode open again)
        # (a resolution is labelled with the grade it resolved from: 800 was moderate)
        ([(800, 1), (1700, 3), ("fix", 3, 900)], ["new:moderate", "resolved:moderate", "retracted:moderate"]),
        # entered-in-error removes the value and what rested on it
        ([(1200, 1), (300, 2), ("withdraw", 2)], ["new:mild", "worsening:severe", "retracted:severe"]),
        ([(400, 1), ("withdraw", 1)], ["new:severe", "retracted:severe"]),
        # withdrawing a value that alerted nothing says nothing
        ([(1200, 1), (1300, 2), ("withdraw", 2)], ["new:mild", "-", "-"]),
        # moderate -> corrected to severe: the new at moderate is withdrawn, a corrected new at severe is sent
        ([(800, 1), ("fix", 1, 300)], ["new:moderate", "retracted:moderate,new:severe"]),
    ],
)
def test_sequences(sequence, expected):
    got, _ = run(sequence)
    assert got == expected


def test_retraction_says_what_remains():
    _, ps = run([(400, 1)])
    ps2, events = withdraw(ps, "Patient/p", "panel-day1", RULES, reason="entered-in-error")
    (e,) = events
    assert e.worst is None and not e.episode_open  # no episode remains: its Flag -> entered-in-error
    assert e.retracted.anc == 400 and e.reason == "entered-in-error" and e.revision == 1
    assert ps2.machine.episode is None and ps2.alerted == ()

    _, ps = run([(1200, 1), (300, 2)])
    _, events = withdraw(ps, "Patient/p", "panel-day2", RULES, reason="entered-in-error")
    (e,) = events
    assert e.worst.label == "mild" and e.episode_open  # the episode stays, back to its mild worst


def test_flip_flop_corrections_reannounce_with_new_identity():
    """400 -> corrected 1800 -> corrected again 400: the second 'new' is a new announcement (its
    revision differs), so a conditional create on its identifier cannot swallow it."""
    ps, events, _ = apply(PatientState(), assessment(400, 1), RULES)
    ps, events2, _ = apply(ps, assessment(1800, 1, version="2"), RULES)
    ps, events3, _ = apply(ps, assessment(400, 1, version="3"), RULES)
    assert [label(e) for e in events3] == ["new:severe"]
    assert (events[0].revision, events2[0].revision, events3[0].revision) == (0, 1, 2)


def test_history_is_bounded_and_old_panels_fall_back_to_the_base():
    ps = PatientState()
    small = replace(RULES, history_limit=10)
    for day in range(1, 60):
        ps, _, _ = apply(ps, assessment(1200 if day < 30 else 2000, day), small)
    assert len(ps.history) == 10 and len(ps.alerted) <= 10
    assert ps.base.newest_us is not None  # what fell out is folded into the base state
    # correcting a panel that fell out of the history does nothing (documented limit)
    ps2, events, _ = apply(ps, assessment(300, 2, version="2"), small)
    assert events == [] or all(e.kind.value != "retracted" for e in events)


def test_step_is_what_apply_does_for_first_assessments():
    state, events, _ = step(replace(PatientState().machine), assessment(800, 1), RULES)
    assert [label(e) for e in events] == ["new:moderate"] and state.episode


def test_late_old_panels_do_not_push_the_newest_out_of_the_history():
    """A back-load of panels collected earlier (stale: they judge nothing) arriving after the newest
    panel must not push that panel out of the bounded history: its correction is then still a
    revision (`retracted`), not a new panel judged on its own (`resolved`)."""
    small = replace(RULES, history_limit=3)
    ps, events, _ = apply(PatientState(), assessment(400, 10), small)
    assert [label(e) for e in events] == ["new:severe"]
    for day in (1, 2, 3):  # collected before day 10, arriving after it
        ps, events, stale = apply(ps, assessment(2000, day), small)
        assert stale and events == []
    assert len(ps.history) == 3 and any(h.panel == "panel-day10" for h in ps.history)
    ps, events, _ = apply(ps, assessment(1800, 10, version="2"), small)
    assert [label(e) for e in events] == ["retracted:severe"]
    assert ps.machine.episode is None and ps.alerted == ()


def test_history_trimmed_by_stale_panels_decides_as_the_whole_history():
    """Whatever goes out of the bounded history, the machine is the fold of `base` over what is kept
    (the invariant a revision relies on), for arrivals mixing late old panels and new ones."""
    from service.core.transitions import fold

    small = replace(RULES, history_limit=4)
    ps = PatientState()
    for anc, day in [
        (1200, 10),
        (300, 12),
        (2000, 3),
        (900, 14),
        (2500, 1),
        (400, 16),
        (1700, 2),
        (1600, 18),
        (800, 5),
        (700, 20),
    ]:
        ps, _, _ = apply(ps, assessment(anc, day), small)
        assert len(ps.history) <= 4
        machine, _ = fold(ps.base, ps.history, small, ps.temperatures)
        assert machine == ps.machine


# -- why a panel announced nothing, as data (service/core/reasons.py) ----------------------------------------


def cbc(anc_k: float | None, day: int, *, version: str = "1", status: str = "final"):
    """(panel, results): a WBC and an ANC (none when `anc_k` is None: a panel without one, or with
    `status` "entered-in-error" the ANC withdrawn) collected on 2026-01-`day`."""
    kw = dict(patient="Patient/p", effective=f"2026-01-{day:02d}T08:00:00Z", specimen=f"Specimen/{day}")
    results = [result(observation("6690-2", 4.0, id=f"w{day}", **kw))]
    if anc_k is not None:
        anc = observation("751-8", anc_k, id=f"a{day}", version=version, status=status, **kw)
        results.append(result(anc))
    elif status != "final":
        withdrawn = observation("751-8", None, id=f"a{day}", version=version, status=status, **kw)
        results.append(normalised(withdrawn))
    return f"day{day}", results


def decisions(panels) -> list:
    state, out = PatientState(), []
    for panel, results in panels:
        d = decide(state, "Patient/p", panel, results, RULES)
        state = d.state
        out.append(d)
    return out


@pytest.mark.parametrize(
    ("panels", "no_event", "revised_from", "withdrawn"),
    [
        # ANC 3000 >= 1500: normal, and no open episode (reference §3, default scheme)
        ([cbc(3.0, 1)], NoEvent.NOT_NEUTROPENIC, None, False),
        # 900 after 800: moderate again, never a repeated alert
        ([cbc(0.8, 1), cbc(0.9, 2)], NoEvent.NOT_WORSE, None, False),
        # collected before the newest panel assessed
        ([cbc(0.8, 5), cbc(0.3, 3)], NoEvent.STALE, None, False),
        # no neutrophil result in the panel
        ([cbc(None, 1)], NoEvent.NO_ANC, None, False),
        # a corrected value in the same band: re-assessed, the revised history announces nothing new
        (
            [cbc(0.8, 1), cbc(0.9, 1, version="2", status="corrected")],
            NoEvent.REVISION_UNCHANGED,
            "moderate",
            False,
        ),
        # a stale panel corrected into another band (severe -> moderate): the revised history still
        # finds it stale, so no announcement changes
        (
            [cbc(0.8, 5), cbc(0.3, 3), cbc(0.9, 3, version="2", status="corrected")],
            NoEvent.REVISION_UNCHANGED,
            "severe",
            False,
        ),
        # the first panel opens an episode: an event, so no reason for silence
        ([cbc(0.3, 1)], None, None, False),
        # an ANC entered in error: the panel leaves the history, what rested on it is withdrawn
        ([cbc(0.3, 1), cbc(None, 1, version="2", status="entered-in-error")], None, None, True),
    ],
)
def test_a_panel_decision_says_why_it_announced_nothing(panels, no_event, revised_from, withdrawn):
    """The panel's decision carries why it raised no event (stale, not neutropenic, not worse than
    the worst alerted, a revision that changed nothing, no ANC), the band a re-assessed panel had
    before, and whether the panel left the history."""
    d = decisions(panels)[-1]
    assert d.no_event is no_event
    assert (d.revised_from.label if d.revised_from else None) == revised_from
    assert d.withdrawn is withdrawn
    if withdrawn:
        assert [e.kind for e in d.events] == [EventKind.RETRACTED]
