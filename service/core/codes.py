"""LOINC terms neutrowatch understands, and what each one means for the ANC.

Match on system + code, never on display text. Sources are in
docs/clinical-reference.md §1 (LOINC tables, panel value sets) and §2 (ANC rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

LOINC = "http://loinc.org"


class Kind(StrEnum):
    WBC = "wbc"
    NEUT_PCT = "neutrophils_pct"
    SEG_PCT = "segs_pct"
    BAND_PCT = "bands_pct"
    NEUT_ABS = "neutrophils_abs"
    SEG_ABS = "segs_abs"
    BAND_ABS = "bands_abs"
    HGB = "hemoglobin"
    PLT = "platelets"
    TEMP = "temperature"


class Prop(StrEnum):
    """LOINC property, which decides the units a result may carry."""

    COUNT = "NCnc"  # number concentration, canonical cells/uL
    PERCENT = "NFr"  # number fraction in %, canonical percent
    FRACTION = "NFr.DF"  # number fraction as a decimal (0.40), canonical percent
    MASS = "MCnc"  # haemoglobin, canonical g/dL
    TEMP = "Temp"  # canonical degrees Celsius


class Method(StrEnum):
    AUTOMATED = "automated"
    MANUAL = "manual"
    UNSPECIFIED = "unspecified"
    ESTIMATE = "estimate"


@dataclass(frozen=True, slots=True)
class Term:
    code: str
    kind: Kind
    prop: Prop
    method: Method
    rank: int  # preference among terms of the same kind in one panel: lower wins


def _terms(*rows: tuple[str, Kind, Prop, Method]) -> dict[str, Term]:
    table: dict[str, Term] = {}
    rank_by_kind: dict[Kind, int] = {}
    for code, kind, prop, method in rows:
        rank = rank_by_kind.get(kind, 0)
        rank_by_kind[kind] = rank + 1
        table[code] = Term(code, kind, prop, method, rank)
    return table


_A, _M, _U, _E = Method.AUTOMATED, Method.MANUAL, Method.UNSPECIFIED, Method.ESTIMATE

# Order within a kind is the preference order when a panel holds more than one term of that kind.
TERMS: dict[str, Term] = _terms(
    # WBC: nRBC-corrected counts first (reference §2: "Use a corrected WBC (33256-9) when nRBCs are
    # present"); 6690-2 is the usual automated count; 26464-8 method-less; manual and estimate last.
    ("33256-9", Kind.WBC, Prop.COUNT, _A),
    ("12227-5", Kind.WBC, Prop.COUNT, _M),
    ("6690-2", Kind.WBC, Prop.COUNT, _A),
    ("26464-8", Kind.WBC, Prop.COUNT, _U),
    ("804-5", Kind.WBC, Prop.COUNT, _M),
    ("49498-9", Kind.WBC, Prop.COUNT, _E),
    # Absolute neutrophils. A manual count is made when the analyser flagged the sample, so it wins.
    ("753-4", Kind.NEUT_ABS, Prop.COUNT, _M),
    ("26499-4", Kind.NEUT_ABS, Prop.COUNT, _U),
    ("751-8", Kind.NEUT_ABS, Prop.COUNT, _A),
    # Absolute segmented and band neutrophils (ANC = segs + bands).
    ("768-2", Kind.SEG_ABS, Prop.COUNT, _M),
    ("30451-9", Kind.SEG_ABS, Prop.COUNT, _U),
    ("763-3", Kind.BAND_ABS, Prop.COUNT, _M),
    ("26507-4", Kind.BAND_ABS, Prop.COUNT, _U),
    ("30229-9", Kind.BAND_ABS, Prop.COUNT, _A),
    # Neutrophil percent (total neutrophils; the analyser's 770-8 usually already includes bands).
    ("23761-0", Kind.NEUT_PCT, Prop.PERCENT, _M),
    ("26511-6", Kind.NEUT_PCT, Prop.PERCENT, _U),
    ("770-8", Kind.NEUT_PCT, Prop.PERCENT, _A),
    ("71676-1", Kind.NEUT_PCT, Prop.FRACTION, _A),
    # Manual differential: segmented % + band %.
    ("769-0", Kind.SEG_PCT, Prop.PERCENT, _M),
    ("26505-8", Kind.SEG_PCT, Prop.PERCENT, _U),
    ("764-1", Kind.BAND_PCT, Prop.PERCENT, _M),
    ("26508-2", Kind.BAND_PCT, Prop.PERCENT, _U),
    ("35332-6", Kind.BAND_PCT, Prop.PERCENT, _A),
    # Companions for pancytopenia (reference §1.3) — carried in panels, not used for the ANC.
    ("718-7", Kind.HGB, Prop.MASS, _U),
    ("777-3", Kind.PLT, Prop.COUNT, _A),
    ("26515-7", Kind.PLT, Prop.COUNT, _U),
    # Body temperature (febrile neutropenia, reference §1.3). 8310-5 generic; oral, rectal, tympanic,
    # axillary.
    ("8310-5", Kind.TEMP, Prop.TEMP, _U),
    ("8331-1", Kind.TEMP, Prop.TEMP, _U),
    ("8332-9", Kind.TEMP, Prop.TEMP, _U),
    ("8333-7", Kind.TEMP, Prop.TEMP, _U),
    ("8328-7", Kind.TEMP, Prop.TEMP, _U),
)

# Granulocyte counts include eosinophils and basophils: they are never an ANC (reference §1.1, §2).
NOT_NEUTROPHILS: frozenset[str] = frozenset({"30394-1", "19023-1"})

CBC_KINDS: frozenset[Kind] = frozenset(k for k in Kind if k is not Kind.TEMP)


def cbc_codes() -> list[str]:
    """The LOINC codes the poller asks the server for (every CBC term this module knows)."""
    return [t.code for t in TERMS.values() if t.kind in CBC_KINDS]


def temperature_codes() -> list[str]:
    return [t.code for t in TERMS.values() if t.kind is Kind.TEMP]
