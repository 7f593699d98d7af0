"""The store section: SQLite or PostgreSQL state, the DSN and where it is read from (`store.*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from service.config import pgdsn
from service.config.section import Section
from service.errors import ConfigError


class StoreSettings(Section):
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
