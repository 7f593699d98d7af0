"""Behaviour of the synthetic FHIR generator (tests.synthetic)."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.synthetic import (
    NOISE_KINDS,
    NOISE_URL,
    PopulationSpec,
    generate,
    main,
    observations_target,
    write_ndjson,
)

Resource = dict[str, Any]
LOINC = "http://loinc.org"
SMALL = PopulationSpec(patients=6, days=21)


@pytest.fixture(scope="module")
def demo() -> list[Resource]:
    return list(generate(PopulationSpec()))  # 40 patients, seed 1, 56 days


def loinc(res: Resource) -> str:
    return next(c["code"] for c in res["code"]["coding"] if c["system"] == LOINC)


def noise(res: Resource) -> str | None:
    return next((e["valueCode"] for e in res.get("extension", []) if e["url"] == NOISE_URL), None)


def observations(resources: list[Resource]) -> list[Resource]:
    return [r for r in resources if r["resourceType"] == "Observation"]


def latest(resources: list[Resource]) -> dict[str, Resource]:
    """Last version of each id (the stream is in lastUpdated order)."""
    return {f"{r['resourceType']}/{r['id']}": r for r in resources}


def cells_per_ul(q: Resource) -> float:
    return q["value"] * (1 if q["code"] == "/uL" else 1000)


def panel_anc(obs: dict[str, Resource]) -> float:
    """A minimal consumer: ANC in cells/uL from one noise-free panel keyed by LOINC code."""
    q = {code: o["valueQuantity"] for code, o in obs.items()}
    if "751-8" in q:
        return cells_per_ul(q["751-8"])
    if "768-2" in q:
        return cells_per_ul(q["768-2"]) + cells_per_ul(q["763-3"])
    wbc = cells_per_ul(q["6690-2"])
    if "770-8" in q:
        return wbc * q["770-8"]["value"] / 100
    return wbc * (q["769-0"]["value"] + q["764-1"]["value"]) / 100


def panels(resources: list[Resource]) -> list[tuple[Resource, dict[str, Resource]]]:
    """(DiagnosticReport, {loinc: latest Observation}) for panels without noise."""
    last = latest(resources)
    out = []
    for dr in last.values():
        if dr["resourceType"] != "DiagnosticReport":
            continue
        members = [last[r["reference"]] for r in dr["result"]]
        if not any(noise(o) for o in members):
            out.append((dr, {loinc(o): o for o in members}))
    return out


def test_same_seed_same_output_and_other_seed_differs() -> None:
    first = [orjson.dumps(r) for r in generate(SMALL)]
    assert first == [orjson.dumps(r) for r in generate(SMALL)]
    other = [orjson.dumps(r) for r in generate(PopulationSpec(patients=6, days=21, seed=2))]
    assert other != first


def test_a_patient_does_not_depend_on_population_size() -> None:
    def patient_3(patients: int) -> list[bytes]:
        resources = generate(PopulationSpec(patients=patients, days=21, seed=9))
        return [
            orjson.dumps(r)
            for r in resources
            if (r.get("subject", {}).get("reference") or f"Patient/{r['id']}") == "Patient/nw9-p00003"
        ]

    assert patient_3(3) == patient_3(12) != []


def test_output_is_in_nondecreasing_last_updated_order(demo: list[Resource]) -> None:
    stamps = [r["meta"]["lastUpdated"] for r in demo]
    assert all(s.endswith("Z") and len(s) == 24 for s in stamps)  # 2026-01-05T08:00:00.000Z
    parsed = [datetime.fromisoformat(s) for s in stamps]
    assert parsed == sorted(parsed)


def test_every_observation_has_loinc_and_a_known_patient_subject(demo: list[Resource]) -> None:
    seen_patients: set[str] = set()
    for res in demo:
        if res["resourceType"] == "Patient":
            seen_patients.add(f"Patient/{res['id']}")
            assert res["identifier"][0]["system"] == "urn:oid:2.16.840.1.113883.19.5"
            continue
        assert res["subject"]["reference"] in seen_patients  # the Patient came first
        if res["resourceType"] == "Observation":
            assert loinc(res)
    assert len(seen_patients) == 40


def test_id_and_version_are_unique_and_versions_increase(demo: list[Resource]) -> None:
    keys = Counter((r["resourceType"], r["id"], r["meta"]["versionId"]) for r in demo)
    assert max(keys.values()) == 1
    versions: dict[str, list[int]] = defaultdict(list)
    for r in demo:
        versions[r["id"]].append(int(r["meta"]["versionId"]))
    assert all(v == list(range(1, len(v) + 1)) for v in versions.values())


def test_report_results_resolve_to_earlier_observations_of_the_same_specimen(demo: list[Resource]) -> None:
    seen: dict[str, Resource] = {}
    for res in demo:
        if res["resourceType"] == "DiagnosticReport":
            assert res["code"]["coding"][0]["code"] in ("57021-8", "57782-5")
            members = [seen[ref["reference"]] for ref in res["result"]]
            assert {m["specimen"]["reference"] for m in members} == {res["specimen"][0]["reference"]}
        seen[f"{res['resourceType']}/{res['id']}"] = res


def test_absolute_count_agrees_with_wbc_times_percent(demo: list[Resource]) -> None:
    checked = 0
    for _, obs in panels(demo):
        if {"751-8", "770-8", "6690-2"} <= obs.keys():
            anc, wbc = obs["751-8"]["valueQuantity"], obs["6690-2"]["valueQuantity"]
            assert anc["code"] == wbc["code"]
            tolerance = 0.005 * (1000 if anc["code"] == "/uL" else 1) + 1e-9
            assert (
                abs(anc["value"] - wbc["value"] * obs["770-8"]["valueQuantity"]["value"] / 100) <= tolerance
            )
            checked += 1
    assert checked > 100


def test_chemo_patients_reach_severe_neutropenia(demo: list[Resource]) -> None:
    by_patient: dict[str, list[float]] = defaultdict(list)
    for dr, obs in panels(demo):
        by_patient[dr["subject"]["reference"]].append(panel_anc(obs))
    severe = {p for p, ancs in by_patient.items() if min(ancs) < 500}
    assert len(severe) >= 2
    assert any(500 <= a < 1000 for ancs in by_patient.values() for a in ancs)
    assert sum(min(ancs) >= 1500 for ancs in by_patient.values()) >= 15  # most patients stay normal


def test_unit_encodings_local_codings_and_temperatures_vary(demo: list[Resource]) -> None:
    obs = observations(demo)
    wbc_units = {
        (o["valueQuantity"]["system"], o["valueQuantity"]["code"], o["valueQuantity"]["unit"])
        for o in obs
        if loinc(o) == "6690-2"
    }
    assert len(wbc_units) >= 4
    assert any(o["code"]["coding"][0]["system"] != LOINC for o in obs)  # local code listed first
    temps = [o["valueQuantity"] for o in obs if loinc(o) == "8310-5"]
    assert {q["code"] for q in temps} == {"Cel", "[degF]"}
    celsius = [q["value"] if q["code"] == "Cel" else (q["value"] - 32) * 5 / 9 for q in temps]
    assert any(c >= 38.3 for c in celsius)
    assert sum(c < 38.0 for c in celsius) > 0.9 * len(celsius)


def test_noise_is_tagged_once_per_panel_and_has_its_shape() -> None:
    resources = list(generate(PopulationSpec(patients=12, seed=5, noise_fraction=0.5)))
    reports = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    tagged = {o["id"]: o for o in observations(resources) if noise(o)}
    per_report = [
        sum(ref["reference"].removeprefix("Observation/") in tagged for ref in dr["result"]) for dr in reports
    ]
    assert max(per_report) == 1
    assert 0.35 < sum(per_report) / len(reports) < 0.65
    kinds = Counter(noise(o) for o in tagged.values())
    assert set(kinds) == set(NOISE_KINDS)
    for o in observations(resources):
        match noise(o):
            case "data-absent":
                assert "valueQuantity" not in o and o["dataAbsentReason"]["coding"][0]["code"] == "error"
            case "value-string":
                assert o["valueString"] == "<0.1"
            case "comparator-lt":
                assert o["valueQuantity"]["comparator"] == "<" and loinc(o) == "751-8"
            case "anc-percent-unit":
                assert loinc(o) == "751-8" and o["valueQuantity"]["unit"] == "%"
            case "anc-26499-4-unit-error":
                assert loinc(o) == "26499-4" and o["valueQuantity"]["code"] == "10*3/uL"
                assert o["valueQuantity"]["value"] >= 10  # cells/uL mislabelled as thousands
            case "preliminary-then-final":
                assert (o["meta"]["versionId"], o["status"]) in (("1", "preliminary"), ("2", "final"))


def test_clean_spec_has_no_noise_corrections_or_temperatures() -> None:
    spec = PopulationSpec(patients=10, noise_fraction=0, corrections=0, temperatures=False)
    obs = observations(list(generate(spec)))
    assert obs and all(o["status"] == "final" and o["meta"]["versionId"] == "1" for o in obs)
    assert not any(noise(o) for o in obs)
    assert not any(loinc(o) == "8310-5" for o in obs)


def test_corrections_restate_an_earlier_final_value() -> None:
    resources = list(generate(PopulationSpec(patients=8, corrections=0.2)))
    first: dict[str, Resource] = {}
    corrected = 0
    for o in observations(resources):
        if o["meta"]["versionId"] == "1":
            first[o["id"]] = o
        elif o["status"] == "corrected":
            v1 = first[o["id"]]
            assert v1["status"] == "final" and v1["valueQuantity"]["value"] != o["valueQuantity"]["value"]
            assert o["meta"]["lastUpdated"] > v1["meta"]["lastUpdated"]
            assert o["effectiveDateTime"] == v1["effectiveDateTime"]
            corrected += 1
    assert corrected > 0.1 * len(first)


def test_observations_target_lands_within_ten_percent() -> None:
    spec = observations_target(100_000, 1000, 3)
    assert (spec.patients, spec.seed) == (1000, 3)
    count = sum(r["resourceType"] == "Observation" for r in generate(spec))
    assert 90_000 <= count <= 110_000


def test_write_ndjson_writes_valid_lines_and_returns_the_count(tmp_path: Path) -> None:
    out = tmp_path / "small.ndjson"
    n = write_ndjson(SMALL, out)
    lines = out.read_bytes().splitlines()
    assert n == len(lines) > 0
    assert [orjson.loads(line) for line in lines] == list(generate(SMALL))


def test_main_prints_counts_by_resource_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.ndjson"
    assert main(["--patients", "3", "--days", "14", "--seed", "4", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    counts = Counter(orjson.loads(line)["resourceType"] for line in out.read_bytes().splitlines())
    for resource_type, n in counts.items():
        assert f"{resource_type}: {n}" in err


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(-(2**40), 2**40),
    patients=st.integers(0, 4),
    days=st.integers(1, 40),
    noise_fraction=st.floats(0, 1),
    corrections=st.floats(0, 1),
    chemo=st.floats(0, 1),
)
def test_any_spec_is_ordered_unique_and_coded(
    seed: int, patients: int, days: int, noise_fraction: float, corrections: float, chemo: float
) -> None:
    spec = PopulationSpec(
        patients=patients,
        seed=seed,
        days=days,
        chemo_fraction=chemo,
        noise_fraction=noise_fraction,
        corrections=corrections,
    )
    resources = list(generate(spec))
    stamps = [r["meta"]["lastUpdated"] for r in resources]
    assert stamps == sorted(stamps)
    assert len({(r["resourceType"], r["id"], r["meta"]["versionId"]) for r in resources}) == len(resources)
    assert all(loinc(o) for o in observations(resources))
