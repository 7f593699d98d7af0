"""Febrile neutropenia (issue 4). Sources of the expected values:
- fever: IDSA 2010 (Freifeld, CID 2011;52:e56) and ASCO/IDSA 2018 (Taplitz, JCO 36:1443): a single
  oral temperature >= 38.3 C (101 F), or >= 38.0 C (100.4 F) sustained over 1 h (reference §3);
- neutropenia: ANC < 500, or expected to fall below 500 within 48 h (IDSA 2010); the proxy for
  "expected to fall" — a fall of >= 50 % from the previous value within 48 h — is the issue's
  configurable default, not a guideline value;
- the fever must lie within 24 h of the ANC (issue 4 default window)."""

from __future__ import annotations

import pytest

from service.clinical.episodes import PatientState
from service.clinical.panels import decide
from service.clinical.rules import Rules
from tests.builders import observation, result

RULES = Rules()
T0 = 10  # day of the first panel in each scenario


def at(day: int, minutes: int = 0) -> str:
    """08:00 on day `day` counted from 1 February, plus `minutes` (which may be negative)."""
    from datetime import UTC, datetime, timedelta

    t = datetime(2026, 2, 1, 8, tzinfo=UTC) + timedelta(days=day - 1, minutes=minutes)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def cbc(anc_k: float, day: int, minutes: int = 0):
    kw = dict(patient="Patient/f", effective=at(day, minutes), specimen=f"Specimen/{day}-{minutes}")
    return ("cbc", f"{day}-{minutes}", [result(observation("6690-2", 3.0, id=f"w{day}-{minutes}", **kw)),
                                       result(observation("751-8", anc_k, id=f"a{day}-{minutes}", **kw))])


def temp(value: float, day: int, minutes: int = 0, unit: str = "Cel"):
    obs = observation("8310-5", value, unit, id=f"t{day}-{minutes}-{value}", patient="Patient/f", effective=at(day, minutes), specimen=None)
    return ("temp", f"t{day}-{minutes}", [result(obs)])


def events_of(items) -> list[str]:
    state, out = PatientState(), []
    for _, panel, results in items:
        d = decide(state, "Patient/f", panel, results, RULES)
        state = d.state
        out.extend(e.kind.value for e in d.events)
    return out


@pytest.mark.parametrize(
    ("items", "febrile"),
    [
        ([cbc(0.4, T0), temp(38.3, T0, 120)], True),  # single reading >= 38.3
        ([cbc(0.4, T0), temp(38.2, T0, 120)], False),  # single reading below 38.3, not sustained
        ([cbc(0.4, T0), temp(38.0, T0, 60), temp(38.1, T0, 120)], True),  # >= 38.0 over 1 h
        ([cbc(0.4, T0), temp(38.0, T0, 60), temp(37.6, T0, 90), temp(38.0, T0, 120)], False),  # a reading below in between
        ([cbc(0.4, T0), temp(38.0, T0, 60), temp(38.1, T0, 110)], False),  # spans only 50 min
        ([cbc(1.9, T0 - 1), cbc(0.8, T0), temp(38.5, T0, 60)], True),  # ANC < 1000, fell >= 50 % within 48 h
        ([cbc(1.2, T0 - 1), cbc(0.8, T0), temp(38.5, T0, 60)], False),  # fell only 33 %
        ([cbc(1.9, T0 - 3), cbc(0.8, T0), temp(38.5, T0, 60)], False),  # the fall took 72 h
        ([temp(38.6, T0 - 2), cbc(0.4, T0)], False),  # fever 48 h before the ANC: outside 24 h
        ([temp(38.6, T0, -600), cbc(0.4, T0)], True),  # fever 10 h before the ANC (arrived first)
        ([cbc(1.2, T0), temp(39.0, T0, 60)], False),  # mild neutropenia: not febrile neutropenia
        ([cbc(0.4, T0), temp(101.0, T0, 60, "[degF]")], True),  # 101 F = 38.3 C
        ([cbc(0.4, T0), temp(100.4, T0, 60, "[degF]"), temp(100.5, T0, 130, "[degF]")], True),  # 100.4 F = 38.0 C, sustained
    ],
)
def test_febrile_rule(items, febrile):
    assert ("febrile" in events_of(items)) is febrile


def test_celsius_and_fahrenheit_give_the_same_decision():
    c = events_of([cbc(0.45, T0), temp(38.4, T0, 90)])
    f = events_of([cbc(0.45, T0), temp(101.12, T0, 90, "[degF]")])
    assert c == f == ["new", "febrile"]


def test_febrile_once_per_episode_and_again_in_a_new_episode():
    items = [cbc(0.4, T0), temp(38.5, T0, 60), temp(38.9, T0, 300), cbc(0.3, T0 + 1), temp(39.0, T0 + 1, 60),
             cbc(2.0, T0 + 8), cbc(0.3, T0 + 20), temp(38.6, T0 + 20, 60)]
    assert events_of(items) == ["new", "febrile", "resolved", "new", "febrile"]


def test_febrile_event_carries_the_fever_and_is_stat():
    from service.alerts import build
    from service.config import AlertSettings

    state = PatientState()
    for _, panel, results in [cbc(0.4, T0), temp(38.7, T0, 45)]:
        d = decide(state, "Patient/f", panel, results, RULES)
        state = d.state
    (event,) = d.events
    assert event.fever.celsius == 38.7 and event.febrile
    writes = build(event, RULES.scheme, AlertSettings(), sent="2026-02-10T09:00:00Z")
    assert writes.communication["priority"] == "stat"
    assert writes.flag["code"]["coding"][0]["code"] == "409089005"  # Febrile neutropenia (disorder)
    assert "38.7 °C" in writes.communication["payload"][0]["contentString"]
