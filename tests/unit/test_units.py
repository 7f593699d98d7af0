"""Unit conversion to cells/uL and percent. Sources: docs/clinical-reference.md §2,
table "Conversion to cells/uL" (UCUM essence: 10* and 10^ are the number ten; 1 L = 10^6 uL;
1 mm3 = 1 uL; "K" is kelvin in UCUM so "K/uL" is a display string) and ucum-org/ucum#90 on
{annotations}."""

import pytest

from service.core.codes import Prop
from service.core.units import UCUM, UnitError, to_canonical

COUNT_CASES = [
    # (unit, system, code, value, expected cells/uL, source)
    ("10*3/uL", UCUM, "10*3/uL", 1.5, 1500.0),  # UCUM, factor 1000 (reference §2 row 1)
    ("10^3/uL", None, None, 1.5, 1500.0),  # 10^ = 10* (ucum-essence)
    (
        "x10*9/L",
        UCUM,
        "10*9/L",
        0.9,
        900.0,
    ),  # FHIR DiagnosticReport/101 encoding: display "x10*9/L", code 10*9/L
    ("10^9/L", None, None, 0.9, 900.0),  # 10^9/L == 10^3/uL (mimic-code comment)
    ("/nL", UCUM, "/nL", 2.0, 2000.0),  # 1 nL = 10^-3 uL
    ("K/uL", None, None, 0.4, 400.0),  # display string; "K" is not UCUM (reference §2)
    ("K/uL", UCUM, "10*3/uL", 0.4, 400.0),  # display differs from code: code wins
    ("10E3/uL", None, None, 2.2, 2200.0),
    ("x10E3/uL", None, None, 2.2, 2200.0),
    ("thou/uL", None, None, 1.1, 1100.0),
    ("Thousands Per MicroLiter", UCUM, "10*3/uL", 3.0, 3000.0),  # CH EPREG example: code is UCUM
    ("10³/µL", None, None, 1.0, 1000.0),
    ("/uL", UCUM, "/uL", 1830, 1830.0),  # factor 1
    ("/mm3", UCUM, "/mm3", 480, 480.0),  # 1 mm3 = 1 uL
    ("{cells}/uL", UCUM, "{cells}/uL", 700, 700.0),  # annotation stripped (ucum#90)
    ("cells/uL", None, None, 700, 700.0),
    ("cells/mm3", None, None, 700, 700.0),
    ("10*6/L", UCUM, "10*6/L", 1500, 1500.0),  # 10^6 per 10^6 uL = 1/uL (arithmetic)
    (
        "K/uL",
        "http://fhir.mimic.mit.edu/CodeSystem/mimic-units",
        "K/uL",
        1.2,
        1200.0,
    ),  # MIMIC local system: parse unit
]


@pytest.mark.parametrize(("unit", "system", "code", "value", "expected"), COUNT_CASES)
def test_count_units(unit, system, code, value, expected):
    assert to_canonical(Prop.COUNT, value, unit=unit, system=system, code=code) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("unit", "system", "code", "reason"),
    [
        (
            "bananas/uL",
            None,
            None,
            "unit 'bananas/uL' is not a cell count unit",
        ),  # unknown: reject, never guess
        (
            "%",
            UCUM,
            "%",
            "unit '%' is not a cell count unit",
        ),  # 751-8 filed with "%" (oncology generator, reference §1.1)
        (None, None, None, "no unit"),
        ("mg/dL", UCUM, "mg/dL", "unit 'mg/dL' is not a cell count unit"),
    ],
)
def test_count_units_rejected(unit, system, code, reason):
    with pytest.raises(UnitError, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        to_canonical(Prop.COUNT, 1.0, unit=unit, system=system, code=code)


@pytest.mark.parametrize(
    ("prop", "unit", "value", "expected"),
    [
        (Prop.PERCENT, "%", 20, 20.0),  # US Core Observation-neutrophils
        (Prop.PERCENT, "/100{WBCs}", 20, 20.0),  # mCODE EquivalentUnitsVS-per-100-WBC
        (Prop.PERCENT, "%{WBCs}", 20, 20.0),
        (Prop.PERCENT, "/100", 20, 20.0),
        (Prop.FRACTION, "1", 0.40, 40.0),  # 71676-1 is a decimal fraction: 0.40, not 40 (reference §1.1)
        (Prop.FRACTION, "{fraction}", 0.40, 40.0),
        (Prop.FRACTION, "%", 40, 40.0),
        (Prop.MASS, "g/dL", 9.5, 9.5),
        (Prop.MASS, "g/L", 95, 9.5),  # DiagnosticReport/101 Hb 176 g/L -> 17.6 g/dL
        (Prop.MASS, "mmol/L", 6.2, 9.9882),  # KIP "Cytopeni": 6.2 mmol/L is about 10 g/dL
        (Prop.TEMP, "Cel", 38.3, 38.3),  # ucum-bodytemp
        (Prop.TEMP, "[degF]", 101.0, 38.333333),  # (F - 32) x 5/9 (reference §2)
        (Prop.TEMP, "[degF]", 100.4, 38.0),
    ],
)
def test_other_properties(prop, unit, value, expected):
    assert to_canonical(prop, value, unit=unit, system=UCUM, code=unit) == pytest.approx(expected, abs=1e-4)


def test_giga_per_litre_is_grams_for_haemoglobin():
    # "G/L" means 10^9/L only for a count term; for haemoglobin g/L means grams (reference §2).
    assert to_canonical(Prop.COUNT, 1.2, unit="G/L", system=None, code=None) == 1200.0
    assert to_canonical(Prop.MASS, 120, unit="g/L", system=None, code=None) == pytest.approx(12.0)
