"""The sections of the running process: the poll cycle (`poll.*`), the health and metrics
endpoints (`web.*`) and logging with pseudonyms (`logging.*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from service.config.section import Section
from service.errors import ConfigError


class PollSettings(Section):
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


class WebSettings(Section):
    host: str = Field("0.0.0.0", description="Address of the health and metrics endpoints.")
    port: int = Field(
        8080, ge=0, le=65535, description="Port of /healthz, /readyz and /metrics (0: any free port)."
    )


class LoggingSettings(Section):
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
