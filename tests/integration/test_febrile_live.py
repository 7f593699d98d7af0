"""Febrile neutropenia in the live loop against the real engine: temperatures polled for patients
with an open episode (and all of them, by config), in °C and °F, matching replay."""

from __future__ import annotations

import pytest

from tests.builders import observation
from tests.fhir_server.load import export, put_all
from tests.integration.live import compare_with_oracle, cycle, population, settings_for, stages


def cbc(pid: str, anc_k: float, when: str):
    kw = dict(patient=f"Patient/{pid}", effective=when, specimen=f"Specimen/{pid}-{when[:10]}")
    return [
        observation("6690-2", 2.5, id=f"{pid}-{when[:10]}-wbc", **kw),
        observation("751-8", anc_k, id=f"{pid}-{when[:10]}-anc", **kw),
    ]


def temperature(pid: str, value: float, unit: str, when: str):
    return observation(
        "8310-5",
        value,
        unit,
        id=f"{pid}-t-{when[11:13]}{when[14:16]}",
        patient=f"Patient/{pid}",
        effective=when,
        specimen=None,
        category=[{"coding": [{"code": "vital-signs"}]}],
    )


@pytest.mark.parametrize("mode", ["open-episodes", "all"])
async def test_fever_before_and_after_the_anc(fhir_base_url, tmp_path, mode):
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3", temperatures=mode)
    # fever 6 h before a severe ANC (°F), and a patient whose fever comes after the ANC (°C)
    put_all(
        fhir_base_url,
        [
            temperature("a", 101.5, "[degF]", "2026-04-01T02:00:00Z"),
            *cbc("a", 0.3, "2026-04-01T08:00:00Z"),
            *cbc("b", 0.4, "2026-04-01T09:00:00Z"),
            temperature("c", 39.0, "Cel", "2026-04-01T09:30:00Z"),
        ],
    )
    first = await cycle(settings)
    assert first.events == {"new": 2, "febrile": 1}
    if mode == "open-episodes":
        assert first.temperature_searches == 1  # the two open episodes in one search; patient c has none
    put_all(
        fhir_base_url,
        [
            temperature("b", 38.1, "Cel", "2026-04-01T11:00:00Z"),
            temperature("b", 38.2, "Cel", "2026-04-01T12:10:00Z"),
        ],
    )
    second = await cycle(settings)
    assert second.events == {"febrile": 1}  # >= 38.0 sustained over 70 minutes
    if mode == "open-episodes":
        assert second.temperature_searches == 1  # both open episodes in one search (subject=a,b)
    flags = {f["subject"]["reference"]: f for f in export(fhir_base_url, "Flag")}
    assert {p: f["code"]["coding"][0]["code"] for p, f in flags.items()} == {
        "Patient/a": "409089005",
        "Patient/b": "409089005",
    }
    stat = [c for c in export(fhir_base_url, "Communication") if c["priority"] == "stat"]
    assert len(stat) == 2
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def test_population_with_temperatures_arriving_in_stages_matches_replay(fhir_base_url, tmp_path):
    """Episodes can open and close within one cycle's arrivals: the temperatures of every patient
    with new results are read before the decisions, so the febrile rule sees what replay sees."""
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    febrile = 0
    for stage in stages(population(patients=40, days=56, seed=1, temperatures=True), 4):
        put_all(fhir_base_url, stage)
        febrile += (await cycle(settings)).events.get("febrile", 0)
    assert febrile >= 1
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


@pytest.mark.parametrize("mode", ["open-episodes", "all"])
async def test_reading_collected_days_later_read_before_the_cbc(fhir_base_url, tmp_path, mode):
    """A temperature collected four days after a draw, read by the service (with the fever beside the
    draw) a cycle BEFORE that draw's CBC arrives, must not make the fever be forgotten: the severe
    CBC then raises `febrile` — Flag 409089005 (Febrile neutropenia) and a `stat` Communication
    naming the 38.8 °C reading (IDSA 2010, Freifeld CID 2011;52:e56: >= 38.3 °C once, ANC < 500) —
    exactly as replay predicts. (With the temperature memory following the newest reading seen, the
    36.8 °C reading evicted the fever and no febrile alert was ever written.)"""
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3", temperatures=mode)
    # an open (mild) episode the day before, so `open-episodes` reads the patient's temperatures now
    put_all(
        fhir_base_url,
        [
            *cbc("d", 1.2, "2026-04-01T07:30:00Z"),
            temperature("d", 38.8, "Cel", "2026-04-02T08:00:00Z"),
            temperature("d", 36.8, "Cel", "2026-04-06T09:15:00Z"),
        ],
    )
    first = await cycle(settings)
    assert first.events == {"new": 1}
    if mode == "open-episodes":
        assert first.temperature_searches == 1
    put_all(
        fhir_base_url, cbc("d", 0.3, "2026-04-02T07:30:00Z")
    )  # drawn 07:30, resulted after both readings were read
    second = await cycle(settings)
    assert second.events == {"worsening": 1, "febrile": 1}
    (flag,) = export(fhir_base_url, "Flag")
    assert flag["code"]["coding"][0]["code"] == "409089005"
    (stat,) = [c for c in export(fhir_base_url, "Communication") if c["priority"] == "stat"]
    assert "38.8 °C" in stat["payload"][0]["contentString"]
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def test_first_temperature_search_reaches_back_by_the_sustained_span(fhir_base_url, tmp_path):
    """The first temperature search for a patient reads by collection time from the fever window
    before its earliest new result less the sustained-fever span: a reading >= 38.0 °C 40 min
    before the window starts a run that makes the reading 30 min into the window a fever (>= 38.0 °C
    over 1 h, IDSA 2010, Freifeld CID 2011;52:e56), as replay finds it."""
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3", temperatures="open-episodes")
    put_all(
        fhir_base_url,
        [
            temperature("e", 38.0, "Cel", "2026-04-01T06:50:00Z"),
            temperature("e", 38.1, "Cel", "2026-04-01T08:00:00Z"),
            *cbc("e", 0.3, "2026-04-02T07:30:00Z"),
        ],
    )
    report = await cycle(settings)
    assert report.events == {"new": 1, "febrile": 1}
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")
