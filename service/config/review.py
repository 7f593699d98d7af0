"""What `check-config` reports beyond validation: a missing FHIR base URL, credentials sent without
TLS verification or in clear, scopes the configuration needs but does not request, secrets written
in the YAML file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import EnvSettingsSource

from service.config import pgdsn
from service.config.loading import config_path, field_problems, read_yaml
from service.config.settings import ENV_PREFIX, Settings
from service.fhir.scopes import missing, required, scope_string


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
    config = config_path(path)
    data = read_yaml(config) if config is not None else {}
    errors: list[str] = []
    warnings: list[str] = []
    settings: Settings | None
    try:
        settings = Settings(**data)
    except ValidationError as err:
        settings, errors = None, field_problems(err)
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
        need = required(settings.interactions())
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
