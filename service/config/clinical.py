"""The clinical sections: thresholds, febrile neutropenia, the differential, resolution and
recurrence (`clinical.*`, docs/clinical-reference.md), and the grading scheme (`grading.*`)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from service.config.section import Section
from service.core.grading import BUILT_IN
from service.fhir.fhirtime import local_zone

_PATIENT_KEY = re.compile(r"Patient/[A-Za-z0-9\-.]{1,64}")


class PancytopeniaSettings(Section):
    hemoglobin_below_g_dl: float = Field(
        10.0, gt=0, le=25, description="Haemoglobin below this (g/dL) counts as low."
    )
    platelets_below_10e3_per_ul: float = Field(
        100.0, gt=0, le=1000, description="Platelets below this (10^3/uL) count as low."
    )


class FebrileSettings(Section):
    fever_window_hours: float = Field(
        24.0, gt=0, le=168, description="A fever counts when it lies within this many hours of the ANC."
    )
    fall_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="'Expected to fall below 500 within 48 h' proxy: an ANC < 1000 that fell by at least "
        "this fraction from the previous value (a design choice, not from a guideline).",
    )
    fall_window_hours: float = Field(
        48.0, gt=0, le=168, description="... within this many hours of the previous value."
    )


class DifferentialSettings(Section):
    neutrophil_percent_with_bands_is_segmented: bool = Field(
        False,
        description="Site rule: a neutrophil % reported with a band % in the same panel is the segmented "
        "count of a manual differential (some laboratories report segs under their neutrophil code, e.g. "
        "MIMIC item 51256), so the ANC is WBC x (neutrophil % + band %). Off: bands are never added to a "
        "neutrophil % (reference §2).",
    )


class ResolutionSettings(Section):
    """When an episode closes and when it re-opens (docs/clinical-reference.md §3 "Resolution and recurrence")."""  # noqa: E501 - rendered verbatim into values.schema.json

    confirmations: int = Field(
        3,
        ge=1,
        le=10,
        description="Normal panels in a row that confirm a resolution (default 3: CIBMTR ANC recovery, three "
        "consecutive values on different days). 1 with min_hours 0: one normal panel closes the episode.",
    )
    min_hours: float = Field(
        48.0,
        ge=0,
        le=720,
        description="Hours the confirming panels must span, first to last (default 48: values drawn more "
        "than a day apart).",
    )
    reopen_days: float = Field(
        7.0,
        ge=0,
        le=90,
        description="A neutropenic panel within this many days of an announced resolution re-opens the same "
        "episode as a recurrence (0: off; default 7, a local choice to validate).",
    )
    memory_days: float = Field(
        365.0,
        ge=0,
        le=3650,
        description='Episodes opened within this many days are counted in the texts ("3rd episode in 12 '
        'months"; 0: off).',
    )


class ClinicalSettings(Section):
    pancytopenia: PancytopeniaSettings = PancytopeniaSettings()
    febrile: FebrileSettings = FebrileSettings()
    differential: DifferentialSettings = DifferentialSettings()
    resolution: ResolutionSettings = ResolutionSettings()
    infant_threshold_per_ul: float = Field(
        1000.0, gt=0, le=5000, description="Infants (second week to 1 year): neutropenic below this."
    )
    patient_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Individual neutropenia thresholds (cells/uL) by patient reference, e.g. a documented "
        'Duffy-null associated neutrophil count baseline: {"Patient/123": 1000}.',
    )
    chronic_benign_threshold_per_ul: float | None = Field(
        1000.0,
        gt=0,
        le=5000,
        description="Threshold for patients with an active Condition 234423001 (chronic benign neutropenia); "
        "null to ignore that Condition. A local choice to validate.",
    )
    chronic_after_days: float = Field(
        91.0,
        gt=0,
        le=3650,
        description="An episode open longer than this is labelled chronic (default: more than 3 months, a "
        "local choice to validate).",
    )
    history_limit: int = Field(
        24,
        ge=2,
        le=500,
        description="Assessed panels remembered per patient, so a corrected result can be re-evaluated.",
    )
    local_timezone: str | None = Field(
        None,
        description="IANA timezone (e.g. Europe/Berlin) in which sources write collection times that carry "
        "no UTC offset. Unset: such a time is rejected ('effective time has no timezone'), never guessed as "
        "UTC. Set: it is read in this zone and the decision says so.",
    )
    collection_time_slack_minutes: float = Field(
        60.0,
        ge=0,
        le=1440,
        description="A collection time later than its result's meta.lastUpdated (or the reading clock) by "
        "more than this is rejected as impossible (clock skew between laboratory system and server is "
        "allowed for).",
    )

    @field_validator("patient_thresholds")
    @classmethod
    def _patient_keys(cls, value: dict[str, float]) -> dict[str, float]:
        # Keys are patient identities as the service keys them (reference §9): relative, unversioned.
        bad = sorted(k for k in value if not _PATIENT_KEY.fullmatch(k))
        if bad:
            raise ValueError(f"{len(bad)} key(s) are not a relative, unversioned Patient/<id> reference")
        for k, v in value.items():
            if not 0 < v <= 5000:
                raise ValueError(f"threshold for {k} must be > 0 and <= 5000 cells/uL")
        return value

    @field_validator("local_timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            local_zone(value)  # ValueError naming the zone: reported with the field's name
        return value


class GradingSettings(Section):
    scheme: str = Field("default", description="Grading scheme that turns an ANC into a band.")

    @field_validator("scheme")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BUILT_IN:
            raise ValueError(f"unknown scheme {value!r}; choose one of {sorted(BUILT_IN)}")
        return value
