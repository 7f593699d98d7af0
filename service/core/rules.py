"""The clinical rules in force: one value built from the configuration at the edge and handed to
the core, so replay and the live loop decide with the same rules."""

from __future__ import annotations

from dataclasses import dataclass

from service.core.grading import DEFAULT, Scheme

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US


@dataclass(frozen=True, slots=True)
class Rules:
    scheme: Scheme = DEFAULT
    # Pancytopenia cut-offs (defaults; one operational definition, the Danish KIP value set
    # "Cytopeni": Hb < 6.2 mmol/L (about 10 g/dL), platelets < 100 x 10^9/L — reference §3).
    hemoglobin_below_g_dl: float = 10.0
    platelets_below_per_ul: float = 100_000.0
    # Chronic: an episode open more than 3 months (a local default to validate).
    chronic_after_us: int = 91 * DAY_US
    # Resolution (reference §3 "Resolution and recurrence"): an episode closes only when
    # `resolution_confirmations` normal panels in a row span at least `resolution_min_us` (from the
    # first to the last). Default 3 values drawn more than a day apart: CIBMTR Forms Instruction
    # Manual, "Initial ANC recovery" (three consecutive laboratory values obtained on different
    # days; values drawn more than a day apart when not daily); ASTCT consensus (Kharfan-Dabaja,
    # Bone Marrow Transplant 2024;59:832): the first of 3 successive days after the nadir.
    # 1 and 0 give the former rule: one normal panel closes the episode.
    resolution_confirmations: int = 3
    resolution_min_us: int = 48 * HOUR_US
    # Recurrence: a neutropenic panel within this long of an announced resolution re-opens the same
    # episode (0: off; default 7 days, a local choice to validate: reference §3).
    reopen_us: int = 7 * DAY_US
    # Episode memory: episodes opened within this long are counted ("3rd episode in 12 months"; 0: off).
    memory_us: int = 365 * DAY_US
    # Assessed panels remembered per patient, so a corrected result can be re-evaluated.
    history_limit: int = 24
    # Fever (IDSA 2010, Freifeld CID 2011;52:e56; ASCO/IDSA 2018): a single temperature >= 38.3 C,
    # or >= 38.0 C sustained over 1 h (reference §3).
    fever_single_c: float = 38.3
    fever_sustained_c: float = 38.0
    fever_sustained_us: int = HOUR_US
    # Febrile neutropenia: fever while ANC < 500, or ANC < 1000 and expected to fall below 500 within
    # 48 h (IDSA 2010); the "expected to fall" proxy is a design choice: a fall of >= 50 % from the
    # previous value within 48 h. The fever must lie within 24 h of the ANC (default; reference §3
    # "Febrile neutropenia").
    febrile_anc_below: float = 500.0
    febrile_falling_anc_below: float = 1000.0
    febrile_fall_fraction: float = 0.5
    febrile_fall_window_us: int = 48 * HOUR_US
    fever_window_us: int = 24 * HOUR_US
    # Temperatures remembered per patient (fever.remembered_temperatures), chosen by COLLECTION
    # time, never by arrival: every reading from (the oldest remembered assessment, or the newest
    # panel if older, - fever_window_us - fever_sustained_us) on, readings collected after the newest
    # panel included (they may pair with a CBC not read yet), plus the last one before (it carries a
    # sustained run under way); over the cap the earliest collected go first. Within that horizon
    # the fevers (IDSA 2010, Freifeld CID 2011;52:e56) are those of the whole record, so a panel that
    # may yet be judged finds its fever whatever the order the readings arrived in.
    temperature_memory_cap: int = 2048
    # Age (reference §3 "Paediatrics"): the first week of life is out of scope; infants up to 1 year
    # are neutropenic below 1000/uL (the source covers 2 weeks-1 year; the second week takes the
    # nearer infant rule).
    neonate_days: int = 7
    infant_until_days: int = 365
    infant_threshold: float = 1000.0
    # Individual thresholds (cells/uL): configured per patient reference, or for an active Condition
    # 234423001 (chronic benign neutropenia) the site's threshold (None: that Condition is ignored).
    patient_thresholds: tuple[tuple[str, float], ...] = ()
    chronic_benign_threshold: float | None = 1000.0
    # Plausible collection times (docs/clinical-reference.md, "Collection time"): a specimen is
    # collected before its result is recorded, so a collection time later than the result's
    # meta.lastUpdated (or, without one, the reading clock) by more than this slack is impossible
    # (clock skew between the laboratory system and the server is allowed for); one earlier than the
    # patient's birth date (less a day: a date has no timezone) or than 1900 is a typing error.
    collection_slack_us: int = HOUR_US
    earliest_collection_us: int = -2_208_988_800_000_000  # 1900-01-01T00:00:00Z
    # A site rule (reference §2 "Sites that report segs under the neutrophil code"): a neutrophil %
    # reported with a band % in the same panel is the segmented count of a manual differential.
    neutrophil_pct_with_bands_is_segmented: bool = False
