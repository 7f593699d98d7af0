"""The chaos proxy itself: each fault kind can be injected on its own, is counted, and does to the
client what it says; links are rewritten to the proxy's origin; down means connection refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.config import FhirSettings, RetrySettings
from service.fhir.client import FhirClient
from service.fhir.errors import FhirError, FhirUnavailable, UnsafeLinkError
from tests.chaos import proxy as px
from tests.chaos.harness import put_batch

pytestmark = [pytest.mark.integration]

SEARCH = [("_count", "5"), ("_sort", "_lastUpdated"), ("_lastUpdated", "ge2026-01-01T00:00:00.000Z")]


def observation(i: int, updated: str | None = None) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"px-{i}",
        "status": "final",
        "subject": {"reference": "Patient/px"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "751-8"}]},
        "meta": {"versionId": "1", **({"lastUpdated": updated} if updated else {})},
    }


def flag_bundle(value: str) -> dict[str, Any]:
    flag = {
        "resourceType": "Flag",
        "status": "active",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/px"},
        "identifier": [{"system": "urn:px", "value": value}],
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": flag,
                "request": {"method": "POST", "url": "Flag", "ifNoneExist": f"identifier=urn:px|{value}"},
            }
        ],
    }


@pytest.fixture
async def engine(fhir_base_url: str) -> AsyncIterator[str]:
    # 12 Observations sharing one meta.lastUpdated: every page of 5 is one the client pages on by next link
    put_batch(fhir_base_url, [observation(i, "2026-01-01T00:00:00.000Z") for i in range(12)], keep_meta=True)
    yield fhir_base_url


async def client_for(proxy: px.Proxy, attempts: int = 2) -> FhirClient:
    return FhirClient(
        FhirSettings(
            base_url=proxy.base,
            allow_insecure_http=True,
            timeout_seconds=0.5,
            retry=RetrySettings(max_attempts=attempts, backoff_base_seconds=0.01, backoff_max_seconds=0.05),
        )
    )


CASES = [(kind, cls) for cls, kinds in px.APPLICABLE.items() for kind in kinds]


@pytest.mark.parametrize(("kind", "cls"), CASES, ids=[f"{k}-{c}" for k, c in CASES])
async def test_each_fault_kind_is_injected_and_counted(engine: str, kind: str, cls: str) -> None:
    plan = px.FaultPlan(
        {cls: {kind: 1.0}}, slow_seconds=0.8, retry_after_seconds=0, retry_after_date_seconds=0
    )
    proxy = px.Proxy(engine, seed=1, plan=plan)
    await proxy.start()
    try:
        async with await client_for(proxy) as client:
            error: Exception | None = None
            try:
                if cls == px.SEARCH:
                    pages = [p async for p in client.search("Observation", SEARCH)]
                    outcome: Any = sum(len(p.resources) for p in pages)
                elif cls == px.READ:
                    outcome = await client.search_all("Flag", [("identifier", "urn:px|nothing")])
                else:
                    outcome = await client.transaction(flag_bundle(kind))
            except FhirError as err:
                error = err
        assert proxy.counts[kind] >= 1, dict(proxy.counts)
        assert set(proxy.counts) == {kind}
        if kind == px.REPEATED:  # the client reads the repeats; the worker de-duplicates them
            assert error is None and outcome > 12
        elif kind == px.OTHER_ORIGIN:
            assert isinstance(error, UnsafeLinkError) and proxy.other.seen == []
        elif (
            kind != px.TRUNCATED or cls == px.WRITE
        ):  # (a page truncated the same way twice is read up to the cut)
            assert error is not None  # every attempt met the fault
        if kind in (px.APPLIED_502, px.SLOW, px.RESET, px.TRUNCATED) and cls == px.WRITE:
            # applied upstream although the client never heard: what makes conditional creates necessary
            async with FhirClient(FhirSettings(base_url=engine, allow_insecure_http=True)) as direct:
                assert len(await direct.search_all("Flag", [("identifier", f"urn:px|{kind}")])) == 1
    finally:
        await proxy.stop()


async def test_links_are_rewritten_and_down_refuses_connections(engine: str) -> None:
    proxy = px.Proxy(engine)
    await proxy.start()
    try:
        async with await client_for(proxy) as client:
            pages = [p async for p in client.search("Observation", SEARCH)]
            assert len(pages) == 3 and all(p.url.startswith(proxy.base) for p in pages)
            await proxy.down()
            with pytest.raises(FhirUnavailable, match="connection"):
                await client.metadata()
            await proxy.up()
            assert (await client.metadata())["resourceType"] == "CapabilityStatement"
    finally:
        await proxy.stop()


async def test_armed_kills_fire_once_at_their_moment(engine: str) -> None:
    fired: list[str] = []
    proxy = px.Proxy(engine)
    proxy.on_kill = lambda kind: fired.append(kind) is None
    await proxy.start()
    try:
        async with await client_for(proxy, attempts=1) as client:
            proxy.arm(px.KILL_AFTER_POST)
            with pytest.raises(FhirError):
                await client.transaction(flag_bundle("armed"))
            assert fired == [px.KILL_AFTER_POST]
            proxy.arm(px.KILL_MID_PAGE)
            with pytest.raises(FhirError):
                [p async for p in client.search("Observation", SEARCH)]
            assert fired[-1] == px.KILL_MID_PAGE and proxy.armed == []
        async with FhirClient(FhirSettings(base_url=engine, allow_insecure_http=True)) as direct:
            assert (
                len(await direct.search_all("Flag", [("identifier", "urn:px|armed")])) == 1
            )  # applied before the kill
    finally:
        await proxy.stop()
