"""Settings: defaults here, overridden by a YAML file, overridden by NEUTROWATCH_* environment
variables (nested with "__", e.g. NEUTROWATCH_GRADING__SCHEME=default). Validated at start-up;
an invalid value fails with a message that names the field."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.core.grading import BUILT_IN, Scheme
from service.core.observations import ReadPolicy
from service.core.rules import Rules
from service.core.terminology import MapRow, Terminology, TerminologyError, build, concept_map_rows
from service.core.units import known_unit
from service.errors import ConfigError
from service.fhir.fhirtime import local_zone
from service.fhir.references import base_key
from service.fhir.scopes import default_scope, missing, needed_by, required, scope_string
from service.live.store import pgdsn

ENV_PREFIX = "NEUTROWATCH_"
_PATIENT_KEY = re.compile(r"Patient/[A-Za-z0-9\-.]{1,64}")
CONFIG_ENV = "NEUTROWATCH_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PancytopeniaSettings(_Section):
    hemoglobin_below_g_dl: float = Field(
        10.0, gt=0, le=25, description="Haemoglobin below this (g/dL) counts as low."
    )
    platelets_below_10e3_per_ul: float = Field(
        100.0, gt=0, le=1000, description="Platelets below this (10^3/uL) count as low."
    )


class FebrileSettings(_Section):
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


class DifferentialSettings(_Section):
    neutrophil_percent_with_bands_is_segmented: bool = Field(
        False,
        description="Site rule: a neutrophil % reported with a band % in the same panel is the segmented "
        "count of a manual differential (some laboratories report segs under their neutrophil code, e.g. "
        "MIMIC item 51256), so the ANC is WBC x (neutrophil % + band %). Off: bands are never added to a "
        "neutrophil % (reference §2).",
    )


class ResolutionSettings(_Section):
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


class ClinicalSettings(_Section):
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


class UnitMapping(_Section):
    system: str = Field(
        min_length=1, description="The Quantity.system the site writes its unit strings under."
    )
    unit: str = Field(
        min_length=1, description="The unit string (Quantity.code, else Quantity.unit) as written."
    )
    ucum: str = Field(min_length=1, description="The UCUM code it means, e.g. 10*3/uL, [degF].")

    @field_validator("ucum")
    @classmethod
    def _known(cls, value: str) -> str:
        if not known_unit(value):
            raise ValueError(
                f"{value[:40]!r} is not a unit the service converts (docs/clinical-reference.md §2)"
            )
        return value


@lru_cache(maxsize=32)
def concept_map_file_rows(path: Path) -> tuple[MapRow, ...]:
    """The translating rows of one ConceptMap JSON file; ValueError naming the file and the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from None
    except ValueError:
        raise ValueError(f"{path}: not valid JSON") from None
    try:
        return tuple(concept_map_rows(data))
    except TerminologyError as err:
        raise ValueError(f"{path}: {err}") from None


class TerminologySettings(_Section):
    concept_maps: tuple[Path, ...] = Field(
        (),
        description="FHIR R4 ConceptMap JSON files translating the site's local codes to LOINC (group.source "
        "the local system, group.target http://loinc.org; equivalence equivalent, equal, wider or subsumes "
        "translate, narrower, inexact, unmatched and disjoint do not). A mapped result is decided as its "
        "LOINC code.",
    )
    concept_map_urls: tuple[str, ...] = Field(
        (),
        description="Canonical URLs of ConceptMaps read from the FHIR server (ConceptMap?url=) at start-up "
        "and again every poll.context_ttl_seconds (live loop only; replay and explain use concept_maps).",
    )
    units: tuple[UnitMapping, ...] = Field(
        (),
        description="Local unit strings the built-in table does not know: each {system, unit, ucum}. A unit "
        "neither knows stays rejected.",
    )

    @field_validator("concept_maps")
    @classmethod
    def _readable(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        for path in value:
            concept_map_file_rows(path)  # ValueError naming the file: reported with the field's name
        return value

    def file_rows(self) -> list[MapRow]:
        return [row for path in self.concept_maps for row in concept_map_file_rows(path)]

    def terminology(self, server_rows: list[MapRow] | None = None) -> Terminology:
        """The site's terminology: the files' maps, plus the server's when the live loop has read them."""
        units = {(u.system, u.unit): u.ucum for u in self.units}
        return build([*self.file_rows(), *(server_rows or ())], units)


class GradingSettings(_Section):
    scheme: str = Field("default", description="Grading scheme that turns an ANC into a band.")

    @field_validator("scheme")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BUILT_IN:
            raise ValueError(f"unknown scheme {value!r}; choose one of {sorted(BUILT_IN)}")
        return value


class AlertSettings(_Section):
    canonical_base: str = Field(
        "https://neutrowatch.example.org/fhir",
        description="Base URL for identifier systems and profiles of what the service writes. "
        "Set it to a URL your organisation controls.",
        pattern=r"^https?://\S+[^/]$",
    )
    author: str = Field(
        "Device/neutrowatch",
        description="Reference used as Flag.author and Communication.sender (a Device or Organization).",
        pattern=r"^(Device|Organization)/[A-Za-z0-9\-.]{1,64}$",
    )
    claim_profiles: bool = Field(
        True,
        description="Written Flags, Communications and Provenance claim the project's profiles "
        "(meta.profile). A server that validates claims must hold the StructureDefinitions (`profiles "
        "install`) and let the service read them; false: no meta.profile (the extensions stay, they are "
        "valid without the profiles). Replay follows it too.",
    )
    recipients: tuple[str, ...] = Field(
        (),
        description="Fallback Communication recipients (Practitioner, PractitionerRole, CareTeam, "
        "Organization or Group references).",
    )

    @field_validator("recipients")
    @classmethod
    def _references(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        allowed = ("Practitioner/", "PractitionerRole/", "CareTeam/", "Organization/", "Group/")
        for ref in value:
            if not ref.startswith(allowed) or ref.rstrip("/") in {a.rstrip("/") for a in allowed}:
                raise ValueError(
                    f"{ref!r} is not a Practitioner, PractitionerRole, CareTeam, Organization or Group "
                    "reference"
                )
        return value


class RetrySettings(_Section):
    max_attempts: int = Field(6, ge=1, le=20, description="Attempts per request, the first included.")
    backoff_base_seconds: float = Field(
        0.5, gt=0, le=60, description="First backoff; doubles each retry, with full jitter."
    )
    backoff_max_seconds: float = Field(
        30.0, gt=0, le=600, description="Cap on one backoff, Retry-After included."
    )
    quota_window_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="The server's quota window (Medplum: points per minute). A 429 without Retry-After waits "
        "a jittered half to whole window (not the backoff schedule, not capped by backoff_max_seconds), and "
        "every other request of the client waits with it.",
    )
    max_request_retry_seconds: float = Field(
        180.0,
        gt=0,
        le=3600,
        description="Total backoff one request may spend over all its retries; a retry that would pass it "
        "gives up (the cycle fails and is redone from the cursor and the outbox).",
    )
    max_cycle_retry_seconds: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="Backoff budget of the whole client: retries stop when it is spent (a backlog never "
        "turns into a retry storm). It refills at half a second per second, and fully at the start of each "
        "poll cycle.",
    )


class SmartSettings(_Section):
    """SMART Backend Services (client_credentials with a signed JWT assertion)."""

    client_id: str = Field("", description="The client id registered with the authorisation server.")
    private_key_file: Path | None = Field(
        None, description="PEM private key (RSA for RS384, EC P-384 for ES384); must not be world-readable."
    )
    key_id: str = Field("", description="`kid` header of the assertion: the key's id in the registered JWKS.")
    algorithm: Literal["RS384", "ES384"] = Field(
        "RS384",
        description="Signature algorithm of the JWT assertion: RS384 (an RSA key) or ES384 "
        "(an EC P-384 key).",
    )
    scope: str = Field(
        default_scope(),
        description="Requested scopes (SMART v2 syntax, or v1 such as system/Flag.write). The default is "
        "exactly what the built-in configuration does (service/fhir/scopes.py); `check-config --probe` "
        "compares it with what the server grants.",
    )
    token_url: str | None = Field(
        None, description="Token endpoint; discovered from .well-known/smart-configuration when empty."
    )
    jku: str | None = Field(
        None, description="Optional `jku` header: URL of the JWKS holding the public key."
    )


class AuthSettings(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)  # the token is a secret
    method: Literal["none", "bearer", "smart"] = Field(
        "none",
        description="How requests authenticate: none; bearer (a static token, bearer_token or "
        "bearer_token_file); smart (SMART Backend Services, the smart section).",
    )
    bearer_token: SecretStr | None = Field(
        None, description="Static bearer token (set it from the environment, never in a file in the repo)."
    )
    bearer_token_file: Path | None = Field(
        None,
        description="File holding the static bearer token (a mounted secret); re-read after a 401, so a "
        "rotated secret needs no restart.",
    )
    smart: SmartSettings = SmartSettings()

    @model_validator(mode="after")
    def _complete(self) -> AuthSettings:
        if self.method == "bearer" and self.bearer_token is None and self.bearer_token_file is None:
            raise ValueError("method 'bearer' needs bearer_token or bearer_token_file")
        if self.method == "smart" and (not self.smart.client_id or self.smart.private_key_file is None):
            raise ValueError("method 'smart' needs smart.client_id and smart.private_key_file")
        return self


class FhirSettings(_Section):
    base_url: str = Field(
        "", description="FHIR R4 base URL, e.g. https://fhir.example.org/r4 (required by run/once)."
    )
    allow_insecure_http: bool = Field(False, description="Allow a plain http:// base URL (local tests only).")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate.")
    ca_bundle: Path | None = Field(None, description="PEM CA bundle to trust instead of the system store.")
    timeout_seconds: float = Field(30.0, gt=0, le=600, description="Timeout of one request (connect + read).")
    page_size: int = Field(200, ge=1, le=1000, description="_count of each search page.")
    max_concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    max_requests_per_minute: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Client-side rate limit: at most this many requests (retries included) in any 60 s; none "
        "when empty. Set it under a server quota (Medplum prices a write 100 points, a search 20, a read "
        "10).",
    )
    max_response_bytes: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        le=1024 * 1024 * 1024,
        description="Largest response body read (after decompression); a larger one is refused unread, "
        "checked against Content-Length and while the body streams in. A search page so refused fails the "
        "cycle and the cursor stays (raise this, or lower page_size). 64 MiB: a full page (page_size 1000) "
        "of Observations is 1-3 MB, and `once` reading a page just under this cap peaks at about 200 MiB (a "
        "300 MB page: about 680 MiB), well under the Helm chart's 512 MiB container limit "
        "(docs/benchmarks.md: memory).",
    )
    user_agent: str = Field("neutrowatch/0.1", description="User-Agent header.")
    max_search_url_length: int = Field(
        2048,
        ge=256,
        le=65_536,
        description="Longest search URL sent: a search whose code list would make it longer (many local "
        "codes from terminology.concept_maps) is split into several searches read as one. Servers and "
        "proxies refuse long GETs (IIS: 2048 characters of query by default).",
    )
    accepted_foreign_bases: tuple[str, ...] = Field(
        (),
        description="Federated setups only: base URLs of other FHIR servers whose patients the results may "
        "name (e.g. https://partner.example.org/fhir). Such a subject is the patient's identity as its "
        "absolute reference, and nothing about it is read from this server. A subject on any other server is "
        "rejected ('subject is on another server'), never alerted on.",
    )
    retry: RetrySettings = RetrySettings()
    auth: AuthSettings = AuthSettings()

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with https:// (or http:// with allow_insecure_http)")
        return value

    @field_validator("accepted_foreign_bases")
    @classmethod
    def _bases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if base_key(url) is None:
                raise ValueError(f"{url[:200]!r} is not an http(s) base URL (no query or fragment)")
        return tuple(url.strip().rstrip("/") for url in value)

    @model_validator(mode="after")
    def _scheme(self) -> FhirSettings:
        if self.base_url.startswith("http://") and not self.allow_insecure_http:
            raise ValueError(
                "base_url is plain http://; use https:// or set allow_insecure_http for local tests"
            )
        if self.base_url and base_key(self.base_url) in {base_key(b) for b in self.accepted_foreign_bases}:
            raise ValueError(
                "accepted_foreign_bases lists base_url itself: its references are local, not foreign"
            )
        return self


class PollSettings(_Section):
    interval_seconds: float = Field(30.0, gt=0, le=86_400, description="Time between poll cycles.")
    overlap_seconds: float = Field(
        120.0,
        ge=0,
        le=86_400,
        description="Each poll re-reads this far behind the cursor: rows become visible when their "
        "transaction commits, which can be after later rows (reference §5). Re-reads are de-duplicated.",
    )
    settle_seconds: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="An incomplete panel (no WBC, or no neutrophil result yet) waits this long for its "
        "other results before what is there is assessed.",
    )
    initial_lookback_hours: float = Field(168.0, ge=0, description="With no cursor yet, start this far back.")
    category: str | None = Field(None, description="Optional Observation category filter, e.g. laboratory.")
    patient_context: bool = Field(
        True,
        description="Read Patient.birthDate and active Conditions (age and individual thresholds), and the "
        "orders and care team for recipients; cached for context_ttl_seconds.",
    )
    context_ttl_seconds: float = Field(
        3600.0, ge=0, le=86_400 * 7, description="How long fetched patient context is reused."
    )
    max_pages_per_step: int = Field(
        5,
        ge=1,
        le=1000,
        description="A cycle reads at most this many search pages, then decides, posts and moves the cursor "
        "(a step) before it reads on, so a backlog is worked through in steps that each commit progress "
        "(/readyz: catching up). 5 pages of the default 200 are about 1,000 Observations, whose alerts "
        "(about 400 writes in a chemotherapy population) post within one readiness window (3 intervals) even "
        "at a server quota of 500 writes a minute.",
    )
    temperatures: Literal["open-episodes", "all", "off"] = Field(
        "open-episodes",
        description="Body temperatures for the febrile rule: one search per patient with an open episode "
        "each cycle (open-episodes), every temperature in the main search (all), or none (off).",
    )


class StoreSettings(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)  # the DSN is a secret
    backend: Literal["sqlite", "postgres"] = Field(
        "sqlite",
        description="sqlite: one replica, state in a local file. postgres: state in PostgreSQL; several "
        "replicas may run and one (holding an advisory lock) polls and posts.",
    )
    path: Path = Field(
        Path("neutrowatch.sqlite3"), description="SQLite state file (cursor, results, episodes, outbox)."
    )
    dsn: SecretStr | None = Field(
        None,
        description="PostgreSQL DSN: a URL with a host, e.g. postgresql://neutrowatch@db:5432/neutrowatch, "
        "or libpq keyword=value pairs (host=db dbname=neutrowatch ...). Set it from the environment: a "
        "password in it is a secret.",
    )
    dsn_file: Path | None = Field(None, description="File holding the PostgreSQL DSN (a mounted secret).")
    schema_name: str = Field(
        "neutrowatch",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema holding the tables; one per deployment "
        "(the leader lock is keyed on it).",
    )
    pool_size: int = Field(
        4, ge=2, le=64, description="PostgreSQL connections in the pool (the leader lock has its own)."
    )
    failover_check_seconds: float = Field(
        2.0,
        gt=0,
        le=60,
        description="A standby retries the leader lock this often; the leader re-checks it holds the lock "
        "this often.",
    )

    @field_validator("dsn")
    @classmethod
    def _dsn_form(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            pgdsn.parse(value.get_secret_value())  # the reason never quotes the DSN
        return value

    @model_validator(mode="after")
    def _postgres(self) -> StoreSettings:
        if self.backend == "postgres" and self.dsn is None and self.dsn_file is None:
            raise ValueError("backend 'postgres' needs dsn (NEUTROWATCH_STORE__DSN) or dsn_file")
        return self

    def postgres_dsn(self) -> str:
        """The DSN as asyncpg reads it (the keyword=value form becomes the equivalent URL), read from
        dsn_file when that is set. Never logged; a DSN of neither form is a ConfigError naming the
        field, never quoting the text."""
        return self.parsed_dsn().url

    def parsed_dsn(self) -> pgdsn.Dsn:
        if self.dsn_file is not None:
            try:
                text = self.dsn_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(
                    f"config error: store.dsn_file: {getattr(err, 'strerror', None) or type(err).__name__}"
                ) from None
            try:
                return pgdsn.parse(text)
            except ValueError as err:
                raise ConfigError(f"config error: store.dsn_file: the DSN in {self.dsn_file} {err}") from None
        assert self.dsn is not None
        return pgdsn.parse(self.dsn.get_secret_value())  # checked by _dsn_form


class WebSettings(_Section):
    host: str = Field("0.0.0.0", description="Address of the health and metrics endpoints.")
    port: int = Field(
        8080, ge=0, le=65535, description="Port of /healthz, /readyz and /metrics (0: any free port)."
    )


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="The lowest level logged."
    )
    patient_references: Literal["pseudonymised", "plain"] = Field(
        "pseudonymised",
        description="pseudonymised: every Patient/<id> in a log line becomes Patient/~<keyed hash> (logs are "
        "then not PHI); plain: references as they are (the logs tie grades and values to patients: treat "
        "them as PHI).",
    )
    pseudonym_key: SecretStr | None = Field(
        None,
        description="Key of the pseudonyms (HMAC-SHA-256); set it from the environment "
        "(NEUTROWATCH_LOGGING__PSEUDONYM_KEY), never in a file in the repo. Unset: a key per process.",
    )
    pseudonym_key_file: Path | None = Field(
        None, description="File holding the pseudonym key (a mounted secret)."
    )

    def pseudonym_key_bytes(self) -> bytes | None:
        """The configured key, read from pseudonym_key_file when that is set (never logged)."""
        if self.pseudonym_key_file is not None:
            try:
                return self.pseudonym_key_file.read_bytes().strip()
            except OSError as err:
                raise ConfigError(
                    f"config error: logging.pseudonym_key_file: {err.strerror or err}"
                ) from None
        return self.pseudonym_key.get_secret_value().encode() if self.pseudonym_key is not None else None

    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console in a terminal, JSON otherwise."
    )


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


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


class ConfigProblems(ConfigError):
    """Every problem pydantic found (not only the first), each "field: reason"; `str()` is one line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"config error{source}: {'; '.join(problems)}")


def _problems(err: ValidationError) -> list[str]:
    """One "field: reason" per error. Never the input: it may be a secret (and hide_input_in_errors
    keeps it out of str(err) as well)."""
    found = []
    for error in err.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = (
            "unknown field"
            if error["type"] == "extra_forbidden"
            else error["msg"].removeprefix("Value error, ")
        )
        found.append(f"{field}: {message}")
    return found


def _describe(err: ValidationError) -> str:
    return "; ".join(_problems(err))


def _config_path(path: str | Path | None) -> Path | None:
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    return Path(path) if path is not None else None


def load_settings(path: str | Path | None = None) -> Settings:
    """Load and validate. `path` None means $NEUTROWATCH_CONFIG if set, else built-in defaults.
    Invalid: ConfigProblems listing every error, each naming its field."""
    config = _config_path(path)
    data = _read_yaml(config) if config is not None else {}
    try:
        return Settings(**data)
    except ValidationError as err:
        raise ConfigProblems(f" in {config}" if config is not None else "", _problems(err)) from None


@dataclass(frozen=True)
class Review:
    """What `check-config` reports: the settings (None when invalid), every error (each naming its
    field) and warnings (valid, but unsafe)."""

    settings: Settings | None
    errors: list[str]
    warnings: list[str]


_INLINE = (
    "is written in the config file {path}: set it from the environment ({env}) or a mounted file ({file})"
)
_LOOPBACK = ("127.", "localhost", "[::1]")


def review_settings(path: str | Path | None = None) -> Review:
    """Load as `load_settings` does, then what only a running service would find out: no FHIR base
    URL, credentials sent without TLS verification or over plain http to another host, secrets
    written in the YAML file (which ends up in a repository, a ConfigMap, a support ticket)."""
    config = _config_path(path)
    data = _read_yaml(config) if config is not None else {}
    errors: list[str] = []
    warnings: list[str] = []
    settings: Settings | None
    try:
        settings = Settings(**data)
    except ValidationError as err:
        settings, errors = None, _problems(err)
    if settings is not None:
        base_url = settings.fhir.base_url
    else:  # the effective value as Settings would see it: the environment beats the file
        env = EnvSettingsSource(Settings)()
        base_url = _dig(env, "fhir", "base_url") or _dig(data, "fhir", "base_url") or ""
    if not str(base_url).strip() and not any(e.startswith("fhir.base_url:") for e in errors):
        errors.append(
            "fhir.base_url: required (run and once poll this FHIR server); e.g. https://fhir.example.org/r4"
        )
    if settings is not None and settings.fhir.auth.method != "none":
        fhir, credential = settings.fhir, f"fhir.auth.method is {settings.fhir.auth.method}"
        if not fhir.verify_tls:
            warnings.append(
                f"fhir.verify_tls: false while {credential}: the credential goes to any server that "
                "answers for the host (a man in the middle included); use fhir.ca_bundle for a private CA"
            )
        host = fhir.base_url.removeprefix("http://").split("/", 1)[0]
        if fhir.base_url.startswith("http://") and not host.startswith(_LOOPBACK):
            warnings.append(
                f"fhir.allow_insecure_http: plain http:// to {host} while {credential}: the credential "
                "travels in clear"
            )
    if settings is not None and settings.fhir.auth.method == "smart":
        need = required(needed_by(settings))
        lacking = missing(need, settings.fhir.auth.smart.scope)
        if lacking:
            warnings.append(
                f"fhir.auth.smart.scope lacks {' '.join(lacking)}: the server will refuse those requests "
                f"(this configuration needs {scope_string(need)})"
            )
    where = str(config) if config is not None else "the config file"
    if _dig(data, "fhir", "auth", "bearer_token"):
        warnings.append(
            "fhir.auth.bearer_token "
            + _INLINE.format(
                path=where, env=f"{ENV_PREFIX}FHIR__AUTH__BEARER_TOKEN", file="fhir.auth.bearer_token_file"
            )
        )
    if _dig(data, "logging", "pseudonym_key"):
        warnings.append(
            "logging.pseudonym_key "
            + _INLINE.format(
                path=where, env=f"{ENV_PREFIX}LOGGING__PSEUDONYM_KEY", file="logging.pseudonym_key_file"
            )
        )
    dsn = _dig(data, "store", "dsn")
    if isinstance(dsn, str) and _has_password(dsn):
        warnings.append(
            "store.dsn holds a password and "
            + _INLINE.format(path=where, env=f"{ENV_PREFIX}STORE__DSN", file="store.dsn_file")
        )
    return Review(settings, errors, warnings)


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _has_password(dsn: str) -> bool:
    try:
        return pgdsn.parse(dsn).has_password
    except ValueError:
        return "password" in dsn or "@" in dsn  # malformed (an error already): assume the worst
