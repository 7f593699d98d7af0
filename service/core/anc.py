"""Absolute neutrophil count for one panel (the results of one collection).

Order of preference (docs/clinical-reference.md §2, "Order of preference"):
1. a reported absolute count (753-4 manual, 26499-4, 751-8 automated);
2. absolute segmented + band counts;
3. WBC x (segmented % + band %) / 100 — manual differential (UpToDate; 5-Minute Pediatric Consult);
4. WBC x neutrophil % / 100 — automated or method-less %, which already includes bands, so bands
   are never added to it; unless the site says its neutrophil % reported beside a band % is the
   segmented count of a manual differential (`neutrophil_pct_with_bands_is_segmented`, reference §2
   "Sites that report segs under the neutrophil code"): then WBC x (neutrophil % + band %) / 100.
Plausibility gate: 0 <= ANC <= 100 000 /uL and ANC <= WBC of the same panel; else the panel is
rejected, never alerted on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.core.codes import TERMS, Kind
from service.core.observations import LabResult

PENDING_STATUSES = frozenset({"registered", "preliminary"})

ANC_MAX = 100_000.0  # cells/uL (reference §2 plausibility gate)
WBC_MAX = 1_000_000.0  # cells/uL; hyperleukocytosis beyond this is a unit error, not a result
_TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class Anc:
    value: float  # cells/uL
    at_most: bool  # an input carried "<": the true ANC is at most `value`
    method: str
    inputs: tuple[LabResult, ...]  # the results that produced the value, primary first
    wbc: float | None
    lln: float | None = None  # lower limit of normal reported with a reported absolute count


@dataclass(frozen=True, slots=True)
class PanelRejected:
    reason: str
    inputs: tuple[LabResult, ...]


def best_result(results: Iterable[LabResult], kind: Kind) -> LabResult | None:
    """The preferred term of `kind`; between two of the same term, the most recently updated."""
    best: LabResult | None = None
    best_key: tuple[int, int, str] | None = None
    for r in results:
        if r.kind is not kind or not r.assessable:
            continue
        key = (TERMS[r.code].rank, -(r.updated_us or 0), r.ref)
        if best_key is None or key < best_key:
            best, best_key = r, key
    return best


SEGMENTED_NEUTROPHIL_PCT = "wbc-x-neutrophil-pct-as-segs+bands-pct"  # the site rule applied


def compute_anc(
    results: Iterable[LabResult], neutrophil_pct_with_bands_is_segmented: bool = False
) -> Anc | PanelRejected | None:
    """None when the panel holds no neutrophil result (e.g. a CBC without differential)."""
    results = tuple(results)
    wbc = best_result(results, Kind.WBC)
    anc = _select(results, wbc, neutrophil_pct_with_bands_is_segmented)
    if anc is None or isinstance(anc, PanelRejected):
        return anc
    return _gate(anc)


def _select(
    results: tuple[LabResult, ...], wbc: LabResult | None, pct_with_bands_is_segmented: bool
) -> Anc | PanelRejected | None:
    wbc_value = wbc.value if wbc is not None else None
    direct = best_result(results, Kind.NEUT_ABS)
    if direct is not None:
        assert direct.value is not None  # best_result takes assessable results only: each has a value
        inputs: tuple[LabResult, ...] = (direct, wbc) if wbc is not None else (direct,)
        return Anc(direct.value, direct.at_most, "reported-absolute", inputs, wbc_value, direct.ref_low)
    segs_abs = best_result(results, Kind.SEG_ABS)
    if segs_abs is not None:
        bands_abs = best_result(results, Kind.BAND_ABS)
        parts = (segs_abs, bands_abs) if bands_abs is not None else (segs_abs,)
        total = sum(p.value for p in parts)  # type: ignore[misc]  # best_result: assessable, value set
        inputs = parts + ((wbc,) if wbc is not None else ())
        method = "absolute-segs+bands" if bands_abs is not None else "absolute-segs"
        return Anc(total, any(p.at_most for p in parts), method, inputs, wbc_value)
    segs_pct = best_result(results, Kind.SEG_PCT)
    neut_pct = best_result(results, Kind.NEUT_PCT)
    if segs_pct is None and neut_pct is None:
        return None
    if wbc is None or wbc_value is None:
        pct = segs_pct or neut_pct
        assert pct is not None  # one of the two, checked above
        return PanelRejected("neutrophil percentage without a WBC in the same panel", (pct,))
    return _from_percentages(results, wbc, wbc_value, pct_with_bands_is_segmented)


def _from_percentages(
    results: tuple[LabResult, ...], wbc: LabResult, wbc_value: float, pct_with_bands_is_segmented: bool
) -> Anc | PanelRejected:
    """WBC x (segs % + bands %), or WBC x neutrophil %; under the site rule a neutrophil % beside a
    band % is the segs % (reference §2 "Sites that report segs under the neutrophil code")."""
    segs_pct = best_result(results, Kind.SEG_PCT)
    neut_pct = best_result(results, Kind.NEUT_PCT)
    bands_pct = best_result(results, Kind.BAND_PCT)
    as_segs = segs_pct is None and bands_pct is not None and pct_with_bands_is_segmented
    segs = segs_pct if segs_pct is not None else (neut_pct if as_segs else None)
    parts: tuple[LabResult, ...]
    if segs is not None:
        parts = (segs, bands_pct) if bands_pct is not None else (segs,)
        pct_total = sum(p.value or 0.0 for p in parts)
        if pct_total > 100.0 + _TOLERANCE:
            return PanelRejected("segmented + band percentages exceed 100", (*parts, wbc))
        method = "wbc-x-segs+bands-pct" if bands_pct is not None else "wbc-x-segs-pct"
        method = SEGMENTED_NEUTROPHIL_PCT if as_segs else method
    else:
        assert neut_pct is not None  # _select: a segs % or a neutrophil % is present
        parts = (neut_pct,)
        pct_total = neut_pct.value or 0.0
        method = "wbc-x-neutrophil-pct"
    inputs = (*parts, wbc)
    value = wbc_value * pct_total / 100.0
    return Anc(value, any(r.at_most for r in inputs), method, inputs, wbc_value)


def _gate(anc: Anc) -> Anc | PanelRejected:
    value = round(anc.value, 3)
    if not 0.0 <= value <= ANC_MAX:
        return PanelRejected(f"implausible ANC {value:g}/uL (outside 0-100000)", anc.inputs)
    if anc.wbc is not None:
        if anc.wbc > WBC_MAX:
            return PanelRejected(f"implausible WBC {anc.wbc:g}/uL (above 1000000)", anc.inputs)
        if value > anc.wbc * (1 + _TOLERANCE):
            return PanelRejected(f"ANC {value:g}/uL exceeds WBC {anc.wbc:g}/uL", anc.inputs)
    return Anc(value, anc.at_most, anc.method, anc.inputs, anc.wbc, anc.lln)


def is_complete(results: Iterable[LabResult]) -> bool:
    """The panel holds what the ANC and its plausibility gate need (a WBC and a neutrophil result)
    and no member is still awaiting its final value (registered/preliminary: the reference's "hold
    the alert until final"). An incomplete panel is held for the settle time, then what is there
    is assessed. Body temperatures wait for nothing."""
    kinds = set()
    for r in results:
        if r.status in PENDING_STATUSES:
            return False
        if r.assessable:
            kinds.add(r.kind)
    if kinds == {Kind.TEMP}:
        return True
    if Kind.WBC not in kinds:
        return False
    return bool(kinds & {Kind.NEUT_ABS, Kind.SEG_ABS, Kind.NEUT_PCT, Kind.SEG_PCT})
