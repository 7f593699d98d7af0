"""Unit normalisation to canonical units: cells/uL, percent, g/dL, degrees Celsius.

UCUM `code` is read first when `system` is UCUM, else the display `unit`; an unknown unit is a
rejection, never a guess. Tables: docs/clinical-reference.md §2 ("Conversion to
cells/uL") and §1.3.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache, partial

from service.core.codes import Prop

UCUM = "http://unitsofmeasure.org"

_ANNOTATION = re.compile(r"\{[^}]*\}")
_SHOWN_UNIT = re.compile(r"[^\s]{1,24}")  # what a reason repeats of a unit it does not know
_TEN_E = re.compile(r"10e(\d+)")

# Keys are unit strings after `unit_key` (annotations stripped, lower case, "x10^9" -> "10*9", µ -> u).
# "K" is kelvin in UCUM, so "K/uL" is never handed to a UCUM library; it is a display string here.
_COUNT: dict[str, float] = {
    **dict.fromkeys(
        [
            "10*3/ul",
            "10*3/mm3",
            "10*3/cumm",
            "10*3/cmm",
            "10*9/l",
            "/nl",
            "k/ul",
            "k/mm3",
            "k/cumm",
            "thou/ul",
            "thou/mm3",
            "thou/cumm",
            "thousand/ul",
            "thousands/ul",
            "thousandspermicroliter",
            "1000/ul",
            "1000/mm3",
            # "G/L" (giga per litre) and German "Gpt/L": only accepted for a LOINC count term,
            # which is the only table this dict serves (for haemoglobin g/L means grams).
            "g/l",
            "gpt/l",
        ],
        1000.0,
    ),
    **dict.fromkeys(
        [
            "/ul",
            "/mm3",
            "/cumm",
            "/cmm",
            "cells/ul",
            "cells/mm3",
            "cells/cumm",
            "cells/cmm",
            "#/ul",
            "#/mm3",
            # 10^6/L = 10^6 per 10^6 uL = 1/uL. (The reference table's "x 0.001" for this row is an
            # arithmetic slip: 1 L = 10^6 uL.)
            "10*6/l",
        ],
        1.0,
    ),
}
_PERCENT = frozenset({"%", "/100", "percent", "pct"})
_FRACTION = frozenset({"1", ""})
_MASS: dict[str, float] = {"g/dl": 1.0, "gm/dl": 1.0, "g/l": 0.1, "mmol/l": 1.611}  # Hb monomer
_CELSIUS = frozenset({"cel", "°c", "degc", "c", "celsius"})
_FAHRENHEIT = frozenset({"[degf]", "°f", "degf", "f", "fahrenheit"})


def unit_key(text: str) -> str:
    s = _ANNOTATION.sub("", text.strip())
    s = (
        s.replace("µ", "u")
        .replace("μ", "u")
        .replace("×", "x")
        .replace("³", "*3")
        .replace("⁹", "*9")
        .replace(" ", "")
        .lower()
        .replace("^", "*")
        .replace("**", "*")
    )
    if len(s) > 1 and s[0] == "x" and s[1].isdigit():
        s = s[1:]
    if "10e" in s:
        s = _TEN_E.sub(r"10*\1", s)
    return s


def known_unit(text: str) -> bool:
    """The unit (a UCUM code or a display string) is one this module converts for some property."""
    key = unit_key(text)
    return any(_convert_key(prop, key, 1.0) is not None for prop in Prop) and key not in _FRACTION


class UnitError(ValueError):
    """The unit is missing, unknown, or does not fit the term's property."""


def _convert_key(prop: Prop, key: str, value: float) -> float | None:
    if prop is Prop.COUNT:
        factor = _COUNT.get(key)
        return None if factor is None else value * factor
    if prop is Prop.PERCENT:
        return value if key in _PERCENT else None
    if prop is Prop.FRACTION:
        if key in _PERCENT:
            return value
        return value * 100.0 if key in _FRACTION else None
    if prop is Prop.MASS:
        factor = _MASS.get(key)
        return None if factor is None else value * factor
    if key in _CELSIUS:
        return value
    if key in _FAHRENHEIT:
        return (value - 32.0) * 5.0 / 9.0
    return None


def to_canonical(
    prop: Prop, value: float, *, unit: str | None, system: str | None, code: str | None
) -> float:
    """Convert `value` to the canonical unit of `prop`; raise UnitError with a reason otherwise."""
    conversion = _cached_conversion(prop, system == UCUM, code, unit)
    if isinstance(conversion, str):
        raise UnitError(conversion)
    return round(conversion(value), 6)


@lru_cache(maxsize=4096)  # a handful of units in practice; bounded against junk
def _cached_conversion(
    prop: Prop, ucum: bool, code: str | None, unit: str | None
) -> Callable[[float], float] | str:
    return _conversion(prop, unit=unit, code=code, ucum=ucum)


def _conversion(
    prop: Prop, *, unit: str | None, code: str | None, ucum: bool
) -> Callable[[float], float] | str:
    """The function converting values of this unit, or the reason there is none."""
    seen: list[str] = []
    for text in (code, unit) if ucum else (unit, code):
        if text is None:
            continue
        key = unit_key(text)
        if _convert_key(prop, key, 1.0) is not None:
            return partial(_convert_key, prop, key)  # type: ignore[return-value]  # None only by key: checked
        seen.append(text)
    if not seen:
        if prop is Prop.FRACTION:  # a pure number needs no unit
            return partial(_convert_key, prop, "1")  # type: ignore[return-value]  # "1" is a FRACTION key
        return "no unit"
    shown = seen[0] if _SHOWN_UNIT.fullmatch(seen[0]) else "…"  # a unit is a code: free text is not repeated
    return f"unit '{shown}' is not a {_PROP_NAMES[prop]} unit"


_PROP_NAMES = {
    Prop.COUNT: "cell count",
    Prop.PERCENT: "percent",
    Prop.FRACTION: "fraction",
    Prop.MASS: "haemoglobin",
    Prop.TEMP: "temperature",
}
