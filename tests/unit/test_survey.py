"""`survey`: what a site's Observations look like to the service — codes monitored, local codes with a
likely term (a hint, never a mapping), units, statuses, panels without an ANC, unresolvable
references and the core's own rejections — and the draft ConceptMap it writes for review."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.conceptmap import ConceptMap

from service.__main__ import main
from service.survey.classifier import Classification, builtin
from service.survey.report import survey_json
from service.survey.sources import duration_seconds, file_resources
from service.survey.tally import Survey
from tests.builders import observation

MIMIC = Path(__file__).resolve().parents[1] / "data" / "mimic-iv-demo-cbc"
MIMIC_FILES = [MIMIC / "Observation.ndjson.gz", MIMIC / "Patient.ndjson"]
LAB = "http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-d-labitems"
CHART = "http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-chartevents-d-items"


@pytest.fixture(scope="module")
def mimic() -> dict[str, Any]:
    survey = Survey()
    for item in file_resources(MIMIC_FILES):
        survey.add(item)
    return survey_json(survey.finish(), "files")


def _by_code(survey: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["code"]: entry for entry in survey["observations"]}


# (system, itemid, count, candidate LOINC). Counts: tests/data/mimic-iv-demo-cbc/README.md ("Items present").
# LOINC codes: docs/clinical-reference.md §1.1 (WBC 6690-2, neutrophils % 770-8, bands % 764-1, absolute
# neutrophils 751-8), §1.2 (haemoglobin 718-7, platelets 777-3) and §1.3 (body temperature 8310-5).
MIMIC_ITEMS = [
    (LAB, "51301", 2759, "6690-2"),  # White Blood Cells
    (LAB, "51256", 939, "770-8"),  # Neutrophils
    (LAB, "51144", 395, "764-1"),  # Bands
    (LAB, "52075", 565, "751-8"),  # Absolute Neutrophil Count
    (LAB, "51222", 2785, "718-7"),  # Hemoglobin
    (LAB, "51265", 2820, "777-3"),  # Platelet Count
    (CHART, "223761", 3379, "8310-5"),  # Temperature Fahrenheit
    (CHART, "223762", 391, "8310-5"),  # Temperature Celsius
]


@pytest.mark.parametrize(("system", "code", "count", "loinc"), MIMIC_ITEMS)
def test_mimic_items_that_matter_are_listed_with_counts_and_candidates(mimic, system, code, count, loinc):
    """Each local MIMIC item the service needs is listed as unmonitored (no LOINC in the data), with
    its count and a candidate LOINC code found from its display text — a hint, not a mapping."""
    entry = _by_code(mimic)[code]
    assert (entry["system"], entry["count"], entry["standing"], entry["loinc"]) == (
        system,
        count,
        "unmonitored",
        None,
    )
    assert entry["candidate"]["loinc"] == loinc
    assert "display" in entry["candidate"]["basis"]
    listed = {(u["system"], u["code"]): u for u in mimic["unmonitored"]}
    assert listed[(system, code)]["count"] == count and listed[(system, code)]["candidate"]["loinc"] == loinc


def test_granulocyte_count_is_never_proposed_as_an_anc(mimic):
    """51218 Granulocyte Count (and 52135 Immature Granulocytes) get no candidate, only a caution:
    granulocytes are not neutrophils (reference §1.1: 30394-1/19023-1 are not an ANC; the data's README
    says 51218 is not an ANC)."""
    codes = _by_code(mimic)
    for code in ("51218", "52135"):
        assert codes[code]["candidate"] is None
        assert "never an ANC" in codes[code]["caution"]


def test_unrelated_counts_get_no_candidate(mimic):
    """Lymphocytes, monocytes, eosinophils, basophils, metamyelocytes and myelocytes are not terms the
    ANC uses (reference §2): no candidate, no caution."""
    codes = _by_code(mimic)
    for code in ("51244", "51254", "51200", "51146", "51133", "51251", "51255"):
        assert codes[code]["candidate"] is None and codes[code]["caution"] is None


def test_neutrophils_beside_bands_is_pointed_out(mimic):
    """MIMIC's 51256 "Neutrophils" is the segmented neutrophils of a manual differential where bands
    are reported beside it (the data's README): the survey counts those draws so the reviewer can
    tell 770-8 from 769-0. Every Bands result (README: 395) stands beside a Neutrophils result."""
    entry = _by_code(mimic)["51256"]
    assert entry["beside_bands"] == 395
    assert "769-0" in entry["candidate"]["note"]
    assert mimic["panels"]["neutrophil_pct_beside_bands"] == 395


def test_celsius_field_holding_fahrenheit_is_rejected_with_the_cores_reason(mimic):
    """Some 223762 "Temperature Celsius" values are Fahrenheit readings (README: 97-99). Read as if
    mapped, the core rejects exactly those (its plausibility range, 25-46 °C); the survey repeats
    the core's reason and does not derive its own."""
    with gzip.open(MIMIC / "Observation.ndjson.gz", "rt") as fh:
        wrong = sum(
            1 for line in fh if '"223762"' in line and json.loads(line)["valueQuantity"]["value"] > 46
        )
    assert wrong > 0
    assert mimic["temperatures_rejected"] == {"temperature outside 25-46 Cel": wrong}
    assert mimic["not_assessed"] == {}  # every MIMIC result is final (README)


def test_panels_without_an_anc_are_counted(mimic):
    """Draws with a WBC and no differential (a CBC without diff) are most of MIMIC's panels; the
    ANC needs a neutrophil result of the same draw (reference §2)."""
    panels = mimic["panels"]
    assert panels["total"] > panels["wbc_without_differential"] > 1000
    assert panels["differential_without_wbc"] < 10


def _survey_of(resources: list[dict[str, Any]], classify=builtin) -> dict[str, Any]:
    from service.fhir import raw

    survey = Survey(classify=classify)
    for resource in resources:
        for item in raw.decode(orjson.dumps(resource)):
            survey.add(item)
    return survey_json(survey.finish(), "files")


def test_monitored_codes_by_unit_status_and_not_assessed():
    """Monitored LOINC codes are counted by unit string and by status; results whose status the core
    does not assess (reference §1.5: only final, amended, corrected) are counted by status."""
    found = _survey_of(
        [
            observation("6690-2", 3.0, "10*3/uL", id="w1", specimen="Specimen/a"),
            observation("6690-2", 3.1, "K/uL", id="w2", specimen="Specimen/b", status="preliminary"),
            observation("770-8", 40.0, "%", id="n1", specimen="Specimen/a", status="registered"),
            observation("770-8", 45.0, "%", id="n2", specimen="Specimen/c"),
        ]
    )
    codes = _by_code(found)
    assert codes["6690-2"]["standing"] == "monitored"
    assert codes["6690-2"]["units"] == {"10*3/uL": 1, "K/uL": 1}
    assert codes["6690-2"]["statuses"] == {"final": 1, "preliminary": 1}
    assert found["not_assessed"] == {"status preliminary": 1, "status registered": 1}
    # a: WBC (its 770-8 registered), b: nothing final, c: 770-8 without a WBC
    assert found["panels"] == {
        "total": 2,
        "wbc_without_differential": 1,
        "differential_without_wbc": 1,
        "neutrophil_pct_beside_bands": 0,
    }


def test_unresolvable_references_are_counted_with_the_cores_reason():
    """A subject that names no patient on the server (contained, urn:uuid: outside a Bundle) and a
    specimen that names nothing (FHIR R4 references.html#literal) are counted by reason."""
    found = _survey_of(
        [
            observation("6690-2", 3.0, id="c1", patient="#p1"),
            observation("6690-2", 3.0, id="c2", patient="urn:uuid:7d3c1c9e-3b7e-4c38-9a55-3f0f2b1c4d5e"),
            observation("6690-2", 3.0, id="c3", specimen="#s1"),
        ]
    )
    assert found["unresolved_references"] == {
        "subject is a contained reference, which names no resource on the server": 1,
        "subject is a urn:uuid: reference, which names no resource on the server": 1,
        "specimen is a contained reference, which names no resource on the server": 1,
    }


def test_a_site_classifier_marks_mapped_codes_and_reads_them_as_their_target():
    """The terminology seam: a classifier that says a local code is mapped onto a LOINC code makes it
    "mapped" (not a candidate), and its results are read by the core as that code."""

    def site(system: str | None, code: str | None, /) -> Classification | None:
        return (
            Classification("mapped", "8310-5")
            if (system, code) == ("http://site/codes", "T")
            else builtin(system, code)
        )

    temp = observation("8310-5", 101.0, "[degF]", id="t1")
    temp["code"] = {"coding": [{"system": "http://site/codes", "code": "T", "display": "Temp"}]}
    cold = dict(temp, id="t2", valueQuantity={"value": 12.0, "unit": "Cel"})
    found = _survey_of([temp, cold], classify=site)
    entry = _by_code(found)["T"]
    assert (entry["standing"], entry["loinc"], entry["candidate"]) == ("mapped", "8310-5", None)
    assert found["unmonitored"] == []
    assert found["temperatures_rejected"] == {"temperature outside 25-46 Cel": 1}


def test_cli_writes_the_report_json_and_a_valid_draft_conceptmap(tmp_path, capsys):
    """`survey FILES --json --draft-conceptmap`: the text report on stdout; the JSON as documented
    (docs/survey.md); a FHIR R4 ConceptMap (validated with fhir.resources) whose every element maps a
    local code to its candidate LOINC code as `inexact`, with a comment asking for review."""
    out_json, out_map = tmp_path / "survey.json", tmp_path / "map.json"
    assert (
        main(["survey", *map(str, MIMIC_FILES), "--json", str(out_json), "--draft-conceptmap", str(out_map)])
        == 0
    )
    text = capsys.readouterr().out
    assert "51301  White Blood Cells" in text and "candidate: LOINC 6690-2" in text
    assert "51218  Granulocyte Count  CAUTION" in text
    document = orjson.loads(out_json.read_bytes())
    assert {"observations", "unmonitored", "not_assessed"} <= document.keys()
    cm = ConceptMap.model_validate(orjson.loads(out_map.read_bytes()))
    assert cm.status == "draft"
    groups = {g.source: g for g in cm.group}
    assert set(groups) == {LAB, CHART}
    mapped = {(g.source, e.code): e.target[0].code for g in cm.group for e in g.element}
    assert mapped[(LAB, "51301")] == "6690-2" and mapped[(CHART, "223761")] == "8310-5"
    assert (LAB, "51218") not in mapped and (LAB, "52135") not in mapped
    for group in cm.group:
        assert group.target == "http://loinc.org"
        for element in group.element:
            assert [t.equivalence for t in element.target] == ["inexact"]
            assert "Review" in element.target[0].comment and "'equivalent'" in element.target[0].comment


def test_cli_needs_inputs_or_server(capsys):
    """Neither INPUT nor --server (or both), --max below 1, or --since without --server: a usage error
    with one line, exit 2."""
    assert main(["survey"]) == 2
    assert "INPUT files or --server" in capsys.readouterr().err
    assert main(["survey", "--server", "--max", "0"]) == 2
    assert main(["survey", str(MIMIC_FILES[1]), "--since", "7d"]) == 2
    assert "--since goes with --server" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "seconds"), [("90m", 5400), ("12h", 43200), ("7d", 604800), ("30s", 30)])
def test_since_durations(text, seconds):
    """--since takes a number and a unit: s, m, h, d."""
    assert duration_seconds(text) == seconds


# (display, unit, candidate LOINC or None). Terms: docs/clinical-reference.md §1.1 (segs % 769-0, bands
# absolute 763-3, absolute neutrophils 751-8), §1.2 (718-7, 777-3), §1.3 (8310-5). Look-alikes that are
# other analytes get nothing: HbA1c, mean platelet volume, and counts in other fluids than blood.
HINTS = [
    ("Segs", "%", "769-0"),
    ("Bands, absolute", "K/uL", "763-3"),
    ("Neutrophils #", "10*9/L", "751-8"),
    ("ANC", "/uL", "751-8"),
    ("Leukocytes", "10^3/uL", "6690-2"),
    ("HGB", "g/L", "718-7"),
    ("PLT", "10*9/L", "777-3"),
    (None, "[degF]", "8310-5"),
    ("Hemoglobin A1c", "%", None),
    ("Mean platelet volume", "fL", None),
    ("WBC, urine", "/[HPF]", None),
    ("Lymphocytes", "%", None),
]


@pytest.mark.parametrize(("display", "unit", "loinc"), HINTS)
def test_likely_terms_from_display_and_unit(display, unit, loinc):
    """A candidate is found from display text (the unit choosing % or count, or naming a temperature);
    look-alike analytes get none."""
    from service.survey.candidates import hint

    found = hint(display, unit)
    assert (found.candidate.loinc if found is not None and found.candidate is not None else None) == loinc
