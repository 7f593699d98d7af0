"""Failed context look-ups against the real engine, refused by a proxy in front of it (403, as a
server answers a token without the scope): the fallback is used, the failure is counted once and
remembered for a negative TTL like a successful answer, so the refused request is not repeated for
every panel; after the TTL it is asked again."""

from __future__ import annotations

import orjson
from aiohttp import web

from service import metrics
from service.fhir.client import FhirClient
from service.live.directory import FAILURE_TTL_SECONDS, LiveDirectory
from tests.chaos.proxy import Fault, Proxy, outcome
from tests.fhir_server.load import put_all
from tests.integration.live import settings_for


def forbidden(_request: web.Request) -> web.Response:
    return web.Response(
        status=403,
        body=orjson.dumps(outcome("forbidden", "forbidden")),
        headers={"Content-Type": "application/fhir+json"},
    )


def failures(what: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("neutrowatch_context_lookup_failures_total", {"lookup": what})
        or 0.0
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_refused_look_up_is_cached_for_the_negative_ttl(fhir_base_url, tmp_path):
    """Condition and CareTeam searches answered 403: asked once for three panels, counted once each;
    asked again once the negative TTL has passed (the Patient read shares the context's load)."""
    put_all(fhir_base_url, [{"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"}])
    proxy = Proxy(upstream=fhir_base_url)
    await proxy.start()
    try:

        def refused(r):
            return r.method == "GET" and r.path in ("/fhir/Condition", "/fhir/CareTeam")

        proxy.add(Fault(refused, times=float("inf"), respond=forbidden))
        settings = settings_for(proxy.base, tmp_path / "s.sqlite3")
        clock = Clock()
        before = failures("patient"), failures("care team")
        async with FhirClient(settings.fhir) as client:
            directory = LiveDirectory(settings, client, clock=clock)
            for _panel in range(3):
                context = await directory.context("Patient/p1")
                chosen = await directory.recipients("Patient/p1", ())
            assert context.threshold_source is None and context.birth_us is None  # the fallback
            assert chosen.refs == ("CareTeam/oncology",)
            asked = lambda path: len(proxy.requests("GET", path))  # noqa: E731 - a one-line local helper
            assert (asked("/Condition"), asked("/CareTeam"), asked("/Patient/p1")) == (1, 1, 1)
            assert (failures("patient") - before[0], failures("care team") - before[1]) == (1, 1)
            clock.now += FAILURE_TTL_SECONDS + 1
            await directory.context("Patient/p1")
            await directory.recipients("Patient/p1", ())
            assert (asked("/Condition"), asked("/CareTeam")) == (2, 2)
            assert (failures("patient") - before[0], failures("care team") - before[1]) == (2, 2)
    finally:
        await proxy.stop()
