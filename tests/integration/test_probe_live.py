"""`check-config --probe` against the real engine: one request of every kind the live loop sends, a
write check that creates one tagged Provenance at most once, and, with SMART Backend Services, the
needed scopes compared with the requested and the granted ones. A refusal (403, made by a proxy in
front of the engine, as a server answers a token without the scope) fails the probe naming the
interaction, the status and the scope. The token endpoint is a small fake (the engine has no
authorisation server); every FHIR request goes to the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service.config import Settings
from service.fhir import scopes
from service.live.probe import probe
from tests.chaos.proxy import Fault, outcome
from tests.fhir_server.load import export
from tests.integration.live import settings_for

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the async fixtures' loop

INTERACTIONS = (
    "Observation search",
    "Patient read",
    "Condition search",
    "ServiceRequest read",
    "CareTeam search",
    "Flag identifier search",
    "Provenance conditional create",
    "StructureDefinition read (claimed profiles)",
)


def forbidden(_request: web.Request) -> web.Response:
    return web.Response(
        status=403,
        body=orjson.dumps(outcome("forbidden", "forbidden")),
        headers={"Content-Type": "application/fhir+json"},
    )


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


async def test_the_probe_sends_every_interaction_and_writes_its_provenance_once(
    fhir_base_url, proxy, tmp_path, capsys
):
    """Every interaction is reported ok; the probe Provenance is created by the first run, found and
    not written again by the second, and is the only Provenance the probe leaves (tagged, targeting
    the service's own author)."""
    settings = settings_for(proxy.base, tmp_path / "s.sqlite3")
    assert await probe(settings) == 0
    first = lines(capsys)
    for label in INTERACTIONS:
        assert any(line.startswith(f"ok   {label}: ") for line in first), (label, first)
    assert any("created the probe Provenance (HTTP 201)" in line for line in first)
    assert any(
        "neutrowatch-flag, neutrowatch-communication, neutrowatch-provenance not on the server" in line
        for line in first
    )
    assert await probe(settings) == 0
    assert any(
        "the probe Provenance exists already, nothing written (HTTP 200)" in line for line in lines(capsys)
    )
    probes = [
        p
        for p in export(fhir_base_url, "Provenance")
        if p["meta"].get("tag", [{}])[0].get("code") == "neutrowatch-probe"
    ]
    assert len(probes) == 1 and probes[0]["target"] == [{"reference": "Device/neutrowatch"}]
    # nothing that looks like an alert was written
    assert export(fhir_base_url, "Flag") == [] and export(fhir_base_url, "Communication") == []
    # the reads asked for the made-up id; the searches for its subject
    assert {s.raw_path for s in proxy.requests("GET", "/Patient")} == {"/Patient/neutrowatch-probe"}
    assert {s.raw_path for s in proxy.requests("GET", "/ServiceRequest")} == {
        "/ServiceRequest/neutrowatch-probe"
    }


@pytest.mark.parametrize(
    ("path", "label", "scope"),
    [
        ("/fhir/Condition", "Condition search", "system/Condition.s"),
        ("/fhir/CareTeam", "CareTeam search", "system/CareTeam.s"),
        ("/fhir/Patient/neutrowatch-probe", "Patient read", "system/Patient.r"),
        ("/fhir/Flag", "Flag identifier search", "system/Flag.s"),
        (
            "/fhir/StructureDefinition",
            "StructureDefinition read (claimed profiles)",
            "system/StructureDefinition.rs",
        ),
    ],
)
async def test_a_refused_interaction_fails_the_probe_naming_it(proxy, tmp_path, capsys, path, label, scope):
    """A 403 on one interaction (the others allowed): exit 1, and the line names the interaction, the
    status and the scope it needs. (The old probe sent only the Observation search and said ok.)"""
    proxy.add(Fault(lambda r: r.path == path, times=float("inf"), respond=forbidden))
    settings = settings_for(proxy.base, tmp_path / "s.sqlite3")
    assert await probe(settings) == 1
    out = lines(capsys)
    assert f"FAIL {label}: HTTP 403: forbidden — missing {scope}?" in out, out
    assert sum(line.startswith("FAIL") for line in out) == 1


async def test_a_refused_write_fails_the_probe(proxy, tmp_path, capsys):
    """The write check refused (a POST answered 403): the probe fails naming the conditional create."""
    proxy.add(Fault(lambda r: r.method == "POST", times=float("inf"), respond=forbidden))
    assert await probe(settings_for(proxy.base, tmp_path / "s.sqlite3")) == 1
    assert "FAIL Provenance conditional create: HTTP 403: forbidden — missing system/Provenance.cs?" in lines(
        capsys
    )


async def test_context_checks_follow_the_configuration(proxy, tmp_path, capsys):
    """With patient_context off the context reads are neither sent nor required."""
    settings = settings_for(proxy.base, tmp_path / "s.sqlite3", patient_context=False)
    assert await probe(settings) == 0
    out = lines(capsys)
    assert "skip context reads: poll.patient_context is off" in out
    assert not proxy.requests("GET", "/Patient") and not proxy.requests("GET", "/CareTeam")


class TokenEndpoint:
    """A token endpoint that grants `granted` whatever is asked, and records the requested scope."""

    def __init__(self, granted: str | None) -> None:
        self.granted, self.requested, self.url = granted, [], ""

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requested.append(str(form["scope"]))
        doc = {"access_token": "probe-token", "token_type": "bearer", "expires_in": 300}
        if self.granted is not None:
            doc["scope"] = self.granted
        return web.json_response(doc)


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenEndpoint]:
    endpoint = TokenEndpoint(None)
    app = web.Application()
    app.router.add_post("/token", endpoint.token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # a started site has a server
    endpoint.url = f"http://127.0.0.1:{port}/token"
    yield endpoint
    await runner.cleanup()


def smart_settings(base_url: str, tmp_path: Path, token_url: str, scope: str | None = None) -> Settings:
    key = tmp_path / "key.pem"
    key.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key.chmod(0o600)
    plain = settings_for(base_url, tmp_path / "s.sqlite3").model_dump(mode="json", exclude_none=True)
    smart = {"client_id": "neutrowatch", "private_key_file": str(key), "key_id": "k1", "token_url": token_url}
    if scope is not None:
        smart["scope"] = scope
    plain["fhir"]["auth"] = {"method": "smart", "smart": smart}
    return Settings(**plain)


async def test_granted_scopes_are_compared_with_the_needed_ones(proxy, token_endpoint, tmp_path, capsys):
    """The token endpoint grants the old default (no DiagnosticReport, Condition, ServiceRequest,
    CareTeam or StructureDefinition, no search on the writes) and the server refuses the Condition search: the
    probe names each scope not granted, and the refused search with the missing scope."""
    token_endpoint.granted = (
        "system/Observation.rs system/Patient.rs system/Flag.cru system/Communication.cr system/Provenance.cr"
    )
    proxy.add(Fault(lambda r: r.path == "/fhir/Condition", times=float("inf"), respond=forbidden))
    settings = smart_settings(proxy.base, tmp_path, token_endpoint.url)
    assert await probe(settings) == 1
    out = lines(capsys)
    assert token_endpoint.requested == [scopes.default_scope()]
    assert "ok   requested scope: covers every interaction of this configuration" in out
    assert (
        "FAIL granted scope: the token endpoint did not grant system/DiagnosticReport.s system/Condition.s "
        "system/ServiceRequest.r system/CareTeam.s system/Flag.s system/Communication.s system/Provenance.s "
        "system/StructureDefinition.rs"
    ) in out
    assert "FAIL Condition search: HTTP 403: forbidden — missing system/Condition.s?" in out
    assert all(s.headers.get("Authorization") == "Bearer probe-token" for s in proxy.seen)


async def test_a_requested_scope_short_of_the_needs_is_named(proxy, token_endpoint, tmp_path, capsys):
    """A site's own scope in v1 syntax that lacks Provenance: the probe fails naming it; a full
    v1 grant is accepted."""
    v1 = (
        "system/Observation.read system/DiagnosticReport.read system/Patient.read system/Condition.read "
        "system/ServiceRequest.read system/CareTeam.read system/Flag.read system/Flag.write "
        "system/Communication.read "
        "system/Communication.write system/StructureDefinition.read"
    )
    token_endpoint.granted = v1 + " system/Provenance.read system/Provenance.write"
    assert await probe(smart_settings(proxy.base, tmp_path, token_endpoint.url, v1)) == 1
    out = lines(capsys)
    assert any(
        line.startswith("FAIL requested scope: fhir.auth.smart.scope lacks system/Provenance.cs ")
        for line in out
    ), out
    assert "ok   granted scope: every needed scope granted" in out
