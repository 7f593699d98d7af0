"""FhirClient against the real FHIR test engine, directly and through the fault-injecting reverse
proxy of tests/chaos/proxy.py (429/503, truncated bodies, next links and redirects to another origin)."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.config import FhirSettings, RetrySettings
from service.errors import ConfigError
from service.fhir import model
from service.fhir.auth import BearerAuth
from service.fhir.backoff import quota_reset_seconds, retry_after_seconds, transient_status
from service.fhir.client import FhirClient
from service.fhir.errors import (
    FhirHttpError,
    FhirUnavailable,
    PreconditionFailed,
    UnsafeLinkError,
)
from service.fhir.outcome import outcome_summary
from service.fhir.paging import Page
from service.fhir.transport import ResponseTooLarge
from service.live.store import make_store
from service.metrics import REGISTRY
from tests.chaos.proxy import Fault, OtherOrigin, Proxy
from tests.fhir_server.engine import FhirEngine
from tests.fhir_server.load import put_all
from tests.integration.live import compare_with_oracle, cycle, population, settings_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

LOINC = "http://loinc.org"
TOKEN = "test-token-not-for-elsewhere"
SEARCH = [("code", f"{LOINC}|751-8"), ("_lastUpdated", "ge2000-01-01"), ("_sort", "_lastUpdated")]
Handler = Callable[[web.Request], web.StreamResponse]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def retries(reason: str) -> float:
    return metric("neutrowatch_fhir_retries_total", reason=reason)


def refused(kind: str) -> float:
    return metric("neutrowatch_refused_links_total", kind=kind)


def observation(patient: str = "p1", value: float = 1.2, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "751-8"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-05-01T08:00:00Z",
        "valueQuantity": {
            "value": value,
            "unit": "10*3/uL",
            "system": "http://unitsofmeasure.org",
            "code": "10*3/uL",
        },
        **extra,
    }


def transaction(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def post_entry(resource: dict[str, Any], **request: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }


def outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


# -- fault-injecting reverse proxy (tests/chaos/proxy.py) ---------------------------------------------


@pytest.fixture
async def other() -> AsyncIterator[OtherOrigin]:
    state = OtherOrigin()
    await state.start()
    yield state
    await state.stop()


class Sleeps(list[float]):
    """Backoff recorded instead of slept; `monotonic()` is the real clock moved on by what was
    "slept", so the client's pause and budget bookkeeping sees time pass as it would. With
    `real=True` it also sleeps (a test that needs a server-side window to pass)."""

    def __init__(self, real: bool = False) -> None:
        super().__init__()
        self.real = real

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)
        if self.real:
            await asyncio.sleep(seconds)

    def monotonic(self) -> float:
        return time.monotonic() + (0.0 if self.real else sum(self))


class RecordingRandom(random.Random):
    def __init__(self) -> None:
        super().__init__(7)
        self.bounds: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append((a, b))
        return super().uniform(a, b)


@dataclass
class Harness:
    client: FhirClient
    sleeps: Sleeps
    rng: RecordingRandom


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    clients: list[FhirClient] = []

    async def make(
        base_url: str,
        *,
        auth: Any = None,
        max_attempts: int = 4,
        timeout: float = 30.0,
        max_response_bytes: int = 64 * 1024 * 1024,
        real_sleep: bool = False,
        max_requests_per_minute: int | None = None,
        **retry: float,
    ) -> Harness:
        settings = FhirSettings(
            base_url=base_url,
            allow_insecure_http=True,
            timeout_seconds=timeout,
            user_agent="neutrowatch-test/1",
            max_response_bytes=max_response_bytes,
            max_requests_per_minute=max_requests_per_minute,
            retry=RetrySettings(
                max_attempts=max_attempts, backoff_base_seconds=0.5, backoff_max_seconds=30, **retry
            ),
        )
        sleeps, rng = Sleeps(real_sleep), RecordingRandom()
        client = FhirClient(
            settings,
            auth=auth if auth is not None else BearerAuth(TOKEN),
            sleep=sleeps,
            rng=rng,
            monotonic=sleeps.monotonic,
        )
        clients.append(client)
        return Harness(client, sleeps, rng)

    yield make
    for client in clients:
        await client.close()


async def seed(client: FhirClient, count: int, batch: int = 100) -> None:
    for start in range(0, count, batch):
        entries = [
            post_entry(observation(patient=f"p{i % 7}", value=0.1 + i / 100))
            for i in range(start, min(count, start + batch))
        ]
        response = await client.transaction(transaction(entries))
        assert all(e["response"]["status"].startswith("201") for e in response["entry"])


async def pages_of(client: FhirClient, params: list[tuple[str, str]]) -> list[Page]:
    return [page async for page in client.search("Observation", params)]


def is_search(request: web.Request) -> bool:
    return request.method == "GET" and request.path == "/fhir/Observation"


# -- against the engine ----------------------------------------------------------------------------


async def test_search_follows_next_links_exactly(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base)
    await seed(h.client, 250)
    pages_before = metric("neutrowatch_pages_total")

    pages = await pages_of(h.client, [*SEARCH, ("_count", "40")])

    assert len(pages) == 7
    assert metric("neutrowatch_pages_total") - pages_before == 7
    ids = [r.id for p in pages for r in p.resources if isinstance(r, model.Resource)]
    assert len(ids) == len(set(ids)) == 250
    stamps = [
        r.meta.lastUpdated or ""
        for p in pages
        for r in p.resources
        if isinstance(r, model.Resource) and r.meta
    ]
    assert stamps == sorted(stamps)
    assert pages[-1].next_url is None
    gets = proxy.requests("GET", "/Observation")
    for previous, page, request in zip(pages[:-1], pages[1:], gets[1:], strict=True):
        assert page.url == previous.next_url
        link = urlsplit(previous.next_url or "")
        assert request.raw_path == f"{link.path.removeprefix('/fhir')}?{link.query}"  # byte for byte
    headers = gets[0].headers
    assert headers["Accept"] == "application/fhir+json"
    assert headers["User-Agent"] == "neutrowatch-test/1"
    assert headers["Authorization"] == f"Bearer {TOKEN}"


async def test_search_all_returns_dicts_across_pages(
    fhir_base_url: str, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(fhir_base_url)
    await seed(h.client, 5)
    found = await h.client.search_all("Observation", [("patient", "Patient/p1"), ("_count", "2")])
    assert len(found) == 1 and found[0]["resourceType"] == "Observation"
    everything = await h.client.search_all("Observation", [("_count", "2")])
    assert len({r["id"] for r in everything}) == 5


async def test_conditional_create_is_not_duplicated(
    fhir_base_url: str, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(fhir_base_url)
    resource = observation(identifier=[{"system": "urn:test", "value": "abc"}])
    first, status1 = await h.client.create(resource, if_none_exist="identifier=urn:test|abc")
    second, status2 = await h.client.create(resource, if_none_exist="identifier=urn:test|abc")
    assert (status1, status2) == (201, 200)
    assert first is not None and second is not None and first["id"] == second["id"]
    assert len(await h.client.search_all("Observation", [("identifier", "urn:test|abc")])) == 1


async def test_update_with_stale_if_match_fails(
    fhir_base_url: str, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(fhir_base_url)
    created, _ = await h.client.create(observation())
    assert created is not None
    current, etag = await h.client.read("Observation", created["id"])
    assert etag == 'W/"' + created["meta"]["versionId"] + '"'
    updated, status = await h.client.update({**current, "status": "amended"}, if_match=etag)
    assert status == 200 and updated is not None and updated["status"] == "amended"
    with pytest.raises(PreconditionFailed) as caught:
        await h.client.update({**current, "status": "corrected"}, if_match=created["meta"]["versionId"])
    assert caught.value.status == 412
    assert "\n" not in str(caught.value) and len(caught.value.summary) <= 200


async def test_read_missing_is_http_error(
    fhir_base_url: str, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(fhir_base_url)
    with pytest.raises(FhirHttpError) as caught:
        await h.client.read("Observation", "does-not-exist")
    assert caught.value.status == 404
    with pytest.raises(ValueError):
        await h.client.read("Observation", "../Patient/x")


async def test_metadata(fhir_base_url: str, make_client: Callable[..., Awaitable[Harness]]) -> None:
    h = await make_client(fhir_base_url)
    statement = await h.client.metadata()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"


# -- retries ---------------------------------------------------------------------------------------


def answer(status: int, body: dict[str, Any] | None = None, /, **headers: str) -> Handler:
    def respond(_request: web.Request) -> web.Response:
        return web.Response(
            status=status,
            body=orjson.dumps(body or outcome("transient", "try later")),
            headers={"Content-Type": "application/fhir+json", **headers},
        )

    return respond


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, (7.0, 7.0)),
        ({"Retry-After": "600"}, (30.0, 30.0)),
        ({"x-ms-retry-after-ms": "1500", "Retry-After": "2"}, (1.5, 1.5)),
    ],
    ids=["seconds", "capped", "x-ms-retry-after-ms"],
)
async def test_429_honours_retry_after(
    headers: dict[str, str],
    expected: tuple[float, float],
    proxy: Proxy,
    make_client: Callable[..., Awaitable[Harness]],
) -> None:
    h = await make_client(proxy.base)
    await seed(h.client, 3)
    proxy.add(Fault(is_search, respond=answer(429, **headers)))
    before = retries("429")

    pages = await pages_of(h.client, SEARCH)

    assert len(pages[0].resources) == 3
    assert len(h.sleeps) == 1 and expected[0] <= h.sleeps[0] <= expected[1]
    assert retries("429") - before == 1


async def test_429_with_http_date(proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]) -> None:
    h = await make_client(proxy.base)
    await seed(h.client, 1)
    proxy.add(
        Fault(
            is_search,
            respond=lambda r: answer(429, **{"Retry-After": formatdate(time.time() + 12, usegmt=True)})(r),
        )
    )
    pages = await pages_of(h.client, SEARCH)
    assert len(pages[0].resources) == 1
    assert len(h.sleeps) == 1 and 10.0 <= h.sleeps[0] <= 12.0


async def test_503_then_success_with_full_jitter(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base)
    await seed(h.client, 2)
    proxy.add(Fault(is_search, times=2, respond=answer(503)))
    before = retries("503")

    pages = await pages_of(h.client, SEARCH)

    assert len(pages[0].resources) == 2
    assert h.rng.bounds == [(0, 0.5), (0, 1.0)]  # uniform(0, min(max, base * 2**n))
    assert all(0 <= s <= b for s, (_a, b) in zip(h.sleeps, h.rng.bounds, strict=True))
    assert retries("503") - before == 2
    assert len(proxy.requests("GET", "/Observation")) == 3


async def test_gives_up_after_max_attempts(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base, max_attempts=3)
    proxy.add(Fault(lambda r: r.method == "GET", times=99, respond=answer(502)))
    with pytest.raises(FhirUnavailable, match=r"after 3 attempts; last: 502") as caught:
        await h.client.metadata()
    assert caught.value.attempts == 3 and caught.value.reason == "502"
    assert len(proxy.requests("GET")) == 3 and len(h.sleeps) == 2


async def test_invalid_json_once_then_good(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base)
    await seed(h.client, 4)
    proxy.add(Fault(is_search, mutate=lambda s, hd, body: (s, hd, body[: len(body) // 2])))
    before = retries("invalid_json")

    pages = await pages_of(h.client, SEARCH)

    assert len(pages[0].resources) == 4
    assert retries("invalid_json") - before == 1
    assert len(h.sleeps) == 1


async def test_timeout_is_retried(proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]) -> None:
    h = await make_client(proxy.base, timeout=0.5)
    proxy.add(Fault(lambda r: r.path == "/fhir/metadata", delay=1.5))
    before = retries("timeout")
    assert (await h.client.metadata())["resourceType"] == "CapabilityStatement"
    assert retries("timeout") - before == 1


async def test_non_idempotent_post_not_retried_on_503(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base)
    proxy.add(
        Fault(lambda r: r.method == "POST", times=99, respond=answer(503, outcome("transient", "overloaded")))
    )
    before = retries("503")

    with pytest.raises(FhirHttpError) as caught:
        await h.client.create(observation())
    assert (
        caught.value.status == 503
        and "transient" in str(caught.value)
        and "overloaded" not in str(caught.value)
    )
    with pytest.raises(FhirHttpError):
        await h.client.transaction(transaction([post_entry(observation())]))

    assert len(proxy.requests("POST")) == 2  # one attempt each
    assert h.sleeps == [] and retries("503") == before


async def test_idempotent_writes_are_retried_on_503(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base)
    proxy.add(Fault(lambda r: r.method == "POST", times=2, respond=answer(503)))
    resource = observation(identifier=[{"system": "urn:test", "value": "retry"}])

    created, status = await h.client.create(resource, if_none_exist="identifier=urn:test|retry")
    assert status == 201 and created is not None
    flags = [
        post_entry(
            observation(identifier=[{"system": "urn:test", "value": f"t{i}"}]),
            ifNoneExist=f"identifier=urn:test|t{i}",
        )
        for i in range(3)
    ]
    response = await h.client.transaction(transaction(flags))
    assert len(response["entry"]) == 3
    assert len(h.sleeps) == 2 and len(proxy.requests("POST")) == 4


async def test_401_invalidates_once_and_retries(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    class CountingAuth:
        def __init__(self) -> None:
            self.invalidated = 0

        async def header(self) -> dict[str, str]:
            return {"Authorization": f"Bearer token-{self.invalidated}"}

        def invalidate(self) -> None:
            self.invalidated += 1

    auth = CountingAuth()
    h = await make_client(proxy.base, auth=auth)
    proxy.add(Fault(lambda r: r.path == "/fhir/metadata", respond=answer(401, outcome("login", "expired"))))
    assert (await h.client.metadata())["resourceType"] == "CapabilityStatement"
    assert auth.invalidated == 1
    assert [s.headers["Authorization"] for s in proxy.requests("GET")] == ["Bearer token-0", "Bearer token-1"]

    proxy.add(
        Fault(
            lambda r: r.path == "/fhir/metadata", times=99, respond=answer(401, outcome("login", "expired"))
        )
    )
    with pytest.raises(FhirHttpError) as caught:
        await h.client.metadata()
    assert caught.value.status == 401 and auth.invalidated == 2
    assert h.sleeps == []


# -- the token stays at home -----------------------------------------------------------------------


def next_link_to(target: str) -> Callable[[int, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]:
    def mutate(status: int, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        doc = orjson.loads(body)
        for link in doc["link"]:
            if link["relation"] == "next":
                link["url"] = target + "/Observation?" + urlsplit(link["url"]).query
        return status, headers, orjson.dumps(doc)

    return mutate


@pytest.mark.parametrize("where", ["other-origin", "other-path", "dot-segments"])
async def test_next_link_elsewhere_is_refused(
    where: str,
    proxy: Proxy,
    other: OtherOrigin,
    make_client: Callable[..., Awaitable[Harness]],
) -> None:
    h = await make_client(proxy.base)
    await seed(h.client, 3)
    origin = proxy.base.removesuffix("/fhir")
    target = {
        "other-origin": other.base + "/fhir",
        "other-path": origin + "/admin",
        "dot-segments": proxy.base + "/..",
    }[where]
    proxy.add(Fault(is_search, mutate=next_link_to(target)))
    before = refused("next")

    received: list[Page] = []
    with pytest.raises(UnsafeLinkError):
        async for page in h.client.search("Observation", [*SEARCH, ("_count", "2")]):
            received.append(page)

    assert len(received) == 1 and len(received[0].resources) == 2
    assert refused("next") - before == 1
    assert other.seen == []
    assert len(proxy.requests("GET", "/Observation")) == 1
    assert not any("Authorization" in s.headers for s in other.seen)


async def test_redirect_to_other_origin_is_refused(
    proxy: Proxy, other: OtherOrigin, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base)
    proxy.add(
        Fault(
            lambda r: r.path == "/fhir/metadata",
            respond=lambda r: web.Response(status=302, headers={"Location": f"{other.base}/fhir/metadata"}),
        )
    )
    before = refused("redirect")
    with pytest.raises(UnsafeLinkError):
        await h.client.metadata()
    assert refused("redirect") - before == 1
    assert other.seen == []


async def test_same_origin_redirect_followed_once(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base)
    proxy.add(
        Fault(
            lambda r: r.path == "/fhir/metadata" and not r.query_string,
            respond=lambda r: web.Response(status=307, headers={"Location": "/fhir/metadata?moved=1"}),
        )
    )
    assert (await h.client.metadata())["resourceType"] == "CapabilityStatement"
    assert [s.raw_path for s in proxy.requests("GET")] == ["/metadata", "/metadata?moved=1"]

    proxy.add(
        Fault(
            lambda r: r.path == "/fhir/metadata",
            times=2,
            respond=lambda r: web.Response(status=302, headers={"Location": "/fhir/metadata?again=1"}),
        )
    )
    with pytest.raises(FhirHttpError, match="more than one redirect"):
        await h.client.metadata()


async def test_location_elsewhere_is_ignored_and_counted(
    proxy: Proxy,
    other: OtherOrigin,
    make_client: Callable[..., Awaitable[Harness]],
) -> None:
    h = await make_client(proxy.base)
    proxy.add(
        Fault(
            lambda r: r.method == "POST",
            mutate=lambda s, hd, body: (s, {**hd, "Location": f"{other.base}/Observation/x"}, body),
        )
    )
    before = refused("location")
    created, status = await h.client.create(observation())
    assert status == 201 and created is not None
    assert refused("location") - before == 1
    assert other.seen == []


# -- decoding --------------------------------------------------------------------------------------


async def test_bad_entry_does_not_lose_its_neighbours(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base)
    await seed(h.client, 4)

    def spoil(status: int, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        doc = orjson.loads(body)
        doc["entry"][1]["resource"]["valueQuantity"] = "not a Quantity"
        return status, headers, orjson.dumps(doc)

    proxy.add(Fault(is_search, mutate=spoil))
    pages = await pages_of(h.client, [*SEARCH, ("_count", "3")])

    assert len(pages) == 2
    first = pages[0].resources
    assert [type(r) for r in first] == [model.Resource, model.Undecodable, model.Resource]
    bad = first[1]
    assert isinstance(bad, model.Undecodable) and bad.resource_type == "Observation" and bad.id
    assert pages[0].next_url is not None and len(pages[1].resources) == 1


async def test_retry_after_parsing() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds({"Retry-After": "5"}, now) == 5.0
    assert retry_after_seconds({"Retry-After": formatdate(now + 30, usegmt=True)}, now) == 30.0
    assert retry_after_seconds({"Retry-After": formatdate(now - 30, usegmt=True)}, now) == 0.0
    assert retry_after_seconds({"Retry-After": "soon"}, now) is None
    assert retry_after_seconds({"x-ms-retry-after-ms": "250"}, now) == 0.25
    assert retry_after_seconds({}, now) is None


async def test_outcome_summary_keeps_codes_and_paths_never_free_text() -> None:
    body = orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "invalid",
                    "diagnostics": "Patient Jane Doe born 1961-04-02: value 0.3 invalid",
                    "expression": ["Communication.payload[0].contentString"],
                },
                {
                    "code": "processing",
                    "details": {"text": "Jane Doe", "coding": [{"code": "MSG_DUPLICATE_ID"}]},
                },
                {"code": "x" * 400, "expression": ["Jane Doe; DROP"]},
            ],
        }
    )
    summary = outcome_summary(body)
    assert summary == "invalid at Communication.payload[0].contentString; processing MSG_DUPLICATE_ID"
    assert "Jane" not in summary and "1961" not in summary and "0.3" not in summary
    many = orjson.dumps(
        {"resourceType": "OperationOutcome", "issue": [{"code": "invalid", "expression": ["Flag.code"]}] * 50}
    )
    assert len(outcome_summary(many)) == 200
    assert outcome_summary(b'{"resourceType": "Patient", "name": [{"family": "Doe"}]}') == ""
    assert outcome_summary(b"<html>") == ""


async def test_ambiguous_write_failure_is_not_retried(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_client(proxy.base, timeout=0.5)
    proxy.add(Fault(lambda r: r.method == "POST", delay=1.5))
    with pytest.raises(FhirUnavailable, match="outcome is unknown") as caught:
        await h.client.create(observation())
    assert caught.value.reason == "timeout" and caught.value.attempts == 1
    assert h.sleeps == [] and len(proxy.requests("POST")) == 1


async def test_refused_connection_is_retried_even_for_writes(
    make_client: Callable[..., Awaitable[Harness]],
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    h = await make_client(f"http://127.0.0.1:{port}/fhir", max_attempts=3)
    before = retries("connection")
    with pytest.raises(FhirUnavailable, match="after 3 attempts; last: connection"):
        await h.client.create(observation())  # never sent, so safe to repeat
    assert retries("connection") - before == 2


# -- TLS -------------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


async def test_tls_ca_bundle_and_verify_tls_are_honoured(tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)

    async def metadata(_request: web.Request) -> web.Response:
        return web.json_response({"resourceType": "CapabilityStatement"})

    app = web.Application()
    app.router.add_get("/fhir/metadata", metadata)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # a started site has a server
    base = f"https://127.0.0.1:{port}/fhir"
    try:
        for settings, ok in [
            (FhirSettings(base_url=base), False),
            (FhirSettings(base_url=base, ca_bundle=cert_file), True),
            (FhirSettings(base_url=base, verify_tls=False), True),
        ]:
            async with FhirClient(settings, sleep=Sleeps()) as client:
                if ok:
                    assert (await client.metadata())["resourceType"] == "CapabilityStatement"
                else:
                    with pytest.raises(FhirUnavailable, match="TLS") as caught:
                        await client.metadata()
                    assert caught.value.attempts == 1  # a certificate problem is not retried
        with pytest.raises(ConfigError, match=r"fhir\.ca_bundle"):
            FhirClient(FhirSettings(base_url=base, ca_bundle=tmp_path / "absent.pem"))
    finally:
        await runner.cleanup()


# -- response size cap ---------------------------------------------------------------------------------

CAP = 64 * 1024  # the smallest fhir.max_response_bytes: 150 Observations of the engine are about twice that


def oversized(method: str = "GET") -> float:
    return metric("neutrowatch_oversized_responses_total", method=method)


async def test_an_oversized_page_is_refused_unread_and_not_retried(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    """A search page over fhir.max_response_bytes (the engine sends its Content-Length) is refused
    before its body is read: ResponseTooLarge naming the setting to raise, counted, not retried (the
    server would send the same); the same search in smaller pages is read whole."""
    await seed((await make_client(proxy.base)).client, 150)
    h = await make_client(proxy.base, max_response_bytes=CAP)
    before = oversized()

    with pytest.raises(
        ResponseTooLarge, match=r"fhir\.max_response_bytes \(65536 bytes; Content-Length \d+\)"
    ) as caught:
        await pages_of(h.client, [*SEARCH, ("_count", "150")])

    assert "raise fhir.max_response_bytes" in str(caught.value) and "Patient/" not in str(caught.value)
    assert oversized() - before == 1
    assert len(proxy.requests("GET", "/Observation")) == 1 and h.sleeps == []  # not retried
    pages = await pages_of(h.client, [*SEARCH, ("_count", "25")])
    assert len({r.id for p in pages for r in p.resources if isinstance(r, model.Resource)}) == 150


async def test_an_oversized_chunked_page_is_refused_while_it_streams(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    """A chunked response has no Content-Length: the body is refused as soon as what has streamed
    in passes fhir.max_response_bytes, so no more than the cap and one chunk are held."""
    h = await make_client(proxy.base, max_response_bytes=CAP)
    await seed(h.client, 1)
    entries = [
        {
            "resource": {
                **observation(value=i / 100),
                "id": f"o{i}",
                "meta": {"lastUpdated": "2024-05-01T08:00:00Z"},
            }
        }
        for i in range(2000)
    ]
    body = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries})
    assert len(body) > 8 * CAP

    def chunked(_request: web.Request) -> web.Response:
        response = web.Response(status=200, body=body, headers={"Content-Type": "application/fhir+json"})
        response.enable_chunked_encoding()
        return response

    proxy.add(Fault(is_search, respond=chunked))
    before = oversized()
    with pytest.raises(ResponseTooLarge, match=r"more than 65536 bytes read"):
        await pages_of(h.client, SEARCH)
    assert oversized() - before == 1 and h.sleeps == []
    pages = await pages_of(h.client, SEARCH)  # the fault answered once: the engine's own page fits
    assert len(pages[0].resources) == 1


async def test_an_oversized_page_fails_the_cycle_and_the_cursor_stays(
    fhir_base_url: str,
    tmp_path: Path,
    make_client: Callable[..., Awaitable[Harness]],
) -> None:
    """The live loop does not skip a page it refused for its size: the cycle fails (polls_total
    {outcome="error"}) and the cursor does not move, every cycle, until the page fits (here: a
    smaller page_size); then every Observation is read."""
    h = await make_client(fhir_base_url)
    await seed(h.client, 150)
    settings = settings_for(fhir_base_url, tmp_path / "state.sqlite3", page_size=150)
    capped = settings.model_copy(
        update={"fhir": settings.fhir.model_copy(update={"max_response_bytes": CAP})}
    )
    errors = metric("neutrowatch_polls_total", outcome="error")

    for _ in range(2):
        with pytest.raises(ResponseTooLarge):
            await cycle(capped)
    store = make_store(capped.store)
    await store.open()
    try:
        assert await store.get_cursor() is None
    finally:
        await store.close()
    assert metric("neutrowatch_polls_total", outcome="error") - errors == 2

    smaller = capped.model_copy(update={"fhir": capped.fhir.model_copy(update={"page_size": 25})})
    report = await cycle(smaller)
    assert report.new_versions == 150 and report.cursor is not None


# -- transient conflicts, quotas and the client-side rate limit ---------------------------------------


SERIALIZATION_FAILURE = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "conflict",
            "diagnostics": "could not serialize access due to read/write dependencies among transactions",
        }
    ],
}


def conditional(value: str) -> tuple[dict[str, Any], str]:
    return observation(identifier=[{"system": "urn:test", "value": value}]), f"identifier=urn:test|{value}"


@pytest.mark.parametrize(
    ("status", "outcome_", "reason"),
    [
        ("409 Conflict", None, "409"),
        (409, None, "409"),
        ("412 Precondition Failed", None, "412"),  # transient, but the caller re-reads before resending
        ("400 Bad Request", SERIALIZATION_FAILURE, "40001"),  # the marker, whatever the status
        (
            "500",
            orjson.dumps(outcome("exception", "ERROR: could not serialize access (SQLSTATE 40001)")),
            "40001",
        ),
        ("429 Too Many Requests", None, "429"),
        ("503", None, "503"),
        ("201 Created", SERIALIZATION_FAILURE, None),  # a success is never a refusal
        ("400 Bad Request", outcome("invalid", "Flag.status: required"), None),
        (403, None, None),
        (404, None, None),
        ("422", b"not json", None),
        ("conflict", None, None),
        (None, SERIALIZATION_FAILURE, None),
    ],
)
async def test_transient_status_classifies_statuses_and_entry_statuses(
    status: Any, outcome_: Any, reason: str | None
) -> None:
    """A transaction/batch entry's status (or a response's) with its OperationOutcome is classified
    as transient (the retry reason) or a refusal to keep (None): 409, 412, a serialization failure
    (SQLSTATE 40001, https://www.postgresql.org/docs/current/errcodes-appendix.html) and overload
    are transient; other 4xx are not."""
    assert transient_status(status, outcome_) == reason


async def test_a_409_on_a_conditional_create_is_retried_and_counted(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    """A conditional create answered 409 (a concurrent conditional create) is sent again after a
    jittered backoff within the same call, counted under reason 409, and creates the resource once."""
    h = await make_client(proxy.base)
    proxy.add(
        Fault(lambda r: r.method == "POST", times=1, respond=answer(409, outcome("conflict", "concurrent")))
    )
    before = retries("409")
    resource, criteria = conditional("c409")

    created, status = await h.client.create(resource, if_none_exist=criteria)

    assert status == 201 and created is not None
    assert retries("409") - before == 1
    assert len(proxy.requests("POST")) == 2 and h.rng.bounds == [(0, 0.5)]
    assert len(await h.client.search_all("Observation", [("identifier", "urn:test|c409")])) == 1


async def test_a_serialization_failure_from_the_engine_is_retried_for_a_conditional_transaction(
    start_engine: Callable[..., FhirEngine],
    make_client: Callable[..., Awaitable[Harness]],
) -> None:
    """The engine's 409 with a 40001 outcome on every 2nd conditional create: a transaction of
    conditional creates (idempotent) is retried until it is applied, counted under reason 40001."""
    engine = start_engine(conflict_every=2)
    h = await make_client(engine.base_url)
    before = retries("40001")
    first, criteria = conditional("s1")
    await h.client.create(first, if_none_exist=criteria)  # conditional create #1: applied

    entries = [post_entry(r, ifNoneExist=c) for r, c in (conditional("s2"), conditional("s3"))]
    response = await h.client.transaction(transaction(entries))  # #2: 409, #3 (the retry): applied

    assert [e["response"]["status"][:3] for e in response["entry"]] == ["201", "201"]
    assert retries("40001") - before == 1
    assert engine.stats()["conflicts"] == 1 and len(h.sleeps) == 1


async def test_a_409_on_a_plain_post_and_a_400_are_not_retried(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    """Refusals stay refusals: a plain POST answered 409 is not repeated (not idempotent); a 400 on
    a conditional create is not retried; a stale If-Match (412 without the serialization marker) is
    not resent verbatim but raised for the caller to re-read."""
    h = await make_client(proxy.base)
    before = (retries("409"), retries("400"), retries("412"))
    proxy.add(
        Fault(lambda r: r.method == "POST", times=1, respond=answer(409, outcome("conflict", "concurrent")))
    )
    with pytest.raises(FhirHttpError) as caught:
        await h.client.create(observation())
    assert caught.value.status == 409
    proxy.add(Fault(lambda r: r.method == "POST", times=1, respond=answer(400, outcome("invalid", "bad"))))
    resource, criteria = conditional("c400")
    with pytest.raises(FhirHttpError) as caught:
        await h.client.create(resource, if_none_exist=criteria)
    assert caught.value.status == 400
    proxy.add(Fault(lambda r: r.method == "PUT", times=1, respond=answer(412, outcome("conflict", "stale"))))
    with pytest.raises(PreconditionFailed):
        await h.client.update({**observation(), "id": "x1"}, if_match="1")

    assert len(proxy.requests("POST")) == 2 and len(proxy.requests("PUT")) == 1
    assert h.sleeps == [] and (retries("409"), retries("400"), retries("412")) == before


async def test_a_429_without_retry_after_waits_into_the_quota_window(
    start_engine: Callable[..., FhirEngine],
    make_client: Callable[..., Awaitable[Harness]],
) -> None:
    """The engine's quota (a write 100 points, a search 20; 429 without Retry-After) is spent by a
    write; the next search waits a jittered half to whole quota window (not the 0.5 s backoff
    schedule), then succeeds within max_attempts requests."""
    engine = start_engine(quota_points_per_minute=100, quota_window_seconds=1)
    h = await make_client(engine.base_url, max_attempts=5, real_sleep=True, quota_window_seconds=1.0)
    resource, criteria = conditional("q1")
    await h.client.create(resource, if_none_exist=criteria)  # 100 points: the window's quota
    before = retries("429")
    started = time.monotonic()

    found = await h.client.search_all("Observation", [("identifier", "urn:test|q1")])

    assert len(found) == 1
    stats = engine.stats()
    assert 1 <= stats["throttled"] <= 4 and stats["requests"] == 2 + stats["throttled"]
    assert retries("429") - before == stats["throttled"] == len(h.sleeps)
    assert h.rng.bounds == [(0.5, 1.0)] * len(h.sleeps) and all(0.5 <= s <= 1.0 for s in h.sleeps)
    assert time.monotonic() - started < 5  # coarse: a few windows at most


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"requests";r=59999;t=60, "fhirInteractions";r=0;t=37', 37.0),
        ('"a";r=0;t=5, "b";r=0;t=12', 12.0),
        ('"fhirInteractions";r=12;t=37', None),
        ('"x";r=0', None),
        ("garbage,,;;=", None),
        ("", None),
    ],
)
async def test_quota_reset_seconds_reads_the_ratelimit_header(value: str, expected: float | None) -> None:
    """The optional renewal hint of a 429 without Retry-After: the RateLimit header's `t` of an
    exhausted policy (r=0), the latest of them; nothing otherwise (format:
    https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/)."""
    assert quota_reset_seconds({"RateLimit": value} if value else {}) == expected


async def test_a_429_with_a_ratelimit_hint_waits_until_the_quota_renews(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    """A 429 without Retry-After but with `RateLimit: ...;r=0;t=7` waits 7 s plus up to a tenth of
    the quota window, not a random half to whole window; a hint beyond the window is cut to it."""
    h = await make_client(proxy.base, quota_window_seconds=60.0)
    await seed(h.client, 1)
    proxy.add(Fault(is_search, times=1, respond=answer(429, RateLimit='"fhirInteractions";r=0;t=7')))
    proxy.add(Fault(is_search, times=1, respond=answer(429, RateLimit='"fhirInteractions";r=0;t=600')))

    pages = await pages_of(h.client, SEARCH)

    assert len(pages[0].resources) == 1
    assert 7.0 <= h.sleeps[0] <= 13.0 and h.sleeps[1] == 60.0


async def test_quota_backoff_is_capped_per_request_and_per_cycle(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    """A server that keeps answering 429 without Retry-After: one request stops retrying once its
    backoff would pass fhir.retry.max_request_retry_seconds; a client whose backoff budget
    (max_cycle_retry_seconds) is spent stops retrying, and start_cycle() gives it back. Each stop
    is counted by cap."""
    proxy.add(
        Fault(lambda r: r.method == "GET", times=999, respond=answer(429, outcome("throttled", "quota")))
    )

    def capped(cap):
        return metric("neutrowatch_fhir_retry_caps_total", cap=cap)

    before = (capped("request"), capped("cycle"))

    per_request = await make_client(
        proxy.base, max_attempts=20, quota_window_seconds=10.0, max_request_retry_seconds=25.0
    )
    with pytest.raises(FhirUnavailable, match=r"max_request_retry_seconds reached; last: 429"):
        await per_request.client.metadata()
    assert 15 <= sum(per_request.sleeps) <= 25 and len(proxy.requests("GET")) == len(per_request.sleeps) + 1
    assert capped("request") - before[0] == 1

    per_cycle = await make_client(
        proxy.base,
        max_attempts=20,
        quota_window_seconds=10.0,
        max_request_retry_seconds=100.0,
        max_cycle_retry_seconds=12.0,
    )
    with pytest.raises(FhirUnavailable, match=r"max_cycle_retry_seconds reached; last: 429"):
        await per_cycle.client.metadata()
    # 12 s of budget, refilled at half a second per second of backoff: about 24 s at most
    assert 12 <= sum(per_cycle.sleeps) <= 24 and capped("cycle") - before[1] == 1
    slept = len(per_cycle.sleeps)
    per_cycle.client.start_cycle()
    with pytest.raises(FhirUnavailable, match=r"max_cycle_retry_seconds reached"):
        await per_cycle.client.metadata()
    assert len(per_cycle.sleeps) - slept >= 2  # retried again after the budget was given back


async def test_concurrent_requests_share_one_quota_pause(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    """Four requests meeting a 429 at once do not each start their own backoff: the client pauses
    as a whole, every request waits out the same pause (at most one quota window), and the backoff
    budget is charged for the pause once, not four times (4 × 0.2-0.4 s would overrun 0.6 s)."""
    h = await make_client(proxy.base, real_sleep=True, quota_window_seconds=0.4, max_cycle_retry_seconds=0.6)
    await seed(h.client, 1)
    proxy.add(Fault(is_search, times=4, delay=0.3, respond=answer(429, outcome("throttled", "quota"))))
    started, before = time.monotonic(), retries("429")

    results = await asyncio.gather(*(pages_of(h.client, SEARCH) for _ in range(4)))

    assert all(len(pages[0].resources) == 1 for pages in results)
    assert retries("429") - before == 4  # each request retried once (a request whose own backoff ended
    assert all(0.0 < s <= 0.4 for s in h.sleeps)  # before the shared pause waits out the rest of it)
    assert len(proxy.requests("GET", "/Observation")) == 8
    assert time.monotonic() - started < 3  # coarse


async def test_the_client_side_rate_limit_spaces_requests(
    fhir_engine: FhirEngine,
    fhir_base_url: str,
    make_client: Callable[..., Awaitable[Harness]],
) -> None:
    """fhir.max_requests_per_minute = 5: eight searches at once, and within the next 1.5 s exactly
    five reach the server; the others wait for the minute to make room (counted as paced seconds)."""
    h = await make_client(fhir_base_url, max_requests_per_minute=5)
    paced = metric("neutrowatch_fhir_paced_seconds_total")
    tasks = [asyncio.create_task(h.client.search_all("Observation", [("_count", "1")])) for _ in range(8)]

    done, pending = await asyncio.wait(tasks, timeout=1.5)

    for task in pending:
        task.cancel()
    assert (len(done), len(pending)) == (5, 3)
    assert fhir_engine.stats()["requests"] == 5
    assert (
        metric("neutrowatch_fhir_paced_seconds_total") - paced > 50
    )  # the sixth waits out most of the minute


async def test_retries_count_against_the_rate_limit(
    proxy: Proxy, make_client: Callable[..., Awaitable[Harness]]
) -> None:
    """Every send counts against fhir.max_requests_per_minute, retries included: with a limit of 2
    a search retried once uses the minute up, and a second search waits."""
    h = await make_client(proxy.base, max_requests_per_minute=2)
    proxy.add(Fault(is_search, times=1, respond=answer(503)))
    first = asyncio.create_task(pages_of(h.client, SEARCH))
    await asyncio.wait_for(asyncio.shield(first), timeout=5)
    second = asyncio.create_task(pages_of(h.client, SEARCH))

    done, _pending = await asyncio.wait([second], timeout=1.0)

    second.cancel()
    assert not done and len(proxy.requests("GET", "/Observation")) == 2


async def test_a_live_cycle_under_a_quota_and_conflicts_writes_what_replay_predicts(
    start_engine: Callable[..., FhirEngine],
    tmp_path: Path,
) -> None:
    """The live loop against an engine with a small quota (short window, 429s without Retry-After)
    and a 409 on every 4th conditional create: one cycle delivers every alert (no write waits for
    the next cycle) and the server holds exactly what replay predicts, nothing doubled."""
    engine = start_engine(quota_points_per_minute=2500, quota_window_seconds=1, conflict_every=4)
    put_all(engine.base_url, population())
    base = settings_for(engine.base_url, tmp_path / "s.sqlite3")
    retry = base.fhir.retry.model_copy(update={"max_attempts": 12, "quota_window_seconds": 1.0})
    settings = base.model_copy(update={"fhir": base.fhir.model_copy(update={"retry": retry})})
    throttled, conflicted = retries("429"), retries("40001")

    report = await cycle(settings)

    assert report.delivered_all and report.written > 5
    stats = engine.stats()
    assert stats["throttled"] > 0 and stats["conflicts"] > 0
    assert (
        retries("429") - throttled == stats["throttled"]
        and retries("40001") - conflicted == stats["conflicts"]
    )
    counts = compare_with_oracle(engine.base_url, tmp_path / "oracle")
    flag_only = report.events.get("chronic", 0) + report.events.get("recovering", 0)  # no Communication
    assert counts["communications"] == report.written - flag_only
