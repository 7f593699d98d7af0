"""The settings as a whole: every section, where values come from (the environment beats the file),
and what the core is given: the rules and the read policy."""

from __future__ import annotations

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.config.alerts import AlertSettings
from service.config.clinical import ClinicalSettings, GradingSettings
from service.config.fhir import FhirSettings
from service.config.process import LoggingSettings, PollSettings, WebSettings
from service.config.store import StoreSettings
from service.config.terminology import TerminologySettings
from service.core.grading import BUILT_IN, Scheme
from service.core.observations import ReadPolicy
from service.core.rules import Rules
from service.fhir.scopes import Interaction, interactions

ENV_PREFIX = "NEUTROWATCH_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    fhir: FhirSettings = FhirSettings()
    poll: PollSettings = PollSettings()
    store: StoreSettings = StoreSettings()
    web: WebSettings = WebSettings()
    grading: GradingSettings = GradingSettings()
    clinical: ClinicalSettings = ClinicalSettings()
    alerts: AlertSettings = AlertSettings()
    logging: LoggingSettings = LoggingSettings()
    terminology: TerminologySettings = TerminologySettings()

    @property
    def scheme(self) -> Scheme:
        return BUILT_IN[self.grading.scheme]

    @property
    def rules(self) -> Rules:
        c = self.clinical
        return Rules(
            scheme=self.scheme,
            hemoglobin_below_g_dl=c.pancytopenia.hemoglobin_below_g_dl,
            platelets_below_per_ul=c.pancytopenia.platelets_below_10e3_per_ul * 1000.0,
            chronic_after_us=int(c.chronic_after_days * 86_400_000_000),
            history_limit=c.history_limit,
            febrile_fall_fraction=c.febrile.fall_fraction,
            resolution_confirmations=c.resolution.confirmations,
            resolution_min_us=int(c.resolution.min_hours * 3_600_000_000),
            reopen_us=int(c.resolution.reopen_days * 86_400_000_000),
            memory_us=int(c.resolution.memory_days * 86_400_000_000),
            febrile_fall_window_us=int(c.febrile.fall_window_hours * 3_600_000_000),
            fever_window_us=int(c.febrile.fever_window_hours * 3_600_000_000),
            infant_threshold=c.infant_threshold_per_ul,
            patient_thresholds=tuple(sorted(c.patient_thresholds.items())),
            chronic_benign_threshold=c.chronic_benign_threshold_per_ul,
            collection_slack_us=int(c.collection_time_slack_minutes * 60_000_000),
            neutrophil_pct_with_bands_is_segmented=c.differential.neutrophil_percent_with_bands_is_segmented,
        )

    @property
    def read_policy(self) -> ReadPolicy:
        """How Observations are read (replay and the live loop alike). Replay has no server: its base is
        fhir.base_url when configured, else every absolute reference is foreign unless accepted."""
        return ReadPolicy(
            local_timezone=self.clinical.local_timezone,
            base_url=self.fhir.base_url or None,
            accepted_foreign_bases=self.fhir.accepted_foreign_bases,
            terminology=self.terminology.terminology(),
        )

    def interactions(self) -> list[Interaction]:
        """The live loop's interactions with the FHIR server under these settings (what its SMART scope
        must grant)."""
        return interactions(
            patient_context=self.poll.patient_context,
            conditions=self.clinical.chronic_benign_threshold_per_ul is not None,
            claim_profiles=self.alerts.claim_profiles,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (init_settings carries the YAML), so a deployment can override one value.
        return env_settings, init_settings
