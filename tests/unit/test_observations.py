"""Observation -> LabResult | Rejected | Ignored. Sources: docs/clinical-reference.md
§1.1 (codes, mislabelled codes), §1.5 (Observation.status, comparator, dataAbsentReason,
valueString), §2 (units)."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.codes import Kind
from service.core.observations import Ignored, LabResult, ReadPolicy, Rejected, normalise
from service.fhir import model, raw
from tests.builders import normalised, observation, result


@pytest.mark.parametrize(
    ("code", "value", "unit", "kind", "expected"),
    [
        ("6690-2", 4.6, "10*9/L", Kind.WBC, 4600.0),  # FHIR DiagnosticReport/101
        ("751-8", 0.9, "10*9/L", Kind.NEUT_ABS, 900.0),  # FHIR DiagnosticReport/101
        ("770-8", 20, "%", Kind.NEUT_PCT, 20.0),  # FHIR DiagnosticReport/101
        ("753-4", 0.4, "10*3/uL", Kind.NEUT_ABS, 400.0),  # manual absolute (reference §1.1)
        ("26499-4", 1.2, "10*3/uL", Kind.NEUT_ABS, 1200.0),  # method-less absolute
        ("769-0", 15, "%", Kind.SEG_PCT, 15.0),  # segs %, manual
        ("764-1", 4, "%", Kind.BAND_PCT, 4.0),  # bands %, manual
        ("763-3", 0.2, "10*3/uL", Kind.BAND_ABS, 200.0),  # bands #, manual
        ("71676-1", 0.4, "1", Kind.NEUT_PCT, 40.0),  # pure fraction 0.40 (reference §1.1)
        ("33256-9", 3.1, "10*3/uL", Kind.WBC, 3100.0),  # nRBC-corrected WBC
    ],
)
def test_recognised_terms(code, value, unit, kind, expected):
    r = result(observation(code, value, unit))
    assert (r.kind, r.value, r.code) == (kind, pytest.approx(expected), code)


def test_loinc_found_among_other_codings_and_display_ignored():
    obs = observation("751-8", 0.9, "10*9/L")
    obs["code"]["coding"] = [
        {"system": "urn:oid:1.2.3.4.local", "code": "ANC", "display": "Neutrophils"},
        {"system": "http://loinc.org", "code": "751-8", "display": "WRONG DISPLAY: Platelets"},
    ]
    assert result(obs).kind is Kind.NEUT_ABS


def test_display_text_alone_never_matches():
    obs = observation("751-8", 0.9, "10*9/L")
    obs["code"] = {
        "coding": [{"system": "urn:local", "code": "x", "display": "Neutrophils [#/volume] in Blood"}],
        "text": "ANC",
    }
    assert normalised(obs) == Ignored("code not monitored")


def test_granulocytes_are_not_neutrophils():
    # 30394-1 / 19023-1 include eosinophils and basophils (reference §1.1, §2).
    assert normalised(observation("30394-1", 0.9)) == Ignored("granulocyte count is not an ANC")


@pytest.mark.parametrize(
    ("obs", "reason"),
    [
        # mislabelled codes found in public repos (reference §1.1): validate property and unit
        (observation("751-8", 20, "%"), "unit '%' is not a cell count unit for LOINC 751-8"),
        (observation("763-3", 4, "%"), "unit '%' is not a cell count unit for LOINC 763-3"),
        (observation("764-1", 0.3, "10*3/uL"), "unit '10*3/uL' is not a percent unit for LOINC 764-1"),
        (
            observation("751-8", 1.0, "bananas/uL"),
            "unit 'bananas/uL' is not a cell count unit for LOINC 751-8",
        ),
        (observation("751-8", 1.0, None, system=None), "no unit for LOINC 751-8"),
        (observation("770-8", 120, "%"), "percentage above 100"),
        (observation("751-8", -1, "10*3/uL"), "negative value"),
        (observation("751-8", 0.1, "10*3/uL", comparator=">"), "comparator '>' gives only a lower bound"),
        (
            observation("751-8", None, dataAbsentReason={"coding": [{"code": "error"}]}),
            "no value (dataAbsentReason error)",
        ),
        (observation("751-8", None, valueString="<0.1"), "value is text (valueString); needs manual review"),
        (observation("751-8", None), "no value"),
        (observation("751-8", 1.0, status="bogus"), "unknown status"),
        (observation("751-8", 1.0, patient="Group/g1"), "subject is not a Patient reference"),
        (observation("751-8", 1.0, effective="yesterday"), "effective time is not a FHIR dateTime"),
        (observation("751-8", 1.0, effective=None), "no effective time"),
    ],
)
def test_rejections(obs, reason):
    if obs.get("effectiveDateTime") is None:
        obs.pop("effectiveDateTime", None)
    out = normalised(obs)
    assert isinstance(out, Rejected)
    assert out.reason == reason
    assert out.ref == f"Observation/{obs['id']}"


def test_conflicting_loinc_codes_rejected():
    obs = observation("751-8", 1.0)
    obs["code"]["coding"].append({"system": "http://loinc.org", "code": "770-8"})
    assert normalised(obs).reason == "conflicting LOINC codes 751-8 and 770-8"


def test_comparator_less_than_is_the_bound():
    # "<0.1" is treated as "at most" the boundary value (reference §1.5)
    r = result(observation("751-8", 0.1, "10*3/uL", comparator="<"))
    assert (r.value, r.at_most) == (100.0, True)


@pytest.mark.parametrize(
    ("status", "assessable", "has_value"),
    [
        ("final", True, True),  # evaluate and alert
        ("amended", True, True),  # re-evaluate
        ("corrected", True, True),
        ("preliminary", False, True),  # reference §1.5: only final/amended/corrected are assessed
        ("registered", False, False),  # no result yet: kept to recognise the later update
        ("cancelled", False, False),
        ("entered-in-error", False, False),
        ("unknown", False, False),
    ],
)
def test_statuses(status, assessable, has_value):
    value = 0.4 if has_value else None
    r = result(observation("751-8", value, status=status))
    assert r.assessable is assessable


def test_reference_range_low_is_normalised():
    obs = observation(
        "751-8",
        1.2,
        referenceRange=[
            {
                "low": {
                    "value": 2.0,
                    "unit": "10*3/uL",
                    "system": "http://unitsofmeasure.org",
                    "code": "10*3/uL",
                }
            }
        ],
    )
    assert result(obs).ref_low == 2000.0


def test_absolute_patient_url_under_the_base_is_the_relative_reference():
    """An absolute subject under the server's base is the patient "Patient/<id>" (one key, however
    written: tests/unit/test_references.py); without a base it is on another server."""
    obs = msgspec.convert(
        observation("751-8", 1.2, patient="https://fhir.example.org/r4/Patient/123"), model.Resource
    )
    r = normalise(obs, ReadPolicy(base_url="https://fhir.example.org/r4"))
    assert isinstance(r, LabResult) and r.patient == "Patient/123"
    assert normalise(obs).reason == "subject is on another server"  # type: ignore[union-attr]  # a Rejected


def test_undecodable_lines_say_why_without_content():
    items = list(raw.decode(b'{"resourceType":"Observation","id":"x","valueQuantity":{"value":"Smith"}}'))
    assert len(items) == 1 and isinstance(items[0], model.Undecodable)
    assert items[0].id == "x" and "Smith" not in items[0].reason
    assert "$.valueQuantity.value" in items[0].reason
    bad = list(raw.decode(b'{"resourceType": "Observation", "id": '))
    assert isinstance(bad[0], model.Undecodable) and bad[0].reason.startswith("invalid JSON")
    assert list(raw.decode(b"\xff\xfe"))[0].reason.startswith("invalid JSON")


def test_bundle_with_one_bad_entry_keeps_the_good_ones():
    good = observation("751-8", 0.4, id="good")
    bad = observation("751-8", 0.4, id="bad")
    bad["valueQuantity"]["value"] = True  # a boolean where a number belongs
    bundle = {"resourceType": "Bundle", "entry": [{"resource": good}, {"resource": bad}]}
    items = list(raw.convert(bundle))
    assert isinstance(items[0], model.Resource) and items[0].id == "good"
    assert isinstance(items[1], model.Undecodable) and items[1].id == "bad"


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
observation_like = st.fixed_dictionaries(
    {"resourceType": st.just("Observation")},
    optional={
        "id": json_values | st.text(max_size=8),
        "status": st.sampled_from(["final", "preliminary", "x"]) | json_values,
        "code": st.just({"coding": [{"system": "http://loinc.org", "code": "751-8"}]}) | json_values,
        "subject": st.just({"reference": "Patient/1"}) | json_values,
        "effectiveDateTime": st.just("2026-01-01T00:00:00Z") | json_values,
        "valueQuantity": st.fixed_dictionaries(
            {},
            optional={
                "value": json_values,
                "unit": json_values,
                "comparator": json_values,
                "system": json_values,
                "code": json_values,
            },
        )
        | json_values,
        "meta": json_values,
        "specimen": json_values,
        "referenceRange": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(observation_like)
def test_normalising_arbitrary_json_never_raises(obj):
    for item in raw.convert(obj):
        if isinstance(item, model.Resource):
            out = normalise(item)
            assert isinstance(out, LabResult | Rejected | Ignored)
            if isinstance(out, LabResult) and out.value is not None:
                assert out.value >= 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_never_raises(data):
    for item in raw.decode(data):
        assert isinstance(item, model.Resource | model.Undecodable)


def test_undecodable_keeps_only_a_patient_subject():
    from service.core.observations import undecodable_rejection

    item = next(
        raw.decode(b'{"resourceType":"Observation","id":"g","subject":{"reference":"Group/ward"},"status":7}')
    )
    assert isinstance(item, model.Undecodable)
    rejected = undecodable_rejection(item)
    assert (rejected.ref, rejected.patient) == ("Observation/g", None)  # a Group is not a patient
    item = next(
        raw.decode(b'{"resourceType":"Observation","id":"p","subject":{"reference":"Patient/9"},"status":7}')
    )
    assert undecodable_rejection(item).patient == "Patient/9"


def test_a_rejected_local_coded_result_names_its_loinc_code_and_the_mapping():
    """A result translated by the site's ConceptMap and then rejected (here: a unit neither the site
    nor the built-in table knows, reference §2) carries the LOINC code it was read as, and its
    rejection record names the local code and the map (terminology, reference §11)."""
    from service.core.terminology import MapRow, build
    from service.output.events import rejected_record

    obs = observation("751-8", 1.2, "bags", system="http://lab.example.org/units")
    obs["code"]["coding"] = [{"system": "http://lab.example.org/codes", "code": "ANC"}]
    policy = ReadPolicy(
        terminology=build(
            [MapRow("http://lab.example.org/codes", "ANC", "751-8", "https://lab.example.org/cm")]
        )
    )
    out = normalise(msgspec.convert(obs, model.Resource), policy)
    assert isinstance(out, Rejected)
    assert (out.reason, out.code) == ("unit 'bags' is not a cell count unit for LOINC 751-8", "751-8")
    assert msgspec.to_builtins(rejected_record(out))["mapped_codes"] == [
        {
            "observation": out.ref,
            "code": "http://lab.example.org/codes|ANC",
            "concept_map": "https://lab.example.org/cm",
        }
    ]
    assert normalise(msgspec.convert(obs, model.Resource)) == Ignored("code not monitored")  # without the map
