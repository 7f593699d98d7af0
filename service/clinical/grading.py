"""Grading schemes as data: ordered ANC bands, each with a canonical severity and its own label.

The state machine compares `rank` only, so a scheme with more steps (CTCAE grade 1-4) worsens on
its own steps without any change to `episodes.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SEVERITIES = ("mild", "moderate", "severe")


@dataclass(frozen=True, slots=True)
class Band:
    label: str  # the scheme's own name for the band, e.g. "grade 3"
    severity: str | None  # None = not neutropenic; else one of SEVERITIES
    rank: int  # 0 = normal; larger is worse
    below: float | None  # upper bound (exclusive, cells/uL); None = no upper bound


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    bands: tuple[Band, ...]  # ascending upper bounds, last one unbounded (the normal band)

    def grade(self, anc: float) -> Band:
        for band in self.bands:
            if band.below is None or anc < band.below:
                return band
        raise AssertionError("scheme without an unbounded band")  # prevented by make_scheme

    @property
    def normal(self) -> Band:
        return self.bands[-1]


class SchemeError(ValueError):
    pass


def make_scheme(name: str, thresholds: Sequence[tuple[str, str, float]], normal_label: str = "normal") -> Scheme:
    """Build a scheme from (label, severity, below) rows, worst first; anything at or above the
    last `below` is normal."""
    if not thresholds:
        raise SchemeError(f"scheme {name!r} has no bands")
    bands: list[Band] = []
    previous = 0.0
    for index, (label, severity, below) in enumerate(thresholds):
        if severity not in SEVERITIES:
            raise SchemeError(f"scheme {name!r}: severity {severity!r} is not one of {SEVERITIES}")
        if below <= previous:
            raise SchemeError(f"scheme {name!r}: band {label!r} must end above {previous:g}")
        bands.append(Band(label, severity, len(thresholds) - index, float(below)))
        previous = below
    bands.append(Band(normal_label, None, 0, None))
    return Scheme(name, tuple(bands))


# Seed bands (shared/reference/clinical-and-fhir.md §3 "Common ANC bands": neutropenia < 1500 /uL
# (UpToDate, Coates); mild 1000-1500, moderate 500-1000, severe < 500 (5-Minute Pediatric Consult)).
DEFAULT = make_scheme(
    "default",
    [("severe", "severe", 500.0), ("moderate", "moderate", 1000.0), ("mild", "mild", 1500.0)],
)

BUILT_IN: Mapping[str, Scheme] = {DEFAULT.name: DEFAULT}
