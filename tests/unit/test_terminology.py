"""Site terminology: a local coding translated by a FHIR R4 ConceptMap reads exactly as the LOINC
coding it maps to; what the map does not say (narrower, inexact, unmatched, disjoint), what disagrees
with the result's own LOINC coding, and a unit the site did not map stay out or are rejected.

Sources: FHIR R4 ConceptMap (https://hl7.org/fhir/R4/conceptmap.html) and its equivalence value set
(https://hl7.org/fhir/R4/valueset-concept-map-equivalence.html): "equivalent", "equal", "wider" and
"subsumes" say the target means at least the source; "narrower", "inexact", "unmatched", "disjoint"
do not. Codes and units: docs/clinical-reference.md §1.1, §2, §11."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from service.core.anc import SEGMENTED_NEUTROPHIL_PCT, compute_anc
from service.core.codes import Kind
from service.core.observations import Ignored, LabResult, ReadPolicy, Rejected, normalise
from service.core.terminology import MapRow, TerminologyError, build, concept_map_rows
from service.fhir import model
from service.fhir.paging import Page
from service.fhir.query import MERGED, code_values, merged, split_searches
from tests.builders import observation

LOCAL = "http://lab.example.org/codes"
UNITS = "http://lab.example.org/units"
MAP_URL = "https://lab.example.org/fhir/ConceptMap/lab-to-loinc"


def concept_map(*elements: tuple[str, str | None, str], target: str = "http://loinc.org") -> dict[str, Any]:
    """A ConceptMap from LOCAL to `target` with one element per (local code, target code, equivalence)."""
    return {
        "resourceType": "ConceptMap",
        "status": "active",
        "url": MAP_URL,
        "group": [
            {
                "source": LOCAL,
                "target": target,
                "element": [
                    {"code": code, "target": [{**({"code": loinc} if loinc else {}), "equivalence": eq}]}
                    for code, loinc, eq in elements
                ],
            }
        ],
    }


def policy(
    *elements: tuple[str, str | None, str], units: dict[tuple[str, str], str] | None = None
) -> ReadPolicy:
    return ReadPolicy(terminology=build(concept_map_rows(concept_map(*elements)), units))


def local(
    code: str, value: float, unit: str = "%", *, loinc: str | None = None, unit_system: str = UNITS
) -> dict[str, Any]:
    """An Observation coded with LOCAL|code (and the LOINC coding `loinc` beside it, when given)."""
    obs = observation("770-8", value, unit, system=unit_system)
    obs["code"]["coding"] = [{"system": LOCAL, "code": code, "display": "Neutrophils"}]
    if loinc is not None:
        obs["code"]["coding"].append({"system": "http://loinc.org", "code": loinc})
    return obs


def read(obs: dict[str, Any], p: ReadPolicy) -> LabResult | Rejected | Ignored:
    return normalise(msgspec.convert(obs, model.Resource), p)


@pytest.mark.parametrize(
    ("equivalence", "translates"),
    [
        (
            "equivalent",
            True,
        ),  # R4 concept-map-equivalence: "The definitions of the concepts mean the same thing"
        ("equal", True),  # "... are exactly the same"
        ("wider", True),  # "The target mapping is wider in meaning than the source concept"
        ("subsumes", True),  # "The target mapping subsumes the meaning of the source concept"
        ("narrower", False),  # "The target mapping is narrower in meaning": deciding on it would overreach
        ("specializes", False),  # narrower, as a specialisation
        ("inexact", False),  # "overlap, but ... not the same": neither direction holds
        ("unmatched", False),  # "There is no match for this concept"
        ("disjoint", False),  # "This is an explicit assertion that there is no mapping"
        ("relatedto", False),  # related, not the same
    ],
)
def test_which_equivalences_translate(equivalence, translates):
    """Only equivalences saying the LOINC term covers the local one make the result monitored."""
    out = read(local("NEUT", 40), policy(("NEUT", "770-8", equivalence)))
    if translates:
        assert isinstance(out, LabResult) and (out.code, out.kind, out.value) == (
            "770-8",
            Kind.NEUT_PCT,
            40.0,
        )
        assert (out.mapped_from, out.concept_map) == (f"{LOCAL}|NEUT", MAP_URL)
    else:
        assert out == Ignored("code not monitored")


@pytest.mark.parametrize(
    ("codings", "expected"),
    [
        # the LOINC coding alone: read as always, no mapping named
        ([("http://loinc.org", "770-8")], ("770-8", None)),
        # the local coding alone: translated, the local code and the map named
        ([(LOCAL, "NEUT")], ("770-8", f"{LOCAL}|NEUT")),
        # both, agreeing: the LOINC coding itself says it
        ([(LOCAL, "NEUT"), ("http://loinc.org", "770-8")], ("770-8", None)),
        # both, disagreeing (map: 770-8; result: 764-1 bands): rejected, never decided on either
        (
            [(LOCAL, "NEUT"), ("http://loinc.org", "764-1")],
            "local code NEUT is mapped to LOINC 770-8, which disagrees with its other codings",
        ),
        # a local code not in the map: as before, not monitored
        ([(LOCAL, "LYMPH")], "code not monitored"),
        # two local codings mapped to different LOINC codes
        (
            [(LOCAL, "NEUT"), (LOCAL, "BAND")],
            "local code NEUT is mapped to LOINC 770-8, which disagrees with its other codings",
        ),
    ],
)
def test_local_and_loinc_codings_together(codings, expected):
    """A mapped local coding reads as its LOINC code; a LOINC coding it disagrees with is a rejection."""
    obs = local("X", 40)
    obs["code"]["coding"] = [{"system": s, "code": c} for s, c in codings]
    out = read(obs, policy(("NEUT", "770-8", "equivalent"), ("BAND", "764-1", "equivalent")))
    if isinstance(expected, tuple):
        assert isinstance(out, LabResult) and (out.code, out.mapped_from) == expected
    elif isinstance(out, Rejected):
        assert out.reason == expected
    else:
        assert out == Ignored(expected)


def test_a_mapped_result_is_the_loinc_result_but_for_the_mapping_fields():
    """Same term, value, method and everything else as the LOINC-coded twin."""
    p = policy(("ANC", "751-8", "equivalent"))
    mapped = read(local("ANC", 0.4, "10*3/uL", unit_system="http://unitsofmeasure.org"), p)
    twin = local("ANC", 0.4, "10*3/uL", unit_system="http://unitsofmeasure.org")
    twin["code"]["coding"] = [{"system": "http://loinc.org", "code": "751-8"}]
    plain = read(twin, ReadPolicy())
    assert isinstance(mapped, LabResult) and isinstance(plain, LabResult)
    assert msgspec.structs.replace(mapped, ref=plain.ref, mapped_from=None, concept_map=None) == plain


def test_a_local_code_mapped_to_a_granulocyte_count_is_not_an_anc():
    """Granulocytes (30394-1) include eosinophils and basophils (reference §1.1): never an ANC."""
    assert read(local("GRAN", 1.2, "10*3/uL"), policy(("GRAN", "30394-1", "equivalent"))) == Ignored(
        "granulocyte count is not an ANC"
    )


def test_one_local_code_mapped_to_two_loinc_codes_is_rejected():
    """Two maps (or one) giving one local code two meanings: the result is rejected, not guessed."""
    rows = [MapRow(LOCAL, "NEUT", "770-8", "a"), MapRow(LOCAL, "NEUT", "764-1", "b")]
    out = read(local("NEUT", 40), ReadPolicy(terminology=build(rows)))
    assert isinstance(out, Rejected) and out.reason == "local code NEUT is mapped to more than one LOINC code"


@pytest.mark.parametrize(
    ("unit", "units", "expected"),
    [
        ("K/uL", {}, 1200.0),  # built-in display string (reference §2): no mapping needed
        ("kilo-cells-per-uL", {(UNITS, "kilo-cells-per-uL"): "10*3/uL"}, 1200.0),  # mapped to UCUM 10*3/uL
        (
            "kilo-cells-per-uL",
            {},
            "unit 'kilo-cells-per-uL' is not a cell count unit for LOINC 751-8",
        ),  # unknown
        (
            "kilo-cells-per-uL",
            {("http://other.example.org", "kilo-cells-per-uL"): "10*3/uL"},
            "unit 'kilo-cells-per-uL' is not a cell count unit for LOINC 751-8",
        ),  # mapped under another system
        (
            "gram-per-dL",
            {(UNITS, "gram-per-dL"): "g/dL"},
            "unit 'g/dL' is not a cell count unit for LOINC 751-8",
        ),
    ],
)
def test_site_unit_strings(unit, units, expected):
    """terminology.units: a local unit string read as the UCUM code the site maps it to; one neither
    the map nor the built-in table knows stays rejected, and a mapped unit must still fit the term."""
    out = read(local("ANC", 1.2, unit), policy(("ANC", "751-8", "equivalent"), units=units))
    if isinstance(expected, float):
        assert isinstance(out, LabResult) and out.value == pytest.approx(expected)
    else:
        assert isinstance(out, Rejected) and out.reason == expected


@pytest.mark.parametrize(
    ("resource", "problem"),
    [
        ({"resourceType": "ValueSet", "status": "active"}, "not a ConceptMap resource"),
        ({"resourceType": "ConceptMap"}, "not a valid FHIR ConceptMap"),  # status is required (1..1)
        (
            {"resourceType": "ConceptMap", "status": "active", "group": [{"element": "NEUT"}]},
            "not a valid FHIR ConceptMap",
        ),
    ],
)
def test_an_unusable_concept_map_is_refused_with_the_reason(resource, problem):
    """A file or server answer that is not a valid R4 ConceptMap is refused, never half-read."""
    with pytest.raises(TerminologyError, match=problem):
        concept_map_rows(resource)


def test_groups_targeting_another_system_are_not_translations():
    """Only groups whose target is LOINC translate: a map to SNOMED CT says nothing the rules read."""
    assert (
        concept_map_rows(concept_map(("NEUT", "770-8", "equivalent"), target="http://snomed.info/sct")) == []
    )


@pytest.mark.parametrize(
    ("rule", "codes", "expected"),
    [
        # WBC 3.3, neutrophil % 30, band % 6 (MIMIC-IV demo, Patient/10035631 on 2112-09-19): bands are
        # never added to an automated neutrophil % (reference §2): 3300 x 30 % = 990, moderate
        (False, ("770-8", "764-1"), (990.0, "wbc-x-neutrophil-pct")),
        # the site rule: that neutrophil % is the manual segmented count: 3300 x (30 + 6) % = 1188, mild
        (True, ("770-8", "764-1"), (1188.0, SEGMENTED_NEUTROPHIL_PCT)),
        # without a band % the rule does not apply: an automated differential (reference §2)
        (True, ("770-8", None), (990.0, "wbc-x-neutrophil-pct")),
        # a real segs % (769-0) is used as it always was, the rule changes nothing
        (True, ("769-0", "764-1"), (1188.0, "wbc-x-segs+bands-pct")),
    ],
)
def test_differential_site_rule(rule, codes, expected):
    """clinical.differential.neutrophil_percent_with_bands_is_segmented (reference §2)."""
    neut, band = codes
    members = [observation("6690-2", 3.3), observation(neut, 30, "%")] + (
        [observation(band, 6, "%")] if band else []
    )
    results = [normalise(msgspec.convert(o, model.Resource)) for o in members]
    anc = compute_anc(results, rule)  # type: ignore[arg-type]  # normalised results, all LabResults here
    assert (anc.value, anc.method) == expected  # type: ignore[union-attr]  # the panel has an ANC


def test_live_codes_include_every_mapped_local_code_of_a_monitored_term():
    """The search asks for each monitored LOINC code and each local code translated to one of them."""
    p = policy(("NEUT", "770-8", "equivalent"), ("TEMP", "8310-5", "equivalent"))
    assert code_values(["6690-2", "770-8"], p.terminology.local_codes()) == [
        "http://loinc.org|6690-2",
        "http://loinc.org|770-8",
        f"{LOCAL}|NEUT",
    ]


@pytest.mark.parametrize("limit", [300, 600, 2048])
def test_a_long_code_list_is_split_under_the_url_limit(limit):
    """Every code is asked for exactly once, in order, and no search URL exceeds the limit (with room
    for the _lastUpdated bound the reader adds)."""
    from urllib.parse import urlencode

    url = "https://fhir.example.org/r4/Observation"
    params = [("_sort", "_lastUpdated"), ("_count", "200")]
    codes = [f"{LOCAL}|item-{n:04d}" for n in range(80)]
    searches = split_searches(url, params, codes, limit)
    asked = [c for s in searches for c in dict(s)["code"].split(",")]
    assert asked == codes
    bound = ("_lastUpdated", "ge2026-01-01T00:00:00.000000+00:00")
    assert all(len(f"{url}?{urlencode([*s, bound])}") <= limit for s in searches)
    assert (len(searches) == 1) == (
        limit >= len(f"{url}?{urlencode([('code', ','.join(codes)), *params, bound])}")
    )


async def test_split_searches_are_read_as_one_stream_in_lastupdated_order():
    """Two searches each sorted by meta.lastUpdated come out as one sorted stream in pages of the
    page size; only the last page has no next link."""

    def obs(n: int) -> model.Resource:
        return msgspec.convert(
            {
                "resourceType": "Observation",
                "id": f"o{n}",
                "meta": {"lastUpdated": f"2026-01-01T00:00:{n:02d}Z"},
            },
            model.Resource,
        )

    async def stream(numbers: list[list[int]]):
        for i, page in enumerate(numbers):
            yield Page([obs(n) for n in page], "next" if i < len(numbers) - 1 else None, "u")

    def updated(r: model.Resource | model.Undecodable) -> int | None:
        return int(r.meta.lastUpdated[17:19]) if isinstance(r, model.Resource) and r.meta else None  # type: ignore[index]  # a stamped resource

    pages = [p async for p in merged([stream([[1, 4], [6, 9]]), stream([[2, 3], [5]])], 3, updated)]
    assert [[r.id for r in p.resources] for p in pages] == [["o1", "o2", "o3"], ["o4", "o5", "o6"], ["o9"]]  # type: ignore[union-attr]  # decodable resources only
    assert [p.next_url for p in pages] == [MERGED, MERGED, None]
