"""Episode transitions (issue 2 rules), table-driven: each row is a patient's sequence of panels
(ANC, collection day) and the events expected. Bands: default scheme (see test_grading)."""

import pytest

from service.clinical.anc import Anc
from service.clinical.episodes import Assessment, EpisodeState, step
from service.clinical.grading import DEFAULT


def run(sequence):
    state, out = EpisodeState(), []
    for i, (anc, day) in enumerate(sequence):
        a = Assessment("Patient/p", f"panel{i}", Anc(anc, False, "reported-absolute", (), None), DEFAULT.grade(anc),
                       f"2026-01-{day:02d}", day * 86_400_000_000)
        state, event, stale = step(state, a)
        out.append("stale" if stale else (f"{event.kind.value}:{event.band.label}" if event else "-"))
    return out, state


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        # normal stays quiet
        ([(3000, 1), (2500, 2)], ["-", "-"]),
        # no open episode and grade >= mild -> new
        ([(3000, 1), (1200, 2)], ["-", "new:mild"]),
        # open episode, worse than worst alerted -> worsening; same or better -> nothing
        ([(1200, 1), (800, 2), (900, 3), (300, 4), (450, 5)], ["new:mild", "worsening:moderate", "-", "worsening:severe", "-"]),
        # jump straight to severe, then improve: no repeated alert at a grade already sent
        ([(300, 1), (700, 2), (1200, 3), (400, 4)], ["new:severe", "-", "-", "-"]),
        # resolution at >= 1500 closes the episode with the grade it resolved from; a later drop opens a new one
        ([(800, 1), (1200, 2), (1500, 3), (1400, 4)], ["new:moderate", "-", "resolved:mild", "new:mild"]),
        # a panel collected before the newest assessed one does not open, worsen or resolve
        ([(1200, 5), (300, 3), (2000, 4), (1300, 6)], ["new:mild", "stale", "stale", "-"]),
        # same collection time as the newest is not older: assessed
        ([(1200, 5), (400, 5)], ["new:mild", "worsening:severe"]),
    ],
)
def test_transitions(sequence, expected):
    assert run(sequence)[0] == expected


def test_episode_ids_are_deterministic_and_distinct():
    _, s1 = run([(800, 1)])
    _, s2 = run([(800, 1)])
    _, s3 = run([(800, 2), (1600, 3), (800, 4)])
    assert s1.episode == s2.episode
    assert s3.episode != s1.episode


def test_previous_value_is_carried():
    state, events = EpisodeState(), []
    for i, anc in enumerate([2100, 900]):
        a = Assessment("Patient/p", f"k{i}", Anc(anc, False, "m", (), None), DEFAULT.grade(anc), f"d{i}", i)
        state, event, _ = step(state, a)
        events.append(event)
    assert (events[1].previous_anc, events[1].previous_effective) == (2100, "d0")
