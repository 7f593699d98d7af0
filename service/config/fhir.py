"""The FHIR server section: base URL, TLS, limits, retries and authentication (`fhir.*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from service.config.section import Section
from service.fhir.references import base_key
from service.fhir.scopes import default_scope


class RetrySettings(Section):
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


class SmartSettings(Section):
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


class AuthSettings(Section):
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


class FhirSettings(Section):
    base_url: str = Field(
        "", description="FHIR R4 base URL, e.g. https://fhir.example.org/r4 (required by run/once)."
    )
    allow_insecure_http: bool = Field(False, description="Allow a plain http:// base URL (local tests only).")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate.")
    ca_bundle: Path | None = Field(None, description="PEM CA bundle to trust instead of the system store.")
    timeout_seconds: float = Field(30.0, gt=0, le=600, description="Timeout of one request (connect + read).")
    page_size: int = Field(
        200,
        ge=1,
        le=1000,
        description="_count of each search page. The Observation search includes the DiagnosticReports "
        "naming its results; Medplum refuses a page whose results and includes pass 1,000, so above 500 "
        "such pages are read again without the reports (counted in neutrowatch_includes_refused_total).",
    )
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
