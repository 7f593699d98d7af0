"""Site terminology in the live loop against the real engine: real MIMIC-IV results coded only with
the hospital's local item ids are read through the site's ConceptMap (fetched from the server by
its canonical url, or from a file) and alert exactly as replay with that map predicts; a code list
too long for one GET is split into several searches read as one stream.

Data: tests/data/mimic-iv-demo-cbc (MIMIC-IV demo, ODbL 1.0), one patient's draws moved to the last
days (whole days, offsets kept) so the live look-back and the collection-time checks hold."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from aiohttp import web

from service.config import Settings, TerminologySettings
from service.fhir.errors import FhirError
from tests import mimic
from tests.chaos.proxy import Fault, Proxy
from tests.fhir_server.load import export, put_all
from tests.integration.live import compare_with_oracle, cycle, settings_for

PATIENT = "10035631"
# 2112-09-17 .. 2112-09-24: new mild, worsening moderate, resolved, new moderate, worsening severe
# (replay of the whole extract with the map, tests/unit/test_mimic_terminology.py)
WINDOW = ("2112-09-17", "2112-09-24")
LIMIT = 700  # characters of a search URL the proxy below accepts (a server refusing long GETs)


def shifted(resource: dict[str, Any], days: int) -> dict[str, Any]:
    out = json.loads(json.dumps(resource))
    if "effectiveDateTime" in out:
        at = dt.datetime.fromisoformat(out["effectiveDateTime"]) + dt.timedelta(days=days)
        out["effectiveDateTime"] = at.isoformat()
    if "birthDate" in out:
        out["birthDate"] = (dt.date.fromisoformat(out["birthDate"]) + dt.timedelta(days=days)).isoformat()
    return out


def one_patient_recent() -> list[dict[str, Any]]:
    """The patient and its results of WINDOW, moved so the window ends yesterday."""
    end = dt.date.fromisoformat(WINDOW[1])
    days = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1) - end).days
    mine = [
        o
        for o in mimic.read_observations()
        if o["subject"]["reference"] == f"Patient/{PATIENT}"
        and WINDOW[0] <= o["effectiveDateTime"][:10] <= WINDOW[1]
    ]
    patients = [json.loads(line) for line in mimic.PATIENTS.read_text().splitlines() if line.strip()]
    patient = next(p for p in patients if p["id"] == PATIENT)
    return [shifted(patient, days), *(shifted(o, days) for o in mine)]


def with_terminology(settings: Settings, terminology: dict[str, Any], **fhir: Any) -> Settings:
    return settings.model_copy(
        update={
            "terminology": TerminologySettings(**terminology),
            "fhir": settings.fhir.model_copy(update=fhir),
        }
    )


def oracle_config() -> dict[str, Any]:
    """Replay has no server to read maps from: the same map as a file, the same units."""
    return {"terminology": {"concept_maps": [str(mimic.CONCEPT_MAP)], "units": mimic.units_config()}}


async def test_a_concept_map_on_the_server_makes_local_coded_results_alert(fhir_base_url, tmp_path):
    """Without a map nothing is monitored (every code local); with the map read from the server by
    its url, the same results open, worsen and resolve episodes exactly as replay with the map predicts.
    A configured url the server does not hold is logged and skipped: it never stops the cycle."""
    put_all(fhir_base_url, one_patient_recent())
    base = settings_for(fhir_base_url, tmp_path / "before.sqlite3")
    before = await cycle(base)
    assert (before.new_versions, before.events) == (
        0,
        {},
    )  # "code not monitored": never stored, never alerted

    concept_map = json.loads(mimic.CONCEPT_MAP.read_text())
    put_all(fhir_base_url, [concept_map])
    mapped = with_terminology(
        settings_for(fhir_base_url, tmp_path / "after.sqlite3"),
        {
            "concept_map_urls": ["https://absent.example.org/ConceptMap/none", concept_map["url"]],
            "units": mimic.units_config(),
        },
    )
    report = await cycle(mapped)
    assert report.events == {"new": 1, "worsening": 2, "recovering": 2}
    counts = compare_with_oracle(fhir_base_url, tmp_path / "oracle", more_config=oracle_config())
    assert counts["flags"] == 1  # one episode: its recovery is not yet confirmed (reference §3)
    (flag, *_) = export(fhir_base_url, "Flag")
    assert flag["subject"]["reference"] == f"Patient/{PATIENT}"


def refuse_long_urls(request: web.Request) -> bool:
    return len(str(request.rel_url)) > LIMIT - len("http://127.0.0.1:65535")


@pytest.mark.parametrize("limit", [LIMIT, 8192], ids=["split", "one-search"])
async def test_a_code_list_too_long_for_one_get_is_split(fhir_base_url, tmp_path, limit):
    """A server that refuses long GETs (414): with fhir.max_search_url_length under its limit the
    code list (every monitored LOINC code and the 9 mapped local ones) goes out as several searches,
    every one accepted, and the alerts are replay's; with the limit above it the one search is refused
    and the cycle fails."""
    put_all(fhir_base_url, one_patient_recent())
    proxy = Proxy(upstream=fhir_base_url)
    await proxy.start()
    try:
        proxy.add(
            Fault(
                when=refuse_long_urls,
                times=float("inf"),
                kind="uri-too-long",
                respond=lambda _request: web.Response(status=414),
            )
        )
        settings = with_terminology(
            settings_for(proxy.base, tmp_path / "s.sqlite3", temperatures="all"),
            {"concept_maps": [mimic.CONCEPT_MAP], "units": mimic.units_config()},
            max_search_url_length=limit,
        )
        if limit > LIMIT:
            with pytest.raises(FhirError, match="414"):
                await cycle(settings)
            return
        report = await cycle(settings)
        searches = {
            s.raw_path.split("&_lastUpdated")[0] for s in proxy.seen if s.raw_path.startswith("/Observation?")
        }
    finally:
        await proxy.stop()
    assert proxy.counts["uri-too-long"] == 0
    assert len(searches) >= 2 and all(len(s) <= LIMIT for s in searches)
    assert report.events == {"new": 1, "worsening": 2, "recovering": 2}
    compare_with_oracle(fhir_base_url, tmp_path / "oracle", more_config=oracle_config())


async def test_a_map_changed_on_the_server_is_read_again_after_the_context_ttl(fhir_base_url, tmp_path):
    """One running worker: the server's map first covers only the temperatures (no CBC item: nothing
    to alert), then is completed on the server; after poll.context_ttl_seconds (0 here) the next cycle
    reads it again and the results re-read within the overlap window alert as replay predicts."""
    from service.fhir.client import FhirClient
    from service.live.store import make_store
    from service.live.worker import Worker

    put_all(fhir_base_url, one_patient_recent())
    concept_map = json.loads(mimic.CONCEPT_MAP.read_text())
    vitals_only = {
        **concept_map,
        "group": [g for g in concept_map["group"] if g["source"] == mimic.CHARTEVENTS],
    }
    put_all(fhir_base_url, [vitals_only])
    settings = with_terminology(
        settings_for(fhir_base_url, tmp_path / "s.sqlite3", context_ttl_seconds=0),
        {"concept_map_urls": [concept_map["url"]], "units": mimic.units_config()},
    )
    store = make_store(settings.store)
    await store.open()
    try:
        assert await store.lead()
        async with FhirClient(settings.fhir) as client:
            worker = Worker(settings, client, store)
            assert (await worker.run_cycle()).events == {}
            put_all(fhir_base_url, [concept_map])
            assert (await worker.run_cycle()).events == {"new": 1, "worsening": 2, "recovering": 2}
    finally:
        await store.close()
    compare_with_oracle(fhir_base_url, tmp_path / "oracle", more_config=oracle_config())
