"""Settings: defaults here, overridden by a YAML file, overridden by NEUTROWATCH_* environment
variables (nested with "__", e.g. NEUTROWATCH_GRADING__SCHEME=default). Validated at start-up;
an invalid value fails with a message that names the field.

The package's public front door: the sections (one module per area), the whole (`settings`),
loading (`loading`) and the start-up review (`review`)."""

from service.config.alerts import AlertSettings
from service.config.clinical import (
    ClinicalSettings,
    DifferentialSettings,
    FebrileSettings,
    GradingSettings,
    PancytopeniaSettings,
    ResolutionSettings,
)
from service.config.fhir import AuthSettings, FhirSettings, RetrySettings, SmartSettings
from service.config.loading import CONFIG_ENV, ConfigProblems, load_settings
from service.config.process import LoggingSettings, PollSettings, WebSettings
from service.config.review import Review, review_settings
from service.config.settings import ENV_PREFIX, Settings
from service.config.store import StoreSettings
from service.config.terminology import TerminologySettings, UnitMapping, concept_map_file_rows

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "AlertSettings",
    "AuthSettings",
    "ClinicalSettings",
    "ConfigProblems",
    "DifferentialSettings",
    "FebrileSettings",
    "FhirSettings",
    "GradingSettings",
    "LoggingSettings",
    "PancytopeniaSettings",
    "PollSettings",
    "ResolutionSettings",
    "RetrySettings",
    "Review",
    "Settings",
    "SmartSettings",
    "StoreSettings",
    "TerminologySettings",
    "UnitMapping",
    "WebSettings",
    "concept_map_file_rows",
    "load_settings",
    "review_settings",
]
