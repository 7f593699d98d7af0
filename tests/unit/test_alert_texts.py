"""The alert texts (service/output/texts.py): counts written as clinicians write them, the WBC and the
neutrophil fraction beside the ANC, and a marked leukocytosis with a low neutrophil fraction named
for what it is, never called a return to normal (reference §3, "White-cell picture")."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from service.__main__ import main
from service.config import AlertSettings
from service.core.episodes import AlertEvent, Assessment, EventKind
from service.core.grading import DEFAULT
from service.output import texts
from service.output.alerts import build
from tests.builders import observation

SEVERE = DEFAULT.grade(300, None)  # the default scheme: severe < 500 (reference §3)
BLOOD_FILM = "marked leukocytosis with a low neutrophil fraction: review the blood film"


def assessment(anc: float, wbc: float | None, **kw: object) -> Assessment:
    fields: dict[str, object] = dict(
        patient="Patient/p",
        panel="specimen:s",
        anc=float(anc),
        at_most=False,
        method="wbc-x-neutrophil-pct",
        wbc=None if wbc is None else float(wbc),
        band=DEFAULT.grade(anc, None),
        effective="2026-01-05T08:00:00Z",
        effective_us=0,
        refs=("Observation/n",),
        versions=("1",),
    )
    return Assessment(**{**fields, **kw})  # type: ignore[arg-type]  # kw: the test's field overrides


def event(kind: EventKind, a: Assessment, **kw: object) -> AlertEvent:
    fields: dict[str, object] = dict(
        kind=kind,
        patient="Patient/p",
        episode="e1",
        band=SEVERE,
        worst=SEVERE,
        assessment=a,
        opened="2026-01-02T08:00:00Z",
        previous_anc=410.0,
        previous_effective="2026-01-02T08:00:00Z",
    )
    return AlertEvent(**{**fields, **kw})  # type: ignore[arg-type]  # kw: the test's field overrides


# -- counts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (41_000, 1, "41.0 ×10³/µL"),  # WBC, one decimal, as analysers report it
        (1_940, 1, "1.9 ×10³/µL"),
        (23_000, 0, "23 ×10³/µL"),  # platelets, whole ×10³/µL
        (180_400, 0, "180 ×10³/µL"),
    ],
)
def test_wbc_and_platelets_are_written_in_thousands_per_microlitre(value, digits, text):
    """WBC and platelets read ×10³/µL (10³/µL = 10⁹/L, reference §2), never a raw "cells/µL" count."""
    assert texts.thousands(value, digits) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(1.0, "1 %"), (5.6, "5.6 %"), (0.25, "0.2 %"), (0.0, "0 %"), (18.3, "18 %"), (55.0, "55 %")],
)
def test_neutrophil_fraction_is_written_in_percent(value, text):
    """Whole percents from 10 %, one decimal below it, where one point matters."""
    assert texts.percent(value) == text


@pytest.mark.parametrize(
    ("hb", "platelets", "text"),
    [
        (9.9882, 45_000, "Hb 10.0 g/dL, platelets 45 ×10³/µL"),  # 6.2 mmol/L × 1.611 (reference §3, KIP)
        (8.1, 23_000, "Hb 8.1 g/dL, platelets 23 ×10³/µL"),
        (None, 23_000, "platelets 23 ×10³/µL"),
        (12.0, None, "Hb 12.0 g/dL"),
    ],
)
def test_haemoglobin_in_g_dl_with_one_decimal(hb, platelets, text):
    """Hb in g/dL with one decimal (a converted 9.9882 is not written to four decimals)."""
    assert texts.blood_counts(assessment(400, 2000, hemoglobin=hb, platelets=platelets)) == text


# -- the white count beside the ANC ---------------------------------------------------------------


def test_the_white_count_and_fraction_follow_the_anc_in_both_texts():
    """Communication and Flag give the WBC and the neutrophil fraction after the ANC."""
    a = assessment(400, 2_000, cytopenia="pancytopenia", hemoglobin=8.1, platelets=23_000)
    message = texts.message(event(EventKind.NEW, a), DEFAULT)
    assert message.startswith(
        "New neutropenia, severe: ANC 400 cells/µL collected 2026-01-05T08:00:00Z "
        "(wbc x neutrophil pct); WBC 2.0 ×10³/µL, neutrophils 20 %; "
        "part of a pancytopenia (Hb 8.1 g/dL, platelets 23 ×10³/µL). "
        "Previous ANC 410 cells/µL"
    )
    assert texts.flag_text(event(EventKind.NEW, a), "active") == (
        "Neutropenia, severe, pancytopenia; latest ANC 400 cells/µL collected 2026-01-05T08:00:00Z; "
        "WBC 2.0 ×10³/µL, neutrophils 20 %"
    )
    assert "cells/µL)" not in message and BLOOD_FILM not in message.lower()


def test_an_anc_bound_bounds_the_fraction_and_a_panel_without_wbc_gives_none():
    """ANC "< 100" → "neutrophils ≤ …"; a reported ANC without a WBC gives no white count at all."""
    bound = assessment(100, 20_000, at_most=True)
    assert "ANC ≤ 100 cells/µL" in texts.message(event(EventKind.NEW, bound), DEFAULT)
    assert texts.white_count(bound) == "WBC 20.0 ×10³/µL, neutrophils ≤ 0.5 %"
    alone = assessment(300, None, method="reported-absolute")
    assert texts.white_count(alone) is None
    assert "WBC" not in texts.flag_text(event(EventKind.NEW, alone), "active")


def test_isolated_neutropenia_gives_the_counts_that_are_not_low():
    """ "isolated" says which counts were not low, with their values."""
    a = assessment(340, 1_900, cytopenia="isolated", hemoglobin=10.8, platelets=207_000)
    assert texts.cytopenia(a) == (
        "isolated (haemoglobin and platelets not low: Hb 10.8 g/dL, platelets 207 ×10³/µL)"
    )


# -- the leukaemic picture ------------------------------------------------------------------------------


def test_marked_leukocytosis_with_low_fraction_is_named_in_new_and_flag():
    """WBC 41 ×10³/µL with 1 % neutrophils: named, with the advice to review the film (reference §3)."""
    a = assessment(410, 41_000)
    message = texts.message(event(EventKind.NEW, a), DEFAULT)
    assert "WBC 41.0 ×10³/µL, neutrophils 1 %" in message
    assert "Marked leukocytosis with a low neutrophil fraction: review the blood film." in message
    assert texts.flag_text(event(EventKind.NEW, a), "active").endswith("; " + BLOOD_FILM)


def test_resolution_in_the_leukaemic_picture_is_not_a_return_to_normal():
    """ANC 2,580 with WBC 43 ×10³/µL and 6 % neutrophils: resolved by the ANC only, the count not normal."""
    a = assessment(2_580, 43_000)
    resolved = event(EventKind.RESOLVED, a, episode_open=False, ended=a.effective)
    message = texts.message(resolved, DEFAULT)
    assert message.startswith(
        "Neutropenia resolved by the ANC only; the white count is not normal: ANC 2,580 cells/µL"
    )
    assert "WBC 43.0 ×10³/µL, neutrophils 6 %" in message and BLOOD_FILM in message.lower()
    assert "normal range" not in message and "back to normal" not in message
    flag = texts.flag_text(resolved, "inactive")
    assert flag.startswith(
        "Neutropenia, severe; resolved 2026-01-05T08:00:00Z by the ANC only; latest ANC 2,580 cells/µL"
    )
    assert "WBC 43.0 ×10³/µL, neutrophils 6 %" in flag and flag.endswith(BLOOD_FILM)


def test_an_ordinary_resolution_is_back_in_the_normal_range():
    """WBC 5 ×10³/µL, 55 % neutrophils: the ANC is back in the normal range, and the text says so."""
    a = assessment(2_750, 5_000, cytopenia="isolated", hemoglobin=12.1, platelets=180_000)
    message = texts.message(event(EventKind.RESOLVED, a, episode_open=False, ended=a.effective), DEFAULT)
    assert message.startswith("Neutropenia resolved, ANC back in the normal range: ANC 2,750 cells/µL")
    assert "WBC 5.0 ×10³/µL, neutrophils 55 %; Hb 12.1 g/dL, platelets 180 ×10³/µL." in message
    assert "isolated" not in message and BLOOD_FILM not in message.lower()


def test_hyperleukocytosis_is_named_whatever_the_fraction():
    """WBC 150 ×10³/µL (> 100, The Blood Project): named, urgent film review, even with 60 % neutrophils."""
    a = assessment(90_000, 150_000)
    message = texts.message(event(EventKind.RESOLVED, a, episode_open=False, ended=a.effective), DEFAULT)
    assert "Hyperleukocytosis (WBC > 100 ×10³/µL): review the blood film urgently." in message
    assert "normal range" not in message


def test_a_withdrawal_gives_the_white_count_of_the_panel_now():
    """A retraction says what the panel now gives, with its white count."""
    from service.core.episodes import Alerted

    a = assessment(1_800, 43_000)
    x = Alerted("e1", EventKind.NEW, SEVERE, "specimen:s", 410.0, "2026-01-02T08:00:00Z")
    text = texts.message(event(EventKind.RETRACTED, a, retracted=x, reason="corrected", revision=1), DEFAULT)
    assert "The panel now gives ANC 1,800 cells/µL (normal; WBC 43.0 ×10³/µL, neutrophils 4.2 %)." in text


def test_the_built_resources_carry_the_texts():
    """alerts.build puts the Flag text in code.text and the message in the Communication's payload."""
    a = assessment(410, 41_000)
    writes = build(event(EventKind.NEW, a), DEFAULT, AlertSettings(), sent="2026-01-05T10:00:00Z")
    assert writes.flag["code"]["text"] == texts.flag_text(event(EventKind.NEW, a), "active")
    assert writes.communication is not None
    payload = writes.communication["payload"][0]["contentString"]
    assert payload == texts.message(event(EventKind.NEW, a), DEFAULT)


# -- end to end: replay ------------------------------------------------------------------------------------


def _panel(pid: str, day: int, wbc_k: float, neutrophil_pct: float, hb: float, platelets_k: float) -> list:
    """One CBC: WBC, neutrophil %, Hb and platelets on one specimen, collected on `day` of January 2026."""
    eff, upd = f"2026-01-{day:02d}T08:00:00Z", f"2026-01-{day:02d}T10:00:00.000Z"
    spec = f"Specimen/{pid}-{day}"
    kw = dict(patient=f"Patient/{pid}", effective=eff, updated=upd, specimen=spec)
    return [
        observation("6690-2", wbc_k, "10*3/uL", id=f"{pid}-{day}-wbc", **kw),
        observation("770-8", neutrophil_pct, "%", id=f"{pid}-{day}-neut", **kw),
        observation("718-7", hb, "g/dL", id=f"{pid}-{day}-hb", **kw),
        observation("777-3", platelets_k, "10*3/uL", id=f"{pid}-{day}-plt", **kw),
    ]


def test_replay_of_the_leukaemic_picture(tmp_path: Path):
    """WBC 41 → 43 ×10³/µL with 1 % → 6 % neutrophils (ANC 410 → 2,580): `new` severe then `resolved`,
    both events with picture `marked-leukocytosis-low-neutrophil-fraction`, and the texts name it."""
    source = tmp_path / "in.ndjson"
    rows = _panel("leuk", 2, 41.0, 1, 8.1, 23) + _panel("leuk", 5, 43.0, 6, 8.3, 31)
    rows += _panel("ok", 2, 2.0, 20, 9.0, 45)
    source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    events, alerts = tmp_path / "events.jsonl", tmp_path / "alerts.ndjson"
    config = tmp_path / "one-normal-resolves.yaml"  # the resolution wording is under test, not its timing
    config.write_text(
        "clinical:\n  resolution: {confirmations: 1, min_hours: 0, reopen_days: 0, memory_days: 0}\n"
    )
    argv = ["replay", str(source), "--events", str(events), "--alerts", str(alerts), "--config", str(config)]
    assert main(argv) == 0
    decided = [orjson.loads(line) for line in events.read_bytes().splitlines()]
    assert [(e["patient"], e["event"], e["anc"], e["picture"]) for e in decided] == [
        ("Patient/leuk", "new", 410, "marked-leukocytosis-low-neutrophil-fraction"),
        ("Patient/ok", "new", 400, None),
        ("Patient/leuk", "resolved", 2580, "marked-leukocytosis-low-neutrophil-fraction"),
    ]
    written = [orjson.loads(line) for line in alerts.read_bytes().splitlines()]
    resolved = [r["payload"][0]["contentString"] for r in written if r["resourceType"] == "Communication"][-1]
    assert "WBC 43.0 ×10³/µL, neutrophils 6 %" in resolved and BLOOD_FILM in resolved.lower()
    assert "normal range" not in resolved
