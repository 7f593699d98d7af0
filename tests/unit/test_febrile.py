"""Febrile neutropenia. Sources of the expected values:
- fever: IDSA 2010 (Freifeld, CID 2011;52:e56) and ASCO/IDSA 2018 (Taplitz, JCO 36:1443): a single
  oral temperature >= 38.3 C (101 F), or >= 38.0 C (100.4 F) sustained over 1 h (reference §3);
- neutropenia: ANC < 500, or expected to fall below 500 within 48 h (IDSA 2010); the proxy for
  "expected to fall" — a fall of >= 50 % from the previous value within 48 h — is a
  configurable default, not a guideline value;
- the fever must lie within 24 h of the ANC (default window)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.episodes import EventKind, PatientState
from service.core.panels import decide
from service.core.reasons import AncRule, FebrileRule, FeverConsidered, FeverRule, NotFebrile
from service.core.rules import Rules
from tests.builders import observation, result
from tests.unit.test_replay import replay, write_ndjson

# One normal panel resolves (resolution.confirmations 1, min_hours 0, reopen_days 0, memory off):
# the rows here test the transitions, fever and revision; confirmed resolution and recurrence are
# tested in test_resolution.py.
RULES = Rules(resolution_confirmations=1, resolution_min_us=0, reopen_us=0, memory_us=0)
T0 = 10  # day of the first panel in each scenario


def at(day: int, minutes: int = 0) -> str:
    """08:00 on day `day` counted from 1 February, plus `minutes` (which may be negative)."""
    from datetime import UTC, datetime, timedelta

    t = datetime(2026, 2, 1, 8, tzinfo=UTC) + timedelta(days=day - 1, minutes=minutes)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def cbc(anc_k: float, day: int, minutes: int = 0):
    kw = dict(patient="Patient/f", effective=at(day, minutes), specimen=f"Specimen/{day}-{minutes}")
    return (
        "cbc",
        f"{day}-{minutes}",
        [
            result(observation("6690-2", 3.0, id=f"w{day}-{minutes}", **kw)),
            result(observation("751-8", anc_k, id=f"a{day}-{minutes}", **kw)),
        ],
    )


def temp(value: float, day: int, minutes: int = 0, unit: str = "Cel"):
    obs = observation(
        "8310-5",
        value,
        unit,
        id=f"t{day}-{minutes}-{value}",
        patient="Patient/f",
        effective=at(day, minutes),
        specimen=None,
    )
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
        (
            [cbc(0.4, T0), temp(38.0, T0, 60), temp(37.6, T0, 90), temp(38.0, T0, 120)],
            False,
        ),  # a reading below in between
        ([cbc(0.4, T0), temp(38.0, T0, 60), temp(38.1, T0, 110)], False),  # spans only 50 min
        ([cbc(1.9, T0 - 1), cbc(0.8, T0), temp(38.5, T0, 60)], True),  # ANC < 1000, fell >= 50 % within 48 h
        ([cbc(1.2, T0 - 1), cbc(0.8, T0), temp(38.5, T0, 60)], False),  # fell only 33 %
        ([cbc(1.9, T0 - 3), cbc(0.8, T0), temp(38.5, T0, 60)], False),  # the fall took 72 h
        ([temp(38.6, T0 - 2), cbc(0.4, T0)], False),  # fever 48 h before the ANC: outside 24 h
        ([temp(38.6, T0, -600), cbc(0.4, T0)], True),  # fever 10 h before the ANC (arrived first)
        ([cbc(1.2, T0), temp(39.0, T0, 60)], False),  # mild neutropenia: not febrile neutropenia
        ([cbc(0.4, T0), temp(101.0, T0, 60, "[degF]")], True),  # 101 F = 38.3 C
        (
            [cbc(0.4, T0), temp(100.4, T0, 60, "[degF]"), temp(100.5, T0, 130, "[degF]")],
            True,
        ),  # 100.4 F = 38.0 C, sustained
    ],
)
def test_febrile_rule(items, febrile):
    assert ("febrile" in events_of(items)) is febrile


def test_celsius_and_fahrenheit_give_the_same_decision():
    c = events_of([cbc(0.45, T0), temp(38.4, T0, 90)])
    f = events_of([cbc(0.45, T0), temp(101.12, T0, 90, "[degF]")])
    assert c == f == ["new", "febrile"]


def test_febrile_once_per_episode_and_again_in_a_new_episode():
    items = [
        cbc(0.4, T0),
        temp(38.5, T0, 60),
        temp(38.9, T0, 300),
        cbc(0.3, T0 + 1),
        temp(39.0, T0 + 1, 60),
        cbc(2.0, T0 + 8),
        cbc(0.3, T0 + 20),
        temp(38.6, T0 + 20, 60),
    ]
    assert events_of(items) == ["new", "febrile", "resolved", "new", "febrile"]


def test_febrile_event_carries_the_fever_and_is_stat():
    from service.config import AlertSettings
    from service.output.alerts import build

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


# -- temperature memory: by collection time, never by arrival ---------------------------------------

DRAW = "2026-03-02T07:30:00Z"  # a severe ANC drawn 07:30, resulted 09:00


def late_reading_case(later_updated: str) -> list[dict]:
    """The severe CBC, the fever beside it (38.8 °C at 08:00, IDSA 2010: >= 38.3 single reading) and
    a normal reading collected four days later whose meta.lastUpdated is `later_updated`."""
    kw = dict(
        patient="Patient/late", effective=DRAW, updated="2026-03-02T09:00:00Z", specimen="Specimen/late-1"
    )
    temp_kw = dict(patient="Patient/late", specimen=None, category=[{"coding": [{"code": "vital-signs"}]}])
    return [
        observation(
            "8310-5",
            38.8,
            "Cel",
            id="late-fever",
            effective="2026-03-02T08:00:00Z",
            updated="2026-03-02T08:05:00Z",
            **temp_kw,
        ),
        observation(
            "8310-5",
            36.8,
            "Cel",
            id="late-normal",
            effective="2026-03-06T08:00:00Z",
            updated=later_updated,
            **temp_kw,
        ),
        observation("6690-2", 2.0, id="late-wbc", **kw),
        observation("751-8", 0.3, id="late-anc", **kw),
    ]


@pytest.mark.parametrize("later_updated", ["2026-03-02T08:10:00Z", "2026-03-02T09:30:00Z"])
def test_a_reading_collected_days_later_and_read_before_the_cbc_keeps_the_fever(tmp_path, later_updated):
    """The fever beside a draw is remembered whatever was collected later: a 36.8 °C reading collected
    four days later and read BEFORE the CBC (lastUpdated 08:10 < 09:00) used to evict the 38.8 °C
    reading (memory kept 72 h behind the newest reading seen), so the febrile alert was never sent;
    read after the CBC it was. Both orders give the same `febrile` event, with the 08:00 fever."""

    events, alerts = replay(tmp_path, write_ndjson(tmp_path / "in.ndjson", late_reading_case(later_updated)))
    # Replay orders arrivals by meta.lastUpdated, so these stamps lie before the later reading's own
    # collection time: an impossible time, now rejected on its own (reference §8). The memory fix
    # itself is shown through `decide` in every arrival order below, and live.
    rejected = [e for e in events if e["event"] == "rejected"]
    assert [e["reason"] for e in rejected] == ["collection time later than the result was recorded"]
    events = [e for e in events if e["event"] != "rejected"]
    assert [e["event"] for e in events] == ["new", "febrile"]
    assert events[1]["temperature"] == {
        "celsius": 38.8,
        "effective": "2026-03-02T08:00:00Z",
        "observation": "Observation/late-fever",
    }
    assert events[1]["observations"][0] == "Observation/late-anc"
    assert [c["priority"] for c in alerts if c["resourceType"] == "Communication"][-1] == "stat"


def test_the_same_case_through_decide_in_every_arrival_order():
    """The same readings through `decide` directly, every one of the 6 arrival orders of the two
    readings and the CBC: one `febrile` event beside the CBC, with the 08:00 fever."""
    from itertools import permutations

    items = [
        ("cbc", "specimen:late-1", [result(o) for o in late_reading_case("2026-03-02T08:10:00Z")[2:]]),
        ("temp", "t1", [result(late_reading_case("x")[0])]),
        ("temp", "t2", [result(late_reading_case("x")[1])]),
    ]
    for order in permutations(items):
        state, febrile = PatientState(), []
        for _, panel, results in order:
            d = decide(state, "Patient/late", panel, results, RULES)
            state = d.state
            febrile += [(e.assessment.panel, e.fever.ref) for e in d.events if e.kind.value == "febrile"]
        assert febrile == [("specimen:late-1", "Observation/late-fever")], [p for _, p, _ in order]


def reading(minutes: int, celsius: float, ref: str | None = None):
    from service.core.episodes import Temperature

    return Temperature(ref or f"Observation/t{minutes}", at(T0, minutes), at_us(T0, minutes), celsius)


def at_us(day: int, minutes: int = 0) -> int:
    from service.fhir.fhirtime import to_epoch_us

    return to_epoch_us(at(day, minutes))


H = 60  # minutes


@pytest.mark.parametrize(
    ("readings", "horizon", "kept"),
    [
        # no assessment yet (no horizon): everything is kept, in collection order
        ([(0, 36.5), (H, 36.6), (2 * H, 38.4), (3 * H, 36.9)], None, [0, H, 2 * H, 3 * H]),
        # before the horizon only the last reading stays (it carries a >= 38.0 run under way)
        ([(-48 * H, 38.6), (-30 * H, 38.0), (-26 * H, 38.1), (0, 36.5)], -27 * H, [-30 * H, -26 * H, 0]),
        # collected days after everything else: kept (it may pair with a CBC not read yet)
        ([(0, 36.5), (96 * H, 36.8), (97 * H, 39.0)], 0, [0, 96 * H, 97 * H]),
        # a reading below 38.0 between others below 38.0 is kept too: a reading >= 38.0 arriving later
        # on either side of it is separated by it alone
        ([(0, 36.5), (H, 36.6), (2 * H, 36.7)], 0, [0, H, 2 * H]),
    ],
)
def test_temperature_memory_by_collection_time(readings, horizon, kept):
    """What the memory keeps, by collection time (never by arrival); the fever thresholds are IDSA
    2010 (Freifeld, CID 2011;52:e56): >= 38.3 °C once, >= 38.0 °C over 1 h."""
    from service.core.fever import remembered_temperatures

    got = remembered_temperatures(
        [reading(m, c) for m, c in reversed(readings)], None if horizon is None else at_us(T0, horizon), RULES
    )
    assert [t.effective_us for t in got] == [at_us(T0, m) for m in kept]


def test_thousands_of_readings_stay_bounded():
    """A patient with thousands of readings does not grow state without limit: over the cap the
    earliest collected go first, whatever order they arrived in."""
    import random

    from service.core.fever import remembered_temperatures

    readings = [reading(15 * i, 38.4 if i % 3 else 36.5) for i in range(5000)]
    memory: tuple = ()
    for t in random.Random(7).sample(readings, len(readings)):
        memory = remembered_temperatures((*memory, t), None, RULES)
    assert memory == tuple(readings[-RULES.temperature_memory_cap :])


VALUES = (
    35.8,
    36.6,
    37.4,
    37.9,
    38.0,
    38.1,
    38.2,
    38.3,
    38.9,
    40.1,
)  # either side of 38.0 and 38.3 (IDSA 2010)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_memory_finds_the_fevers_of_the_whole_record(data):
    """Whatever the arrival order and the horizon, the remembered readings make the same fevers as
    every reading ever received, for every reading collected from horizon + the sustained span on
    (the earliest fever a panel that may yet be judged can use)."""
    from service.core.fever import fevers, remembered_temperatures

    n = data.draw(st.integers(1, 40))
    readings = [
        reading(data.draw(st.integers(-72, 72)) * 10, data.draw(st.sampled_from(VALUES)), f"Observation/r{i}")
        for i in range(n)
    ]
    horizon = data.draw(st.one_of(st.none(), st.integers(-72, 72).map(lambda m: at_us(T0, m * 10))))
    memory: tuple = ()
    for t in data.draw(st.permutations(readings)):
        memory = remembered_temperatures((*memory, t), horizon, RULES)
    from_us = -(2**62) if horizon is None else horizon + RULES.fever_sustained_us
    whole = [
        t.ref
        for t in fevers(sorted(readings, key=lambda x: (x.effective_us, x.ref)), RULES)
        if t.effective_us >= from_us
    ]
    assert [t.ref for t in fevers(memory, RULES) if t.effective_us >= from_us] == whole


# -- arrival order: the same febrile events whatever order the readings and the CBC arrive in --------

LOWS = (35.6, 36.4, 36.8, 37.2, 37.9)  # below 38.0: no fever, alone or sustained (IDSA 2010)
HIGHS = (38.3, 38.8, 40.1)  # >= 38.3: a fever on its own (IDSA 2010)
DAY_MIN = 24 * 60  # the fever window (default: 24 h either side of the ANC)


@st.composite
def arrivals(draw):
    """A CBC drawn at 07:30 and perhaps a second one 6 h to 3 days later (still neutropenic: the
    episode stays open), readings below 38.0 anywhere within 6 days, fevers only further than the
    24 h window from both draws and at most one fever inside a window (so which fever the event
    names does not depend on which arrived first), all in one arrival order, the CBCs in their
    collection order. Returns (arrivals, the febrile events expected: (ANC reference, fever))."""
    minutes = st.integers(-6 * DAY_MIN // 10, 6 * DAY_MIN // 10).map(lambda m: m * 10)
    second = draw(st.one_of(st.none(), st.integers(36, 432).map(lambda m: m * 10)))  # minutes after the first
    ancs = (draw(st.sampled_from((0.3, 0.45, 1.2, 2.0))), draw(st.sampled_from((0.3, 0.45, 0.9, 1.2))))
    draws = [0] if second is None else [0, second]
    outside = lambda m: all(abs(m - d) > DAY_MIN for d in draws)  # noqa: E731 - a one-line local helper
    lows = draw(st.lists(st.tuples(minutes, st.sampled_from(LOWS)), max_size=70))
    far = draw(st.lists(st.tuples(minutes.filter(outside), st.sampled_from(HIGHS)), max_size=8))
    near = draw(
        st.lists(st.tuples(st.integers(-DAY_MIN, draws[-1] + DAY_MIN), st.sampled_from(HIGHS)), max_size=1)
    )
    readings = dict([*lows, *far])  # one reading per instant: each is its own panel
    if near:
        readings[near[0][0]] = near[0][1]
    pid = "Patient/order"
    cbcs = []
    for n, (offset, anc_k) in enumerate(zip(draws, ancs, strict=False)):
        kw = dict(patient=pid, effective=at(T0, offset - 30), specimen=f"Specimen/order-{n}")
        cbcs.append(
            [
                observation("6690-2", 2.0, id=f"order-wbc{n}", **kw),
                observation("751-8", anc_k, id=f"order-anc{n}", **kw),
            ]
        )
    temps = [
        [
            observation(
                "8310-5",
                c,
                "Cel",
                id=f"order-t{m + 10_000}",
                patient=pid,
                effective=at(T0, m - 30),
                specimen=None,
            )
        ]
        for m, c in sorted(readings.items())
    ]
    # IDSA 2010: ANC < 500, or (the proxy for "expected to fall below 500 within 48 h") < 1000
    # after a fall of >= 50 % within 48 h; the fever within 24 h of that ANC; the first such panel.
    qualifies = [ancs[0] < 0.5] + (
        [ancs[1] < 0.5 or (ancs[1] < 1.0 and ancs[1] <= ancs[0] * 0.5 and second <= 48 * 60)]
        if second
        else []
    )
    expected = set()
    for m, c in readings.items():
        if c >= 38.3:
            panel = next((n for n, d in enumerate(draws) if qualifies[n] and abs(m - d) <= DAY_MIN), None)
            if panel is not None:
                expected.add((f"Observation/order-anc{panel}", f"Observation/order-t{m + 10_000}"))
    order = draw(st.permutations([*cbcs, *temps]))
    if second is not None and order.index(cbcs[1]) < order.index(cbcs[0]):  # the CBCs in collection order
        i, j = order.index(cbcs[1]), order.index(cbcs[0])
        order[i], order[j] = order[j], order[i]
    return order, expected


@settings(max_examples=200, deadline=None)
@given(case=arrivals())
def test_febrile_events_do_not_depend_on_arrival_order_decide(case):
    """Through `decide`: for every arrival order of the readings among the CBCs (more readings than
    the old 64-reading memory, some collected days after the draws, some arriving after the later
    CBC) the febrile events (panel, fever reading) are the same: the one fever within 24 h of the
    first qualifying ANC, if there is one."""
    order, expected = case
    state, got = PatientState(), set()
    for resources in order:
        panel = (
            "specimen:" + resources[0]["specimen"]["reference"]
            if "specimen" in resources[0]
            else resources[0]["id"]
        )
        d = decide(state, "Patient/order", panel, [result(o) for o in resources], RULES)
        state = d.state
        got |= {(e.assessment.refs[0], e.fever.ref) for e in d.events if e.kind.value == "febrile"}
    assert got == expected


@settings(max_examples=40, deadline=None)
@given(case=arrivals())
def test_febrile_events_do_not_depend_on_arrival_order_replay(case):
    """Through `replay`, the arrival order given by meta.lastUpdated: the same febrile events for
    every order, equal to those `decide` gives."""
    import copy
    import tempfile
    from pathlib import Path

    order, expected = case
    resources = []
    for i, group in enumerate(order):
        for obs in copy.deepcopy(group):
            obs["meta"]["lastUpdated"] = at(T0 + 20, i)
            resources.append(obs)
    with tempfile.TemporaryDirectory() as tmp:
        events, _ = replay(Path(tmp), write_ndjson(Path(tmp) / "in.ndjson", resources))
    assert {
        (e["observations"][0], e["temperature"]["observation"]) for e in events if e["event"] == "febrile"
    } == expected


def febrile_pairs(items) -> list[tuple[str, str]]:
    state, out = PatientState(), []
    for _, panel, results in items:
        d = decide(state, "Patient/f", panel, results, RULES)
        state = d.state
        out += [(e.assessment.panel, e.fever.ref) for e in d.events if e.kind.value == "febrile"]
    return out


P, Q, F = (
    cbc(0.3, T0, -30),
    cbc(0.3, T0 + 2, -30),
    temp(38.8, T0, 30),
)  # severe on day 10 and day 12; fever day 10


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([F, P, Q], [(P[1], "Observation/t10-30-38.8")]),
        ([P, F, Q], [(P[1], "Observation/t10-30-38.8")]),
        # the reading arrives after the day-12 CBC (> 24 h from it): it still pairs with day 10
        ([P, Q, F], [(P[1], "Observation/t10-30-38.8")]),
        # the episode closed on day 12: a fever learned afterwards is not announced (open episodes only)
        ([P, cbc(2.0, T0 + 2, -30), F], []),
    ],
)
def test_a_reading_arriving_after_a_later_cbc_pairs_with_the_draw_it_was_taken_beside(items, expected):
    """A fever within 24 h of a severe ANC (IDSA 2010, Freifeld CID 2011;52:e56: >= 38.3 °C with
    ANC < 500) makes the open episode febrile whether the reading arrives before that CBC, after it,
    or after a later CBC of the same episode."""
    assert febrile_pairs(items) == expected


def test_a_correction_days_later_does_not_retract_a_febrile_alert_for_want_of_its_fever():
    """A correction re-judges the remembered history with the remembered temperatures: the fever
    beside a draw stays remembered as long as that draw is, so correcting a later panel does not
    withdraw the febrile alert (the memory used to follow the newest reading: after 72 h of later
    readings the fever was gone and the correction retracted `febrile`)."""
    later = cbc(0.4, T0 + 2)
    kw = dict(patient="Patient/f", effective=at(T0 + 2), specimen=f"Specimen/{T0 + 2}-0")
    corrected = (
        "cbc",
        later[1],
        [
            result(observation("6690-2", 3.0, id=f"w{T0 + 2}-0", **kw)),
            result(observation("751-8", 0.8, id=f"a{T0 + 2}-0", version="2", **kw)),
        ],
    )
    items = [cbc(0.3, T0), temp(38.8, T0, 60), later, temp(36.8, T0 + 4), temp(36.9, T0 + 5), corrected]
    # the day-12 severe value corrected to moderate: nothing was announced on it, so nothing changes
    assert events_of(items) == ["new", "febrile"]
    state = PatientState()
    for _, panel, results in items:
        state = decide(state, "Patient/f", panel, results, RULES).state
    assert state.machine.febrile and state.history[-1].band.label == "moderate"


def test_a_fever_learned_after_its_episode_closed_is_never_announced():
    """A fever beside a severe draw that arrives after the episode resolved is not announced (the
    febrile alert asks for emergency treatment of an open neutropenia), neither when it arrives nor
    at a later revision: withdrawing an unrelated normal panel used to send it as a correction,
    re-activating the closed episode's Flag."""
    normal = cbc(2.0, T0 - 5)
    kw = dict(patient="Patient/f", effective=at(T0 - 5), specimen=f"Specimen/{T0 - 5}-0")
    withdrawn = (
        "cbc",
        normal[1],
        [
            result(observation("6690-2", 3.0, id=f"w{T0 - 5}-0", **kw)),
            result(
                observation("751-8", 2.0, id=f"a{T0 - 5}-0", version="2", status="entered-in-error", **kw)
            ),
        ],
    )
    items = [normal, cbc(0.3, T0), cbc(2.0, T0 + 2), temp(38.8, T0, 60), withdrawn]
    assert events_of(items) == ["new", "resolved"]
    # the same fever arriving while the episode was open was announced, and a revision keeps it
    assert events_of([normal, cbc(0.3, T0), temp(38.8, T0, 60), cbc(2.0, T0 + 2), withdrawn]) == [
        "new",
        "febrile",
        "resolved",
    ]


# -- the reasons the core returns (service/core/reasons.py) ------------------------------------------


SINGLE, SUSTAINED = FeverRule.SINGLE, FeverRule.SUSTAINED
BELOW, FALLING = AncRule.BELOW, AncRule.FALLING


def decisions_of(items) -> list:
    state, out = PatientState(), []
    for _, panel, results in items:
        d = decide(state, "Patient/f", panel, results, RULES)
        state = d.state
        out.append(d)
    return out


@pytest.mark.parametrize(
    ("items", "rule"),
    [
        # IDSA 2010 / ASCO-IDSA 2018: one reading >= 38.3 C, ANC < 500
        ([cbc(0.4, T0), temp(38.3, T0, 120)], FebrileRule(SINGLE, BELOW)),
        # >= 38.0 C sustained over 1 h
        ([cbc(0.4, T0), temp(38.0, T0, 60), temp(38.1, T0, 120)], FebrileRule(SUSTAINED, BELOW)),
        # the "expected to fall below 500" proxy (a default): < 1000 having fallen >= 50 % within 48 h
        ([cbc(1.9, T0 - 1), cbc(0.8, T0), temp(38.5, T0, 60)], FebrileRule(SINGLE, FALLING)),
        # below 500 and falling too: the ANC < 500 criterion is the one named
        ([cbc(1.9, T0 - 1), cbc(0.4, T0), temp(38.5, T0, 60)], FebrileRule(SINGLE, BELOW)),
        # the fever read before its CBC: the CBC's decision announces it, with the same criteria
        ([temp(38.6, T0, -600), cbc(0.4, T0)], FebrileRule(SINGLE, BELOW)),
        # a reading that arrives after a later CBC of the episode pairs with the draw beside it
        ([cbc(0.4, T0), cbc(0.45, T0 + 3), temp(38.4, T0, 60)], FebrileRule(SINGLE, BELOW)),
    ],
)
def test_a_febrile_event_names_the_criteria_that_fired(items, rule):
    """Each febrile event carries which fever criterion (single or sustained) and which ANC
    criterion (below 500 or falling) made it, as data."""
    febrile = [e for d in decisions_of(items) for e in d.events if e.kind is EventKind.FEBRILE]
    assert [e.febrile_rule for e in febrile] == [rule]


@pytest.mark.parametrize(
    ("items", "considered"),
    [
        # below 38.0 C: no fever (IDSA 2010 thresholds, reference §3)
        ([cbc(0.4, T0), temp(37.5, T0, 60)], FeverConsidered(None)),
        # >= 38.0 C but below 38.3 C and not (yet) sustained over 1 h
        ([cbc(0.4, T0), temp(38.2, T0, 60)], FeverConsidered(None, high=True)),
        ([cbc(0.4, T0), temp(38.3, T0, 60)], FeverConsidered(SINGLE, febrile=True)),
        ([cbc(0.4, T0), temp(38.0, T0, 60), temp(38.1, T0, 120)], FeverConsidered(SUSTAINED, febrile=True)),
        # ANC >= 1500: no episode to make febrile
        ([cbc(2.5, T0), temp(39.0, T0, 60)], FeverConsidered(SINGLE, not_febrile=NotFebrile.NO_EPISODE)),
        # once per episode
        (
            [cbc(0.4, T0), temp(38.5, T0, 60), temp(38.6, T0, 120)],
            FeverConsidered(SINGLE, not_febrile=NotFebrile.ALREADY_FEBRILE),
        ),
        # ANC 1200 (mild) is neither < 500 nor < 1000 and falling
        (
            [cbc(1.2, T0), temp(39.0, T0, 60)],
            FeverConsidered(SINGLE, not_febrile=NotFebrile.ANC_NOT_LOW, newest_anc=1200.0),
        ),
        # 48 h after the ANC: outside the 24 h window
        ([cbc(0.4, T0), temp(38.6, T0 + 2)], FeverConsidered(SINGLE, not_febrile=NotFebrile.TOO_FAR)),
    ],
)
def test_a_panel_of_temperatures_says_what_the_fever_rule_made_of_them(items, considered):
    """The decision on a panel of body temperatures carries whether they made a fever (and by which
    criterion) and, for a fever that announced no febrile neutropenia, why not."""
    assert decisions_of(items)[-1].fever == considered


def test_a_panel_without_temperatures_considers_no_fever():
    """A CBC alone carries no fever judgement (there was none to make)."""
    assert decisions_of([cbc(0.4, T0)])[-1].fever is None
