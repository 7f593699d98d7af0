"""Authorization for FHIR requests: none, a static bearer token, or SMART Backend Services
(SMART App Launch 2.2: client_credentials grant with a `private_key_jwt` client assertion).

Secrets (token, private key, client assertion) never appear in a log line, an exception or a repr.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson
import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from pydantic import SecretStr

from service.errors import ConfigError
from service.fhir.errors import AuthError, FhirUnavailable
from service.fhir.tls import ssl_option

if TYPE_CHECKING:  # settings are only read here: no run-time import of config
    from service.config import FhirSettings, SmartSettings

log = structlog.get_logger("neutrowatch.fhir")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300  # seconds; SMART: exp no more than five minutes in the future
DEFAULT_EXPIRES_IN = 300
EXPIRY_MARGIN = 60
KEY_FIELD = "fhir.auth.smart.private_key_file"
TOKEN_FILE_FIELD = "fhir.auth.bearer_token_file"
_OAUTH_ERROR = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class Auth(Protocol):
    async def header(self) -> dict[str, str]: ...

    def invalidate(self) -> None: ...


class NoAuth:
    async def header(self) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        pass

    def __repr__(self) -> str:
        return "NoAuth()"


class BearerAuth:
    """A static token, or one read from a file (a mounted secret). Kubernetes rotates a mounted
    secret in place (an atomic symlink swap), so with a file a 401 re-reads it: `invalidate` marks
    the token stale, the next `header` reads the file again, and the client's one retry after a 401
    goes out with the new token. A file that cannot be read then keeps the token it had (logged
    with the field, never the token): the retry's 401 is raised as usual. A token given inline
    cannot be renewed: its 401 is retried once and then raised."""

    def __init__(self, token: SecretStr | str, *, path: Path | None = None) -> None:
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        self._path = path
        self._stale = False

    async def header(self) -> dict[str, str]:
        if self._stale and self._path is not None:
            self._stale = False
            try:
                token = read_token_file(self._path)
            except ConfigError as err:
                log.warning(
                    "fhir_bearer_token_file_unreadable", error=str(err), action="the previous token is kept"
                )
            else:
                if token.get_secret_value() != self._token.get_secret_value():
                    log.info("fhir_bearer_token_renewed", field=TOKEN_FILE_FIELD, after="401")
                self._token = token
        return {"Authorization": f"Bearer {self._token.get_secret_value()}"}

    def invalidate(self) -> None:
        self._stale = True

    def __repr__(self) -> str:
        return "BearerAuth(token='**********')"


def read_token_file(path: Path) -> SecretStr:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ConfigError(f"{TOKEN_FILE_FIELD}: cannot read {path}: {reason}") from None
    if not token:
        raise ConfigError(f"{TOKEN_FILE_FIELD}: {path} is empty")
    if any(ch.isspace() for ch in token):
        raise ConfigError(f"{TOKEN_FILE_FIELD}: {path} must hold one token (it contains whitespace)")
    return SecretStr(token)


def load_signing_key(path: Path, algorithm: str) -> RSAKey | ECKey:
    """The private key for `algorithm`; refuses a world-readable, unreadable or mismatched key."""
    try:
        if path.stat().st_mode & 0o004:
            raise ConfigError(f"{KEY_FIELD}: {path} is world-readable; restrict it (chmod o-rwx)")
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{KEY_FIELD}: cannot read {path}: {err.strerror or type(err).__name__}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{KEY_FIELD}: {path} is not an unencrypted PEM private key") from None
    if algorithm == "RS384" and isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ConfigError(
                f"{KEY_FIELD}: RSA key of {key.key_size} bits is too short for RS384 (need >= 2048)"
            )
        return RSAKey.import_key(key)
    if algorithm == "ES384" and isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return ECKey.import_key(key)
    wanted = "an RSA key" if algorithm == "RS384" else "an EC P-384 key"
    raise ConfigError(f"{KEY_FIELD}: algorithm {algorithm} needs {wanted}; {path} holds another kind of key")


class SmartBackendAuth:
    """Access tokens from a SMART Backend Services token endpoint, cached until shortly before they
    expire and fetched one at a time."""

    def __init__(
        self,
        settings: SmartSettings,
        *,
        base_url: str,
        session: aiohttp.ClientSession,
        timeout_seconds: float = 30.0,
        tls: ssl.SSLContext | bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.private_key_file is None or not settings.client_id:
            raise ConfigError("fhir.auth.smart: client_id and private_key_file are required")
        self._settings = settings
        self._key = load_signing_key(settings.private_key_file, settings.algorithm)
        self._base_url = base_url.rstrip("/")
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._ssl = tls
        self._clock = clock
        self._token_url: str | None = settings.token_url or None
        self._token: SecretStr | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        # `scope` of the last token response (SMART Backend Services: the scopes granted, which may be
        # fewer than requested); None when the server left it out (RFC 6749 §5.1: then as requested)
        self.granted_scope: str | None = None

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(client_id={self._settings.client_id!r}, algorithm={self._settings.algorithm})"
        )

    async def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {(await self._access_token()).get_secret_value()}"}

    def invalidate(self) -> None:
        self._token = None

    def _current(self) -> SecretStr | None:
        return self._token if self._token is not None and self._clock() < self._expires_at else None

    async def _access_token(self) -> SecretStr:
        if (token := self._current()) is not None:
            return token
        async with self._lock:
            if (token := self._current()) is not None:
                return token
            token_url = await self._endpoint()
            token, expires_in = await self._fetch_token(token_url, self._assertion(token_url))
            lifetime = expires_in - EXPIRY_MARGIN if expires_in > 2 * EXPIRY_MARGIN else expires_in / 2
            self._token, self._expires_at = token, self._clock() + lifetime
            return token

    def _assertion(self, token_url: str) -> str:
        s = self._settings
        header: dict[str, Any] = {"alg": s.algorithm, "kid": s.key_id, "typ": "JWT"}
        if s.jku:
            header["jku"] = s.jku
        now = int(self._clock())
        claims = {
            "iss": s.client_id,
            "sub": s.client_id,
            "aud": token_url,
            "exp": now + ASSERTION_LIFETIME,
            "iat": now,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(header, claims, self._key, algorithms=[s.algorithm])

    async def _endpoint(self) -> str:
        if self._token_url is None:
            url = f"{self._base_url}/.well-known/smart-configuration"
            status, doc = await self._call("GET", url, what="SMART discovery")
            if status != 200 or not isinstance(doc, dict):
                raise AuthError(
                    f"SMART discovery: {url} answered HTTP {status} without a configuration document"
                )
            https = self._base_url.startswith("https://")
            self._token_url = check_configuration(doc, self._settings.algorithm, require_https=https)
        return self._token_url

    async def _fetch_token(self, token_url: str, assertion: str) -> tuple[SecretStr, float]:
        form = {
            "grant_type": "client_credentials",
            "scope": self._settings.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
        status, doc = await self._call("POST", token_url, what="token endpoint", data=form)
        if status in (400, 401):
            code = doc.get("error") if isinstance(doc, dict) else None
            code = code if isinstance(code, str) and _OAUTH_ERROR.match(code) else "unknown error"
            raise AuthError(f"token endpoint refused the client ({status} {code})")
        if status != 200 or not isinstance(doc, dict):
            raise AuthError(f"token endpoint answered HTTP {status}")
        token, token_type = doc.get("access_token"), doc.get("token_type", "bearer")
        if not isinstance(token, str) or not token or any(ch.isspace() for ch in token):
            raise AuthError("token endpoint response has no usable access_token")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise AuthError("token endpoint returned a token that is not a bearer token")
        scope = doc.get("scope")
        self.granted_scope = scope if isinstance(scope, str) else None
        expires_in = doc.get("expires_in", DEFAULT_EXPIRES_IN)
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
            expires_in = DEFAULT_EXPIRES_IN
        return SecretStr(token), float(expires_in)

    async def _call(
        self, method: str, url: str, *, what: str, data: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """One request; transient failures become FhirUnavailable (the caller's next request retries)."""
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                headers={"Accept": "application/json"},
                timeout=self._timeout,
                ssl=self._ssl,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                status = resp.status
        except TimeoutError:
            raise FhirUnavailable(f"{what}: timeout", reason="timeout", attempts=1) from None
        except aiohttp.ClientError as err:
            raise FhirUnavailable(
                f"{what}: connection failed ({type(err).__name__})", reason="connection", attempts=1
            ) from None
        if status == 429 or status >= 500:
            raise FhirUnavailable(f"{what}: HTTP {status}", reason=str(status), attempts=1)
        try:
            return status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return status, None


def check_configuration(doc: dict[str, Any], algorithm: str, *, require_https: bool = True) -> str:
    """The token endpoint from a smart-configuration document, after checking that it supports
    client_credentials with private_key_jwt and `algorithm` (lists that are absent are not checked)."""
    endpoint = doc.get("token_endpoint")
    if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
        raise AuthError("SMART discovery: no token_endpoint in .well-known/smart-configuration")
    if require_https and not endpoint.startswith("https://"):
        raise AuthError("SMART discovery: token_endpoint is not https; the assertion would travel in clear")
    requirements = (
        ("grant_types_supported", "client_credentials"),
        ("token_endpoint_auth_methods_supported", "private_key_jwt"),
        ("token_endpoint_auth_signing_alg_values_supported", algorithm),
    )
    for field, wanted in requirements:
        offered = doc.get(field)
        if isinstance(offered, list) and wanted not in offered:
            shown = ", ".join(str(v) for v in offered)[:120]
            raise AuthError(f"SMART discovery: server does not support {wanted} ({field}: [{shown}])")
    return endpoint


def make_auth(settings: FhirSettings, session: aiohttp.ClientSession) -> Auth:
    """The Auth the settings ask for. Reads the token file or the private key now, so a broken
    secret fails at start-up with a ConfigError naming the field."""
    auth = settings.auth
    if auth.method == "bearer":
        if auth.bearer_token is not None:
            return BearerAuth(auth.bearer_token)
        assert auth.bearer_token_file is not None  # guaranteed by AuthSettings
        return BearerAuth(read_token_file(auth.bearer_token_file), path=auth.bearer_token_file)
    if auth.method == "smart":
        return SmartBackendAuth(
            auth.smart,
            base_url=settings.base_url,
            session=session,
            timeout_seconds=settings.timeout_seconds,
            tls=ssl_option(settings),
        )
    return NoAuth()
