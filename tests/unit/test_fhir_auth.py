"""Authentication of the FHIR client: static bearer token, and SMART Backend Services against a
local token endpoint that verifies each client assertion with joserfc and the public key."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from pydantic import SecretStr

from service.config import AuthSettings, FhirSettings, SmartSettings
from service.errors import ConfigError, NeutrowatchError
from service.fhir.auth import (
    BearerAuth,
    NoAuth,
    SmartBackendAuth,
    check_configuration,
    make_auth,
)
from service.fhir.errors import AuthError, FhirUnavailable

pytestmark = pytest.mark.asyncio(loop_scope="session")

CLIENT_ID = "neutrowatch-test"
KID = "key-1"
Alg = Literal["RS384", "ES384"]
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# -- keys ------------------------------------------------------------------------------------------


def _pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def write_key(directory: Path, key: Any, mode: int = 0o600, name: str = "key.pem") -> Path:
    path = directory / name
    path.write_bytes(_pem(key))
    path.chmod(mode)
    return path


# -- the authorisation server ----------------------------------------------------------------------


@dataclass
class TokenServer:
    """smart-configuration + token endpoint; verifies every assertion it receives."""

    public_key: RSAKey | ECKey | None = None
    algorithm: Alg = "RS384"
    base: str = ""
    configuration: dict[str, Any] | None = None
    expires_in: int | None = 300
    refuse: tuple[int, dict[str, Any]] | None = None
    tokens_issued: int = 0
    discoveries: int = 0
    jtis: list[str] = field(default_factory=list)
    headers: list[dict[str, Any]] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    clock: Callable[[], float] = time.time  # the server's "now" (tests that inject a clock share it)

    @property
    def token_url(self) -> str:
        return f"{self.base}/auth/token"

    async def smart_configuration(self, request: web.Request) -> web.Response:
        self.discoveries += 1
        doc = (
            self.configuration
            if self.configuration is not None
            else {
                "token_endpoint": self.token_url,
                "grant_types_supported": ["client_credentials", "authorization_code"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            }
        )
        return web.json_response(doc)

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.forms.append({k: str(v) for k, v in form.items()})
        try:
            self._verify(form)
        except Exception as err:  # noqa: BLE001 - reported to the test, answered like a real server
            self.failures.append(f"{type(err).__name__}: {err}")
            return web.json_response({"error": "invalid_client"}, status=401)
        if self.refuse is not None:
            status, body = self.refuse
            return web.json_response(body, status=status)
        self.tokens_issued += 1
        answer: dict[str, Any] = {
            "access_token": f"token-{self.tokens_issued}",
            "token_type": "Bearer",
            "scope": form["scope"],
        }
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return web.json_response(answer)

    def _verify(self, form: dict[str, Any]) -> None:
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == ASSERTION_TYPE
        assert form["scope"]
        assert self.public_key is not None
        token = jwt.decode(form["client_assertion"], self.public_key, algorithms=[self.algorithm])
        header, claims = token.header, token.claims
        self.headers.append(header)
        assert header["alg"] == self.algorithm
        assert header["kid"] == KID
        assert header["typ"] == "JWT"
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self.clock()),
            iss={"essential": True, "value": CLIENT_ID},
            sub={"essential": True, "value": CLIENT_ID},
            aud={"essential": True, "value": self.token_url},
            exp={"essential": True},
            jti={"essential": True},
        )
        registry.validate(claims)  # exp not in the past, iat not in the future
        assert claims["exp"] <= self.clock() + 300, "exp more than five minutes ahead"
        assert claims["exp"] - claims["iat"] <= 300
        assert claims["jti"] not in self.jtis, "jti reused"
        self.jtis.append(claims["jti"])


@pytest.fixture
async def token_server() -> AsyncIterator[TokenServer]:
    state = TokenServer()
    app = web.Application()
    app.router.add_get("/fhir/.well-known/smart-configuration", state.smart_configuration)
    app.router.add_post("/auth/token", state.token)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.base = str(server.make_url("")).rstrip("/")
    try:
        yield state
    finally:
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def smart_auth(
    server: TokenServer,
    session: aiohttp.ClientSession,
    key_file: Path,
    *,
    algorithm: Alg = "RS384",
    token_url: str | None = None,
    jku: str | None = None,
    clock: Callable[[], float] = time.time,
) -> SmartBackendAuth:
    settings = SmartSettings(
        client_id=CLIENT_ID,
        private_key_file=key_file,
        key_id=KID,
        algorithm=algorithm,
        token_url=token_url,
        jku=jku,
    )
    return SmartBackendAuth(settings, base_url=f"{server.base}/fhir", session=session, clock=clock)


@pytest.fixture
def rsa_setup(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, token_server: TokenServer) -> Path:
    token_server.public_key = RSAKey.import_key(rsa_key.public_key())
    token_server.algorithm = "RS384"
    return write_key(tmp_path, rsa_key)


# -- SMART Backend Services ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
async def test_assertion_verifies_and_token_is_used(
    algorithm: Alg,
    tmp_path: Path,
    rsa_key: Any,
    ec_key: Any,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
) -> None:
    key = rsa_key if algorithm == "RS384" else ec_key
    token_server.public_key = (RSAKey if algorithm == "RS384" else ECKey).import_key(key.public_key())
    token_server.algorithm = algorithm
    auth = smart_auth(token_server, session, write_key(tmp_path, key), algorithm=algorithm)

    assert await auth.header() == {"Authorization": "Bearer token-1"}
    assert token_server.failures == []
    assert token_server.discoveries == 1
    assert token_server.forms[0]["scope"] == SmartSettings().scope
    assert "jku" not in token_server.headers[0]


async def test_jku_header_and_configured_token_url_skip_discovery(
    rsa_setup: Path,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
) -> None:
    auth = smart_auth(
        token_server,
        session,
        rsa_setup,
        token_url=token_server.token_url,
        jku="https://example.org/jwks.json",
    )
    await auth.header()
    assert token_server.failures == []
    assert token_server.discoveries == 0
    assert token_server.headers[0]["jku"] == "https://example.org/jwks.json"


async def test_token_is_cached_and_fetched_once_under_concurrency(
    rsa_setup: Path,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
) -> None:
    auth = smart_auth(token_server, session, rsa_setup)
    headers = await asyncio.gather(*(auth.header() for _ in range(5)))
    headers.append(await auth.header())
    assert {h["Authorization"] for h in headers} == {"Bearer token-1"}
    assert token_server.tokens_issued == 1
    assert token_server.discoveries == 1


async def test_token_re_minted_after_expiry(
    rsa_setup: Path, token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    clock = token_server.clock = Clock()
    auth = smart_auth(token_server, session, rsa_setup, clock=clock)
    await auth.header()
    clock.now += 239  # expires_in 300 minus a 60 s margin
    assert await auth.header() == {"Authorization": "Bearer token-1"}
    clock.now += 2
    assert await auth.header() == {"Authorization": "Bearer token-2"}
    assert token_server.tokens_issued == 2
    assert len(set(token_server.jtis)) == 2
    assert token_server.failures == []


async def test_default_lifetime_without_expires_in(
    rsa_setup: Path, token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    token_server.expires_in = None
    clock = token_server.clock = Clock()
    auth = smart_auth(token_server, session, rsa_setup, clock=clock)
    await auth.header()
    clock.now += 230
    await auth.header()
    assert token_server.tokens_issued == 1
    clock.now += 20
    await auth.header()
    assert token_server.tokens_issued == 2


async def test_invalidate_re_mints(
    rsa_setup: Path, token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    auth = smart_auth(token_server, session, rsa_setup)
    assert await auth.header() == {"Authorization": "Bearer token-1"}
    auth.invalidate()
    assert await auth.header() == {"Authorization": "Bearer token-2"}
    assert token_server.discoveries == 1  # the endpoint is remembered


async def test_token_endpoint_error_keeps_to_the_oauth_code(
    rsa_setup: Path,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
) -> None:
    token_server.refuse = (
        400,
        {"error": "invalid_scope", "error_description": "assertion eyJsecret was bad"},
    )
    auth = smart_auth(token_server, session, rsa_setup)
    with pytest.raises(AuthError) as caught:
        await auth.header()
    message = str(caught.value)
    assert "invalid_scope" in message
    assert "eyJ" not in message and "secret" not in message
    assert token_server.forms[0]["client_assertion"] not in message + repr(caught.value)


async def test_wrong_key_answers_invalid_client(
    tmp_path: Path,
    rsa_key: Any,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
) -> None:
    token_server.public_key = RSAKey.import_key(rsa.generate_private_key(65537, 2048).public_key())
    auth = smart_auth(token_server, session, write_key(tmp_path, rsa_key))
    with pytest.raises(AuthError, match="invalid_client"):
        await auth.header()
    assert token_server.failures and "signature" in token_server.failures[0].lower()


async def test_token_endpoint_outage_is_unavailable(
    rsa_setup: Path, token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    token_server.refuse = (503, {})
    with pytest.raises(FhirUnavailable, match="503"):
        await smart_auth(token_server, session, rsa_setup).header()


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"token_endpoint_auth_methods_supported": ["client_secret_basic"]}, "private_key_jwt"),
        ({"token_endpoint_auth_signing_alg_values_supported": ["RS256"]}, "RS384"),
        ({"grant_types_supported": ["authorization_code"]}, "client_credentials"),
        ({"token_endpoint": None}, "token_endpoint"),
    ],
)
async def test_discovery_refuses_unsupported_server(
    change: dict[str, Any],
    complaint: str,
    rsa_setup: Path,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
) -> None:
    token_server.configuration = {
        "token_endpoint": token_server.token_url,
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384"],
        **change,
    }
    with pytest.raises(AuthError, match=complaint):
        await smart_auth(token_server, session, rsa_setup).header()
    assert token_server.forms == []


async def test_plain_http_token_endpoint_refused_for_https_base() -> None:
    with pytest.raises(AuthError, match="not https"):
        check_configuration({"token_endpoint": "http://as.example/token"}, "RS384", require_https=True)
    assert check_configuration({"token_endpoint": "http://127.0.0.1/token"}, "RS384", require_https=False)


async def test_discovery_lists_absent_are_not_checked() -> None:
    assert (
        check_configuration({"token_endpoint": "https://as.example/token"}, "ES384")
        == "https://as.example/token"
    )


# -- the private key -------------------------------------------------------------------------------


def _settings(key_file: Path, algorithm: Alg = "RS384") -> FhirSettings:
    smart = SmartSettings(client_id=CLIENT_ID, private_key_file=key_file, key_id=KID, algorithm=algorithm)
    return FhirSettings(
        base_url="https://fhir.example.org/r4", auth=AuthSettings(method="smart", smart=smart)
    )


async def test_world_readable_key_refused(
    tmp_path: Path, rsa_key: Any, session: aiohttp.ClientSession
) -> None:
    key_file = write_key(tmp_path, rsa_key, mode=0o644)
    with pytest.raises(ConfigError, match=r"fhir\.auth\.smart\.private_key_file.*world-readable"):
        make_auth(_settings(key_file), session)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
async def test_unreadable_key_refused(tmp_path: Path, rsa_key: Any, session: aiohttp.ClientSession) -> None:
    key_file = write_key(tmp_path, rsa_key, mode=0o000)
    with pytest.raises(ConfigError, match=r"fhir\.auth\.smart\.private_key_file.*cannot read"):
        make_auth(_settings(key_file), session)


async def test_key_path_that_cannot_be_read_refused(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    directory = tmp_path / "key.pem"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=r"fhir\.auth\.smart\.private_key_file.*cannot read"):
        make_auth(_settings(directory), session)


async def test_missing_key_refused(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    with pytest.raises(ConfigError, match=r"fhir\.auth\.smart\.private_key_file.*cannot read"):
        make_auth(_settings(tmp_path / "absent.pem"), session)


@pytest.mark.parametrize(
    ("algorithm", "make_key"),
    [
        ("RS384", lambda: ec.generate_private_key(ec.SECP384R1())),
        ("ES384", lambda: rsa.generate_private_key(65537, 2048)),
        ("ES384", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("RS384", lambda: rsa.generate_private_key(65537, 1024)),
    ],
    ids=["ec-for-rs384", "rsa-for-es384", "p256-for-es384", "short-rsa"],
)
async def test_wrong_key_type_refused(
    algorithm: Alg,
    make_key: Callable[[], Any],
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    key_file = write_key(tmp_path, make_key())
    with pytest.raises(ConfigError, match=r"fhir\.auth\.smart\.private_key_file"):
        make_auth(_settings(key_file, algorithm), session)


async def test_not_a_key_refused(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    key_file.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        make_auth(_settings(key_file), session)


async def test_smart_auth_repr_hides_secrets(
    rsa_setup: Path, token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    auth = smart_auth(token_server, session, rsa_setup)
    await auth.header()
    text = repr(auth) + str(auth)
    assert "token-1" not in text and "PRIVATE" not in text and "BEGIN" not in text
    assert token_server.forms[0]["client_assertion"] not in text


# -- static bearer token ---------------------------------------------------------------------------


def _bearer_settings(**auth: Any) -> FhirSettings:
    return FhirSettings(base_url="https://fhir.example.org/r4", auth=AuthSettings(method="bearer", **auth))


async def test_bearer_token_file_read_and_stripped(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """The token file is read at start (stripped) and not again while the token works."""
    token_file = tmp_path / "token"
    token_file.write_text("  abc.def-123\n\n")
    auth = make_auth(_bearer_settings(bearer_token_file=token_file), session)
    token_file.write_text("changed")  # read once, at start
    assert await auth.header() == {"Authorization": "Bearer abc.def-123"}
    assert "abc.def" not in repr(auth)


async def test_bearer_token_file_is_re_read_after_a_401(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Kubernetes rotates a mounted secret in place: after a 401 (`invalidate`) the next header comes
    from the file as it is now. A file that cannot be read then keeps the token it had (the retry
    then fails as before); it is read again after the next 401."""
    token_file = tmp_path / "token"
    token_file.write_text("old-token\n")
    auth = make_auth(_bearer_settings(bearer_token_file=token_file), session)
    tmp = tmp_path / "token.new"
    tmp.write_text("new-token\n")
    tmp.replace(token_file)  # an atomic swap, as the kubelet's symlink swap
    from tests.hostile.logs import captured_logs

    with captured_logs("debug") as buffer:
        assert await auth.header() == {"Authorization": "Bearer old-token"}
        auth.invalidate()
        assert await auth.header() == {"Authorization": "Bearer new-token"}
        token_file.unlink()
        auth.invalidate()
        assert await auth.header() == {"Authorization": "Bearer new-token"}
        token_file.write_text("newer-token")
        assert await auth.header() == {"Authorization": "Bearer new-token"}  # read only after a 401
        auth.invalidate()
        assert await auth.header() == {"Authorization": "Bearer newer-token"}
    logged = buffer.getvalue()
    assert "fhir_bearer_token_renewed" in logged and "new-token" not in logged and "old-token" not in logged
    assert "token" not in repr(auth).replace("BearerAuth(token=", "")


@pytest.mark.parametrize("content", [None, "", " \n"], ids=["missing", "empty", "blank"])
async def test_bearer_token_file_missing_or_empty(
    content: str | None, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(ConfigError, match=r"fhir\.auth\.bearer_token_file"):
        make_auth(_bearer_settings(bearer_token_file=token_file), session)


async def test_bearer_token_from_settings(session: aiohttp.ClientSession) -> None:
    auth = make_auth(_bearer_settings(bearer_token=SecretStr("s3cret")), session)
    assert isinstance(auth, BearerAuth)
    assert await auth.header() == {"Authorization": "Bearer s3cret"}
    assert "s3cret" not in repr(auth)
    auth.invalidate()  # a static token cannot be renewed; harmless


async def test_no_auth(session: aiohttp.ClientSession) -> None:
    auth = make_auth(FhirSettings(base_url="https://fhir.example.org/r4"), session)
    assert isinstance(auth, NoAuth)
    assert await auth.header() == {}


async def test_errors_are_neutrowatch_errors() -> None:
    assert issubclass(AuthError, NeutrowatchError)
    assert issubclass(FhirUnavailable, NeutrowatchError)
