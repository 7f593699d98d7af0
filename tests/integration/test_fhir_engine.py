"""Behaviour of the in-memory FHIR test engine (tests/fhir_server), asserted over real HTTP.

These tests pin the engine facts that neutrowatch's integration tests rely on (paging, filters,
conditional create, versioned update, meta handling) so that an engine upgrade that changes one of
them fails here first. See tests/fhir_server/README.md.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"
NEUTROPHILS = "751-8"  # Neutrophils [#/volume] in Blood by Automated count
WBC = "6690-2"
INSTANT_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def request(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """Send one FHIR request; return (status, parsed JSON body, response headers)."""
    all_headers = {"Accept": FHIR_JSON, **(headers or {})}
    data = None
    if body is not None:
        all_headers.setdefault("Content-Type", FHIR_JSON)
        data = json.dumps(body)
    async with http.request(method, url, data=data, headers=all_headers, params=params) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None), resp.headers


def observation(
    code: str = NEUTROPHILS, patient: str = "p1", value: float = 1.2, **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
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


def flag_entry(identifier: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": {
            "resourceType": "Flag",
            "identifier": [{"system": "urn:neutrowatch:episode", "value": identifier}],
            "status": "active",
            "code": {"text": "Neutropenia"},
            "subject": {"reference": "Patient/p1"},
        },
        "request": {
            "method": "POST",
            "url": "Flag",
            "ifNoneExist": f"identifier=urn:neutrowatch:episode|{identifier}",
        },
    }


async def create_many(
    http: aiohttp.ClientSession, base: str, resources: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Create resources with one batch Bundle; return the created resources in order."""
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "POST", "url": r["resourceType"]}, "resource": r} for r in resources
        ],
    }
    status, body, _ = await request(http, "POST", f"{base}/", bundle)
    assert status == 200, body
    assert all(e["response"]["status"] == "201" for e in body["entry"]), body
    return [e["resource"] for e in body["entry"]]


async def search_all(
    http: aiohttp.ClientSession, base: str, path: str, params: dict[str, str]
) -> list[dict[str, Any]]:
    """Follow `next` links from the first page; return every page Bundle."""
    pages = []
    status, page, _ = await request(http, "GET", f"{base}/{path}", params=params)
    while True:
        assert status == 200, page
        assert page["resourceType"] == "Bundle" and page["type"] == "searchset"
        pages.append(page)
        links = {link["relation"]: link["url"] for link in page.get("link", [])}
        assert links["self"].startswith(f"{base}/{path}?")
        if "next" not in links:
            return pages
        assert links["next"].startswith(f"{base}/{path}?")
        assert len(pages) < 100, "runaway paging"
        status, page, _ = await request(http, "GET", links["next"])


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


# -- tests -----------------------------------------------------------------------------------------


async def test_metadata_is_a_minimal_r4_capability_statement(
    http: aiohttp.ClientSession, fhir_base_url: str
) -> None:
    status, body, headers = await request(http, "GET", f"{fhir_base_url}/metadata")
    assert status == 200
    assert headers["Content-Type"].startswith(FHIR_JSON)
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"
    rest = body["rest"][0]
    assert rest["mode"] == "server"
    resources = {r["type"]: r for r in rest["resource"]}
    assert set(resources) >= {
        "Observation",
        "Flag",
        "Communication",
        "Provenance",
        "Patient",
        "DiagnosticReport",
        "ServiceRequest",
        "CareTeam",
        "Device",
    }
    for resource in resources.values():
        assert {"read", "create", "update", "search-type"} <= {i["code"] for i in resource["interaction"]}
    observation_params = {p["name"] for p in resources["Observation"]["searchParam"]}
    assert observation_params >= {"_lastUpdated", "code", "patient", "subject", "identifier"}
    assert {"_lastUpdated", "identifier"} <= {p["name"] for p in resources["Patient"]["searchParam"]}


async def test_health_endpoint(http: aiohttp.ClientSession, fhir_base_url: str) -> None:
    status, body, _ = await request(http, "GET", f"{fhir_base_url}/$health")
    assert status == 200 and body["status"] == "ok"


async def test_create_then_read_observation(http: aiohttp.ClientSession, fhir_base_url: str) -> None:
    status, created, headers = await request(http, "POST", f"{fhir_base_url}/Observation", observation())
    assert status == 201, created
    obs_id, version = created["id"], created["meta"]["versionId"]
    assert headers["Location"] == f"{fhir_base_url}/Observation/{obs_id}/_history/{version}"
    assert headers["ETag"] == f'W/"{version}"'
    assert "Last-Modified" in headers
    assert headers["Content-Type"].startswith(FHIR_JSON)

    status, read, headers = await request(http, "GET", f"{fhir_base_url}/Observation/{obs_id}")
    assert status == 200
    assert read["meta"]["versionId"] == version
    assert INSTANT_MS.match(read["meta"]["lastUpdated"]), read["meta"]
    assert read["code"]["coding"][0]["code"] == NEUTROPHILS
    assert read["valueQuantity"]["value"] == 1.2
    assert headers["ETag"] == f'W/"{version}"'

    status, vread, _ = await request(http, "GET", f"{fhir_base_url}/Observation/{obs_id}/_history/{version}")
    assert status == 200 and vread["id"] == obs_id

    status, missing, _ = await request(http, "GET", f"{fhir_base_url}/Observation/does-not-exist")
    assert status == 404 and missing["resourceType"] == "OperationOutcome"


async def test_search_pages_through_230_observations_via_next_links(
    http: aiohttp.ClientSession, fhir_base_url: str
) -> None:
    # Matching resources created before the watermark must be excluded by _lastUpdated=ge.
    before = await create_many(http, fhir_base_url, [observation() for _ in range(5)])
    watermark = max(datetime.fromisoformat(r["meta"]["lastUpdated"]) for r in before) + timedelta(
        milliseconds=1
    )
    await asyncio.sleep(0.01)  # lastUpdated has millisecond precision
    mixed = [observation(value=i / 100) for i in range(230)] + [observation(code=WBC) for _ in range(40)]
    created = await create_many(http, fhir_base_url, mixed)
    expected = {r["id"] for r in created if r["code"]["coding"][0]["code"] == NEUTROPHILS}
    assert len(expected) == 230

    since = watermark.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    pages = await search_all(
        http,
        fhir_base_url,
        "Observation",
        {
            "code": f"{LOINC}|{NEUTROPHILS}",
            "_lastUpdated": f"ge{since}",
            "_sort": "_lastUpdated",
            "_count": "50",
        },
    )

    assert [len(ids(p)) for p in pages] == [50, 50, 50, 50, 30]
    all_ids = [i for p in pages for i in ids(p)]
    assert len(all_ids) == len(set(all_ids)) == 230, "duplicates across pages"
    assert set(all_ids) == expected
    assert all(p["total"] == 230 for p in pages)
    assert "next" not in {link["relation"] for link in pages[-1]["link"]}
    stamps = [e["resource"]["meta"]["lastUpdated"] for p in pages for e in p["entry"]]
    assert stamps == sorted(stamps)
    first_entry = pages[0]["entry"][0]
    assert first_entry["fullUrl"] == f"{fhir_base_url}/Observation/{first_entry['resource']['id']}"


async def test_count_defaults_to_100_and_is_capped_at_1000(
    http: aiohttp.ClientSession, fhir_base_url: str
) -> None:
    await create_many(http, fhir_base_url, [observation() for _ in range(120)])
    status, page, _ = await request(http, "GET", f"{fhir_base_url}/Observation")
    assert status == 200 and len(ids(page)) == 100 and page["total"] == 120
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert links["self"] == f"{fhir_base_url}/Observation?_count=100"
    assert links["next"] == f"{fhir_base_url}/Observation?_count=100&_offset=100"

    status, page, _ = await request(http, "GET", f"{fhir_base_url}/Observation", params={"_count": "5000"})
    assert status == 200 and len(ids(page)) == 120
    assert {link["relation"]: link["url"] for link in page["link"]} == {
        "self": f"{fhir_base_url}/Observation?_count=1000"
    }

    status, outcome, _ = await request(http, "GET", f"{fhir_base_url}/Observation", params={"_count": "many"})
    assert status == 400 and outcome["resourceType"] == "OperationOutcome"


async def test_subject_and_patient_filters(http: aiohttp.ClientSession, fhir_base_url: str) -> None:
    await create_many(
        http,
        fhir_base_url,
        [observation(patient="x") for _ in range(3)] + [observation(patient="y") for _ in range(2)],
    )

    async def total(params: dict[str, str]) -> int:
        status, bundle, _ = await request(http, "GET", f"{fhir_base_url}/Observation", params=params)
        assert status == 200, bundle
        assert len(ids(bundle)) == bundle["total"]
        return bundle["total"]

    assert await total({"subject": "Patient/x"}) == 3
    assert await total({"subject": "Patient/y"}) == 2
    assert await total({"patient": "Patient/x"}) == 3
    # Engine quirks (Medplum 5.2): a bare id only matches for single-target reference parameters.
    assert await total({"patient": "x"}) == 3  # `patient` targets only Patient
    assert (
        await total({"subject": "x"}) == 0
    )  # `subject` targets Patient|Group|Device|Location: silently empty
    # Unknown search parameters silently match nothing (no error, no warning).
    assert await total({"no-such-param": "1"}) == 0


async def test_transaction_with_if_none_exist_is_idempotent(
    http: aiohttp.ClientSession, fhir_base_url: str
) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [flag_entry("episode-1")]}

    status, first, _ = await request(http, "POST", f"{fhir_base_url}/", bundle)
    assert status == 200 and first["type"] == "transaction-response", first
    assert first["entry"][0]["response"]["status"] == "201"

    bundle["entry"][0]["fullUrl"] = f"urn:uuid:{uuid.uuid4()}"  # a re-post from a fresh client run
    status, second, _ = await request(http, "POST", f"{fhir_base_url}/", bundle)
    assert status == 200, second
    assert second["entry"][0]["response"]["status"] == "200"
    assert second["entry"][0]["response"]["location"] == first["entry"][0]["response"]["location"]

    status, found, _ = await request(
        http, "GET", f"{fhir_base_url}/Flag", params={"identifier": "urn:neutrowatch:episode|episode-1"}
    )
    assert status == 200 and found["total"] == 1 and len(ids(found)) == 1


async def test_transaction_with_if_none_exist_and_more_than_8_entries_is_refused(
    http: aiohttp.ClientSession, fhir_base_url: str
) -> None:
    eight = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [flag_entry(f"e{i}") for i in range(8)],
    }
    status, body, _ = await request(http, "POST", f"{fhir_base_url}/", eight)
    assert status == 200, body

    nine = {"resourceType": "Bundle", "type": "transaction", "entry": [flag_entry(f"n{i}") for i in range(9)]}
    status, outcome, _ = await request(http, "POST", f"{fhir_base_url}/", nine)
    assert status == 400 and outcome["resourceType"] == "OperationOutcome"
    assert "too many entries" in outcome["issue"][0]["details"]["text"]
    status, found, _ = await request(
        http, "GET", f"{fhir_base_url}/Flag", params={"identifier": "urn:neutrowatch:episode|n0"}
    )
    assert found["total"] == 0


async def _stale_put_transaction(http: aiohttp.ClientSession, base: str) -> tuple[int, Any, str]:
    """A Flag updated once, then a transaction: a new Flag (conditional create) and a PUT of the
    first Flag with its first (stale) version. Returns (HTTP status, body, the new Flag's identifier)."""
    status, flag, _ = await request(http, "POST", f"{base}/Flag", flag_entry("episode-s")["resource"])
    assert status == 201
    v1 = flag["meta"]["versionId"]
    status, _, _ = await request(http, "PUT", f"{base}/Flag/{flag['id']}", {**flag, "status": "inactive"})
    assert status == 200
    stale = {
        "resource": {**flag, "status": "entered-in-error"},
        "request": {"method": "PUT", "url": f"Flag/{flag['id']}", "ifMatch": f'W/"{v1}"'},
    }
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [flag_entry("episode-new"), stale]}
    status, body, _ = await request(http, "POST", f"{base}/", bundle)
    return status, body, "urn:neutrowatch:episode|episode-new"


async def test_atomic_transaction_with_a_failing_entry_is_refused_and_rolled_back(
    http: aiohttp.ClientSession, fhir_base_url: str
) -> None:
    """The default engine treats a transaction as all or nothing (FHIR http.html#transaction): a
    stale If-Match entry fails the whole Bundle with its 412, and the entry before it is undone."""
    status, body, new = await _stale_put_transaction(http, fhir_base_url)
    assert status == 412 and body["resourceType"] == "OperationOutcome", body
    status, found, _ = await request(http, "GET", f"{fhir_base_url}/Flag", params={"identifier": new})
    assert found["total"] == 0, "the create of the refused transaction was kept"
    status, health, _ = await request(http, "GET", f"{fhir_base_url}/$health")
    assert health["transactions"] == "atomic"


async def test_batch_engine_answers_a_transaction_with_mixed_statuses_and_keeps_the_rest(
    http: aiohttp.ClientSession, fhir_base_url_batch: str
) -> None:
    """--batch-transactions (Medplum's router without `transactions`, as a project without
    transaction bundles): the same Bundle answers 200 with one status per entry, and the entry that
    succeeded stays written although another failed."""
    status, body, new = await _stale_put_transaction(http, fhir_base_url_batch)
    assert status == 200 and body["type"] == "transaction-response", body
    assert [e["response"]["status"] for e in body["entry"]] == ["201", "412"]
    status, found, _ = await request(http, "GET", f"{fhir_base_url_batch}/Flag", params={"identifier": new})
    assert found["total"] == 1
    status, health, _ = await request(http, "GET", f"{fhir_base_url_batch}/$health")
    assert health["transactions"] == "batch"


async def test_batch_engine_rewrites_a_reference_to_a_failed_entry_to_an_id_that_never_exists(
    http: aiohttp.ClientSession, fhir_engine_each_mode: Any
) -> None:
    """Why a Provenance must not share a Bundle with its targets on a batch server: the server
    reserves an id for each create before processing, rewrites urn:uuid references to it, and keeps
    a later entry whose target's entry failed (here a Flag write refused once through POST /$fault,
    the engine's own fault switch, which fails the write for real with 409). Atomic: nothing kept."""
    base = fhir_engine_each_mode.base_url
    flag = flag_entry("episode-f")
    provenance = {
        "resourceType": "Provenance",
        "recorded": "2026-01-01T00:00:00Z",
        "target": [{"reference": flag["fullUrl"]}],
        "agent": [{"who": {"reference": "Device/neutrowatch"}}],
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [flag, {"resource": provenance, "request": {"method": "POST", "url": "Provenance"}}],
    }
    fhir_engine_each_mode.fault("Flag", contains="episode-f")
    status, body, _ = await request(http, "POST", f"{base}/", bundle)
    if fhir_engine_each_mode.batch_transactions:
        assert status == 200 and [e["response"]["status"] for e in body["entry"]] == ["409", "201"], body
        (target,) = body["entry"][1]["resource"]["target"]
        assert target["reference"].startswith("Flag/")
        status, _, _ = await request(http, "GET", f"{base}/{target['reference']}")
        assert status == 404  # a Provenance whose target never existed
    else:
        assert status == 409 and "injected fault" in body["issue"][0]["details"]["text"], body
        status, found, _ = await request(http, "GET", f"{base}/Provenance")
        assert found["total"] == 0
    # The fault was used up: the same Bundle now goes through.
    status, body, _ = await request(http, "POST", f"{base}/", bundle)
    assert status == 200 and [e["response"]["status"] for e in body["entry"]] == ["201", "201"], body


async def test_conditional_create_with_if_none_exist_header(
    http: aiohttp.ClientSession, fhir_base_url: str
) -> None:
    flag = flag_entry("episode-h")["resource"]
    headers = {"If-None-Exist": "identifier=urn:neutrowatch:episode|episode-h"}
    status, first, _ = await request(http, "POST", f"{fhir_base_url}/Flag", flag, headers=headers)
    assert status == 201, first
    status, second, _ = await request(http, "POST", f"{fhir_base_url}/Flag", flag, headers=headers)
    assert status == 200 and second["id"] == first["id"]


async def test_versioned_update_with_if_match(http: aiohttp.ClientSession, fhir_base_url: str) -> None:
    status, flag, _ = await request(
        http, "POST", f"{fhir_base_url}/Flag", flag_entry("episode-v")["resource"]
    )
    assert status == 201
    url = f"{fhir_base_url}/Flag/{flag['id']}"
    v1 = flag["meta"]["versionId"]

    flag["status"] = "inactive"
    status, updated, headers = await request(http, "PUT", url, flag, headers={"If-Match": f'W/"{v1}"'})
    assert status == 200, updated
    v2 = updated["meta"]["versionId"]
    assert v2 != v1 and headers["ETag"] == f'W/"{v2}"'

    flag["status"] = "entered-in-error"
    status, outcome, _ = await request(http, "PUT", url, flag, headers={"If-Match": f'W/"{v1}"'})  # stale
    assert status == 412, outcome
    assert outcome["resourceType"] == "OperationOutcome"
    status, current, _ = await request(http, "GET", url)
    assert current["status"] == "inactive" and current["meta"]["versionId"] == v2

    # History is newest first, and stays so on repeated reads.
    for _ in range(3):
        status, history, _ = await request(http, "GET", f"{url}/_history")
        assert status == 200
        assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == [v2, v1]


async def test_client_sent_meta_last_updated(http: aiohttp.ClientSession, fhir_base_url: str) -> None:
    staged = "2020-01-01T00:00:00.000Z"
    # Default (as the engine does): client-sent meta.lastUpdated/versionId are replaced on create.
    status, plain, _ = await request(
        http,
        "POST",
        f"{fhir_base_url}/Observation",
        observation(meta={"lastUpdated": staged, "versionId": "v-client"}),
    )
    assert status == 201
    assert plain["meta"]["lastUpdated"] != staged and plain["meta"]["versionId"] != "v-client"

    # Opt-in shim header: keep them (Medplum's "seeding" mode), e.g. to stage late-arriving data.
    keep = {"X-Engine-Keep-Meta": "true"}
    late = observation(meta={"lastUpdated": "2020-01-01T01:00:00+01:00"})
    status, kept, _ = await request(http, "POST", f"{fhir_base_url}/Observation", late, headers=keep)
    assert status == 201
    assert kept["meta"]["lastUpdated"] == staged  # normalised to the server's instant format
    status, read, _ = await request(http, "GET", f"{fhir_base_url}/Observation/{kept['id']}")
    assert read["meta"]["lastUpdated"] == staged

    status, found, _ = await request(
        http, "GET", f"{fhir_base_url}/Observation", params={"_lastUpdated": "lt2021-01-01"}
    )
    assert ids(found) == [kept["id"]]

    # Seeding mode does not leak into later requests, even after a failing keep-meta request.
    status, _, _ = await request(
        http,
        "POST",
        f"{fhir_base_url}/Observation",
        observation(meta={"lastUpdated": "not-a-date"}),
        headers=keep,
    )
    assert status == 400
    status, after, _ = await request(
        http, "POST", f"{fhir_base_url}/Observation", observation(meta={"lastUpdated": staged})
    )
    assert after["meta"]["lastUpdated"] != staged


async def test_reset_empties_the_repository(
    http: aiohttp.ClientSession, fhir_engine: Any, fhir_base_url: str
) -> None:
    await create_many(http, fhir_base_url, [observation() for _ in range(3)])
    status, bundle, _ = await request(http, "GET", f"{fhir_base_url}/Observation")
    assert bundle["total"] == 3

    status, outcome, _ = await request(http, "POST", f"{fhir_base_url}/$reset")
    assert status == 200 and outcome["resourceType"] == "OperationOutcome"
    status, bundle, _ = await request(http, "GET", f"{fhir_base_url}/Observation")
    assert bundle["total"] == 0 and "entry" not in bundle

    await create_many(http, fhir_base_url, [observation()])
    fhir_engine.reset()  # the Python API
    status, bundle, _ = await request(http, "GET", f"{fhir_base_url}/Observation")
    assert bundle["total"] == 0


async def test_errors_answer_operation_outcome_and_do_not_crash(
    http: aiohttp.ClientSession, fhir_base_url: str
) -> None:
    # An exception inside the router (here a TypeError on a null Bundle) comes back as an
    # OperationOutcome; Medplum classifies errors thrown in its handlers as 400.
    async with http.post(f"{fhir_base_url}/", data="null", headers={"Content-Type": FHIR_JSON}) as resp:
        outcome = await resp.json(content_type=None)
        assert resp.status == 400 and outcome["resourceType"] == "OperationOutcome"
        assert "null" in outcome["issue"][0]["details"]["text"]

    # An unexpected error outside the router (an unparseable absolute-form request target) is a 500.
    host, port = fhir_base_url.removeprefix("http://").rsplit(":", 1)
    raw = await asyncio.to_thread(_raw_http, host, int(port), b"GET http://[bad/Observation HTTP/1.1")
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500")
    assert json.loads(payload)["resourceType"] == "OperationOutcome"

    async with http.post(
        f"{fhir_base_url}/Observation", data="{not json", headers={"Content-Type": FHIR_JSON}
    ) as resp:
        assert resp.status == 400
    async with http.post(
        f"{fhir_base_url}/Observation", data="{}", headers={"Content-Type": "text/plain"}
    ) as resp:
        assert resp.status == 415
    async with http.post(
        f"{fhir_base_url}/Observation",
        data=b" " * (50 * 1024 * 1024 + 1),
        headers={"Content-Type": FHIR_JSON},
    ) as resp:
        assert resp.status == 413

    status, body, _ = await request(http, "GET", f"{fhir_base_url}/$health")
    assert status == 200 and body["status"] == "ok"


def _raw_http(host: str, port: int, request_line: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: test\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- quota and injected conflicts (start options) ---------------------------------------------------


async def test_quota_prices_interactions_and_answers_429_without_retry_after(
    http: aiohttp.ClientSession, start_engine: Any
) -> None:
    """--quota-points-per-minute: a write costs 100 points, a search 20, a read 10 (the costs the
    README gives); a request over the window's quota is refused unapplied with 429, an
    OperationOutcome (code throttled) and no Retry-After; the next window has the full quota again;
    X-Engine-Unmetered requests are exempt."""
    engine = start_engine(quota_points_per_minute=150, quota_window_seconds=1)
    base = engine.base_url
    status, created, _ = await request(http, "POST", f"{base}/Observation", observation())  # 100
    assert status == 201
    assert (await request(http, "GET", f"{base}/Observation/{created['id']}"))[0] == 200  # 110
    assert (await request(http, "GET", f"{base}/Observation"))[0] == 200  # 130
    assert (await request(http, "GET", f"{base}/Observation", params={"_count": "1"}))[0] == 200  # 150

    status, body, headers = await request(http, "GET", f"{base}/Observation/{created['id']}")  # 160: over
    assert status == 429 and "Retry-After" not in headers
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "throttled"
    status, _, _ = await request(
        http, "POST", f"{base}/Observation", observation(), headers={"X-Engine-Unmetered": "true"}
    )
    assert status == 201
    assert (engine.stats()["throttled"], engine.stats()["points"]) == (1, 150)

    await asyncio.sleep(1.1)
    assert (await request(http, "POST", f"{base}/Observation", observation()))[0] == 201  # a new window


async def test_quota_prices_a_bundle_by_its_entries(http: aiohttp.ClientSession, start_engine: Any) -> None:
    """A transaction costs the sum of its entries (100 per write, 20 per search entry): a Bundle of
    two creates is refused whole by a quota of 150, one create passes."""
    engine = start_engine(quota_points_per_minute=150)
    two = {"resourceType": "Bundle", "type": "transaction", "entry": [flag_entry("q1"), flag_entry("q2")]}
    one = {"resourceType": "Bundle", "type": "transaction", "entry": [flag_entry("q3")]}
    assert (await request(http, "POST", engine.base_url, two))[0] == 429
    assert (await request(http, "POST", engine.base_url, one))[0] == 200
    assert engine.stats()["points"] == 100
    assert (await request(http, "GET", f"{engine.base_url}/Flag"))[1]["total"] == 1


async def test_conflict_every_answers_409_to_every_nth_conditional_create(
    http: aiohttp.ClientSession, start_engine: Any
) -> None:
    """--conflict-every 2: every 2nd conditional create (If-None-Exist header, or a Bundle with an
    ifNoneExist entry) answers 409 with a serialization-failure OperationOutcome (SQLSTATE 40001 in
    its diagnostics) and writes nothing; plain creates are neither counted nor refused; the same
    request sent again is applied."""
    engine = start_engine(conflict_every=2)
    base = engine.base_url
    ident = lambda v: {"identifier": [{"system": "urn:test", "value": v}]}  # noqa: E731 - a local one-liner
    assert (
        await request(
            http,
            "POST",
            f"{base}/Observation",
            observation(**ident("a")),
            headers={"If-None-Exist": "identifier=urn:test|a"},
        )
    )[0] == 201  # 1st
    assert (await request(http, "POST", f"{base}/Observation", observation()))[0] == 201  # plain: not counted

    status, body, _ = await request(
        http,
        "POST",
        f"{base}/Observation",
        observation(**ident("b")),
        headers={"If-None-Exist": "identifier=urn:test|b"},
    )  # 2nd
    assert (
        status == 409
        and body["issue"][0]["code"] == "conflict"
        and "40001" in body["issue"][0]["diagnostics"]
    )
    assert (await request(http, "GET", f"{base}/Observation", params={"identifier": "urn:test|b"}))[1][
        "total"
    ] == 0
    assert (
        await request(
            http,
            "POST",
            f"{base}/Observation",
            observation(**ident("b")),
            headers={"If-None-Exist": "identifier=urn:test|b"},
        )
    )[0] == 201  # 3rd

    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [flag_entry("c1")]}
    assert (await request(http, "POST", base, bundle))[0] == 409  # 4th
    assert (await request(http, "POST", base, bundle))[0] == 200  # 5th
    assert (engine.stats()["conflicts"], engine.stats()["conditionalCreates"]) == (2, 5)
