"""Confirmed resolution, recurrence and episode memory (docs/clinical-reference.md §3 "Resolution and
recurrence"). Each row is a patient's panels (ANC cells/uL, hour of collection) and the events expected.

Defaults and their sources:
- resolution.confirmations 3, min_hours 48: CIBMTR Forms Instruction Manual, "Initial ANC recovery"
  (https://www.cibmtr.org/manuals/fim/1/en/topic/q8-11-initial-anc-recovery): ANC recovery is three
  consecutive laboratory values obtained on different days, drawn more than a day apart when not
  daily; ASTCT consensus (Kharfan-Dabaja et al., Bone Marrow Transplant 2024;59:832): first of 3
  successive days >= 500/uL after the nadir.
- resolution.reopen_days 7: a local choice to validate (reference §3).
- resolution.memory_days 365: "episodes in 12 months", a local choice.
- bands: the default scheme (mild < 1500, moderate < 1000, severe < 500; reference §3).
"""

from __future__ import annotations

from dataclasses import replace

import msgspec
import pytest

from service.config import Settings
from service.core.episodes import AlertEvent, Assessment, PatientState
from service.core.grading import DEFAULT
from service.core.history import apply
from service.core.rules import DAY_US, HOUR_US, Rules
from service.fhir.fhirtime import from_epoch_us
from service.output.events import event_record

DEFAULTS = Rules()
LEGACY = Rules(resolution_confirmations=1, resolution_min_us=0, reopen_us=0, memory_us=0)


def assessment(anc: float, hour: float) -> Assessment:
    us = int(hour * HOUR_US)
    return Assessment(
        "Patient/p",
        f"panel-{hour}",
        float(anc),
        False,
        "reported-absolute",
        None,
        DEFAULT.grade(anc),
        from_epoch_us(us),
        us,
        (f"Observation/{hour}",),
        ("1",),
    )


def label(e: AlertEvent) -> str:
    recovering = f"({e.recovering[0]}/{e.recovering[1]})" if e.recovering else ""
    return f"{e.kind.value}{recovering}:{e.band.label}"


def run(panels: list[tuple[float, float]], rules: Rules) -> tuple[list[str], list[AlertEvent]]:
    ps, out, every = PatientState(), [], []
    for anc, hour in panels:
        ps, events, _ = apply(ps, assessment(anc, hour), rules)
        out.append(",".join(label(e) for e in events) or "-")
        every += events
    return out, every


D = 24  # hours in a day


@pytest.mark.parametrize(
    ("panels", "rules", "expected"),
    [
        # one normal panel: recovering 1 of 3 (CIBMTR: three values on different days), not resolved
        ([(800, 0), (1600, D)], DEFAULTS, ["new:moderate", "recovering(1/3):normal"]),
        # three normal panels a day apart (48 h first to last): resolved, from the grade before them
        (
            [(800, 0), (1600, D), (1700, 2 * D), (1800, 3 * D)],
            DEFAULTS,
            ["new:moderate", "recovering(1/3):normal", "recovering(2/3):normal", "resolved:moderate"],
        ),
        # three normal panels within 48 h do not yet span the time: a fourth, later, resolves
        (
            [(800, 0), (1600, D), (1700, D + 12), (1800, D + 24), (1900, D + 48)],
            DEFAULTS,
            [
                "new:moderate",
                "recovering(1/3):normal",
                "recovering(2/3):normal",
                "recovering(3/3):normal",
                "resolved:moderate",
            ],
        ),
        # a neutropenic panel during recovery: the episode stays open, no new alert at a grade already sent
        (
            [(300, 0), (1550, D), (700, 4 * D)],
            DEFAULTS,
            ["new:severe", "recovering(1/3):normal", "recovering(0/3):moderate"],
        ),
        # ... and a grade worse than announced is a worsening of the same episode
        (
            [(1200, 0), (1550, D), (300, 4 * D)],
            DEFAULTS,
            ["new:mild", "recovering(1/3):normal", "worsening:severe"],
        ),
        # a drop within 7 days of the announced resolution: recurrence of the same episode, grade announced
        (
            [(800, 0), (1600, D), (1700, 2 * D), (1800, 3 * D), (1200, 5 * D)],
            DEFAULTS,
            [
                "new:moderate",
                "recovering(1/3):normal",
                "recovering(2/3):normal",
                "resolved:moderate",
                "recurrence:mild",
            ],
        ),
        # after a recurrence, grades are announced afresh: severe again is a worsening
        (
            [(300, 0), (1600, D), (1700, 2 * D), (1800, 3 * D), (1200, 5 * D), (400, 6 * D)],
            DEFAULTS,
            [
                "new:severe",
                "recovering(1/3):normal",
                "recovering(2/3):normal",
                "resolved:severe",
                "recurrence:mild",
                "worsening:severe",
            ],
        ),
        # a drop more than 7 days after the resolution: a new episode
        (
            [(800, 0), (1600, D), (1700, 2 * D), (1800, 3 * D), (1200, 11 * D)],
            DEFAULTS,
            [
                "new:moderate",
                "recovering(1/3):normal",
                "recovering(2/3):normal",
                "resolved:moderate",
                "new:mild",
            ],
        ),
        # the former rule (confirmations 1, min_hours 0, reopen_days 0): one normal resolves, a drop is new
        ([(800, 0), (1600, D), (1200, 2 * D)], LEGACY, ["new:moderate", "resolved:moderate", "new:mild"]),
        # reopen_days 0 turns recurrence off
        (
            [(800, 0), (1600, D), (1200, 2 * D)],
            replace(LEGACY, memory_us=365 * DAY_US),
            ["new:moderate", "resolved:moderate", "new:mild"],
        ),
    ],
)
def test_resolution_and_recurrence(panels, rules, expected):
    """Resolution needs the configured run of normal panels; a drop soon after re-opens the episode."""
    got, events = run(panels, rules)
    assert got == expected
    episodes = {e.episode for e in events}
    assert len(episodes) == (1 if not any("new" in x for x in expected[1:]) else 2)


def test_recurrence_keeps_the_episode_and_its_chronic_label():
    """A chronic episode (open > 91 days) that resolves and drops again within 7 days comes back
    as the same episode, still chronic (reference §3: brief recoveries no longer lose the label)."""
    panels = [(1200, 0), (1300, 92 * D)]
    panels += [(1600 + i, (93 + i) * D) for i in range(3)]  # resolved on day 95
    panels += [(1200, 97 * D)]
    _, events = run(panels, DEFAULTS)
    kinds = [e.kind.value for e in events]
    assert kinds == ["new", "chronic", "recovering", "recovering", "resolved", "recurrence"]
    assert events[-1].chronic and events[-1].episode == events[0].episode
    assert events[-1].recurred_after == from_epoch_us(95 * DAY_US) and events[-1].opening == 1


def test_episode_memory_counts_episodes_within_a_year():
    """The third episode opened within 365 days says so ("3rd episode in 12 months"); one opened
    more than a year after the others does not."""

    def episode(start: int) -> list[tuple[float, float]]:
        return [(1200, start * D)] + [(1600, (start + i) * D) for i in (1, 2, 3)]

    panels = episode(0) + episode(100) + episode(200) + episode(700)
    _, events = run(panels, DEFAULTS)
    news = [e for e in events if e.kind.value == "new"]
    assert [e.memory for e in news] == [None, (2, 365), (3, 365), None]
    record = event_record(news[2], DEFAULT)
    assert msgspec.to_builtins(record)["episode_memory"] == {"episodes": 3, "days": 365}


def test_recurrence_communication_is_distinct_from_the_first_opening():
    """The worsening after a recurrence gets its own Communication identifier: the same grade was
    announced before the resolution, and a conditional create must not mistake one for the other."""
    from service.output.alerts import build

    panels = [(300, 0), (1600, D), (1700, 2 * D), (1800, 3 * D), (1200, 5 * D), (400, 6 * D)]
    _, events = run(panels, DEFAULTS)
    settings = Settings()
    ids = [build(e, DEFAULT, settings.alerts, sent="2026-01-01T00:00:00Z").provenance_tag[1] for e in events]
    assert len(set(ids)) == len(ids)
    writes = build(events[-2], DEFAULT, settings.alerts, sent="2026-01-01T00:00:00Z")
    assert writes.communication is not None
    assert "Neutropenia recurrence, mild" in writes.communication["payload"][0]["contentString"]
    recovering = build(events[1], DEFAULT, settings.alerts, sent="2026-01-01T00:00:00Z")
    assert recovering.communication is None and recovering.flag["status"] == "active"
    assert "recovering (1 of 3 confirmations)" in recovering.flag["code"]["text"]


def test_settings_map_to_rules():
    """clinical.resolution.* reach the core in the units it uses."""
    s = Settings.model_validate(
        {
            "clinical": {
                "resolution": {"confirmations": 2, "min_hours": 24, "reopen_days": 0, "memory_days": 0}
            }
        }
    )
    assert (
        s.rules.resolution_confirmations,
        s.rules.resolution_min_us,
        s.rules.reopen_us,
        s.rules.memory_us,
    ) == (2, 24 * HOUR_US, 0, 0)
    d = Settings().rules
    assert (d.resolution_confirmations, d.resolution_min_us, d.reopen_us, d.memory_us) == (
        3,
        48 * HOUR_US,
        7 * DAY_US,
        365 * DAY_US,
    )


def test_a_withdrawn_recovery_updates_the_flag_without_a_communication():
    """The normal panel that made the episode `recovering` corrected to a neutropenic value: the
    recovery is withdrawn on the Flag, and no Communication withdraws an update never announced."""
    from service.output.alerts import build

    ps = PatientState()
    for anc, hour in ((300, 0), (1600, D)):
        ps, _, _ = apply(ps, assessment(anc, hour), DEFAULTS)
    ps, events, _ = apply(ps, replace(assessment(700, D), band=DEFAULT.grade(700.0), anc=700.0), DEFAULTS)
    (withdrawn,) = [e for e in events if e.kind.value == "retracted"]
    assert withdrawn.retracted is not None and withdrawn.retracted.kind.value == "recovering"
    writes = build(withdrawn, DEFAULT, Settings().alerts, sent="2026-01-01T00:00:00Z")
    assert writes.communication is None and writes.flag["status"] == "active"


def test_episode_memory_is_in_the_texts():
    """The Flag and the Communication of a third episode within a year say so."""
    from service.output.alerts import build

    panels = [
        p
        for start in (0, 100, 200)
        for p in [(1200, start * D)] + [(1600, (start + i) * D) for i in (1, 2, 3)]
    ]
    _, events = run(panels, DEFAULTS)
    third = [e for e in events if e.kind.value == "new"][2]
    writes = build(third, DEFAULT, Settings().alerts, sent="2026-01-01T00:00:00Z")
    assert writes.communication is not None
    assert "3rd episode in 12 months" in writes.flag["code"]["text"]
    assert "3rd episode in 12 months." in writes.communication["payload"][0]["contentString"]
