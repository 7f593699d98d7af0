"""Grading schemes as data: ordered ANC bands, each with a canonical severity and its own label.

The state machine compares `rank` only, so a scheme with more steps (CTCAE grade 1-4) worsens on
its own steps without any change to `transitions.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

SEVERITIES = ("mild", "moderate", "severe")


@dataclass(frozen=True, slots=True)
class Band:
    label: str  # the scheme's own name for the band, e.g. "grade 3"
    severity: str | None  # None = not neutropenic; else one of SEVERITIES
    rank: int  # 0 = normal; larger is worse
    below: float | None  # upper bound (exclusive, cells/uL); None = no upper bound
    below_lln: bool = False  # upper bound is the result's lower limit of normal (CTCAE v5 grade 1)


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    bands: tuple[Band, ...]  # ascending upper bounds, last one unbounded (the normal band)

    def grade(self, anc: float, lln: float | None = None) -> Band:
        """The band of `anc`; `lln` is the lower limit of normal reported with it, if any."""
        for band in self.bands:
            if band.below_lln:
                if lln is not None and anc < lln:
                    return band
            elif band.below is None or anc < band.below:
                return band
        raise AssertionError("scheme without an unbounded band")  # prevented by make_scheme

    @property
    def normal(self) -> Band:
        return self.bands[-1]

    def with_threshold(self, threshold: float) -> Scheme:
        """The scheme for a patient whose neutropenia starts below `threshold` (an infant, or a
        documented individual baseline): bands at or above it are normal, a band across it ends at
        it. Ranks and labels are kept, so worsening still follows the scheme's own steps."""
        bands: list[Band] = []
        lower = 0.0
        for band in self.bands[:-1]:
            if band.below_lln:
                if lower < threshold:
                    bands.append(band)
                continue
            assert band.below is not None
            if lower >= threshold:
                continue
            bands.append(replace(band, below=min(band.below, threshold)))
            lower = band.below
        return Scheme(f"{self.name}, threshold {threshold:g}", (*bands, self.bands[-1]))


class SchemeError(ValueError):
    pass


LLN = "LLN"


def make_scheme(
    name: str, thresholds: Sequence[tuple[str, str, float | str]], normal_label: str = "normal"
) -> Scheme:
    """Build a scheme from (label, severity, below) rows, worst first; anything at or above the
    last `below` is normal. The last row's `below` may be "LLN": the result's own lower limit of
    normal (a band that exists only where that limit is above the previous row's bound)."""
    if not thresholds:
        raise SchemeError(f"scheme {name!r} has no bands")
    bands: list[Band] = []
    previous = 0.0
    for index, (label, severity, below) in enumerate(thresholds):
        rank = len(thresholds) - index
        if severity not in SEVERITIES:
            raise SchemeError(f"scheme {name!r}: severity {severity!r} is not one of {SEVERITIES}")
        if below == LLN:
            if index != len(thresholds) - 1:
                raise SchemeError(f"scheme {name!r}: only the last band can end at the LLN")
            bands.append(Band(label, severity, rank, None, below_lln=True))
            continue
        if isinstance(below, str) or below <= previous:
            raise SchemeError(f"scheme {name!r}: band {label!r} must end above {previous:g}")
        bands.append(Band(label, severity, rank, float(below)))
        previous = float(below)
    bands.append(Band(normal_label, None, 0, None))
    return Scheme(name, tuple(bands))


# Seed bands (docs/clinical-reference.md §3 "Common ANC bands": neutropenia < 1500 /uL
# (UpToDate, Coates); mild 1000-1500, moderate 500-1000, severe < 500 (5-Minute Pediatric Consult)).
DEFAULT = make_scheme(
    "default",
    [("severe", "severe", 500.0), ("moderate", "moderate", 1000.0), ("mild", "mild", 1500.0)],
)

# CTCAE v5.0 "Neutrophil count decreased" (reference §3): G1 <LLN-1500, G2 <1500-1000, G3 <1000-500,
# G4 <500 /mm3. The grade 1 band needs the lower limit of normal of the result (referenceRange.low).
CTCAE_V5 = make_scheme(
    "ctcae-v5",
    [
        ("grade 4", "severe", 500.0),
        ("grade 3", "moderate", 1000.0),
        ("grade 2", "mild", 1500.0),
        ("grade 1", "mild", LLN),
    ],
)

# CTCAE v6.0 (reference §3, secondary source quoting the NCI xlsx): G1 <1500-1000, G2 <1000-500,
# G3 <500-100, G4 <100 /mm3; the LLN-1500 band is no longer graded.
CTCAE_V6 = make_scheme(
    "ctcae-v6",
    [
        ("grade 4", "severe", 100.0),
        ("grade 3", "severe", 500.0),
        ("grade 2", "moderate", 1000.0),
        ("grade 1", "mild", 1500.0),
    ],
)

BUILT_IN: Mapping[str, Scheme] = {s.name: s for s in (DEFAULT, CTCAE_V5, CTCAE_V6)}
