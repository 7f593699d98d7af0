"""The live loop against the real FHIR engine: what it writes equals what replay predicts, once.
The tests of the write path run against both engines (fhir_base_url_each_mode): one whose
transactions are atomic, one that processes a transaction as a batch, as many servers do."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest
import yaml

from service.core.episodes import EventKind
from service.core.observations import LabResult
from service.errors import StoreError
from service.fhir.client import FhirClient
from service.fhir.fhirtime import from_epoch_us
from service.live.store.postgres import PostgresStore
from service.live.store.sqlite import SqliteStore
from service.metrics import REGISTRY
from tests.builders import observation
from tests.fhir_server.load import export, put_all
from tests.integration.live import compare_with_oracle, cycle, oracle, population, settings_for, stages

ROOT = Path(__file__).resolve().parents[2]


async def test_a_draw_grouped_by_its_diagnostic_report_is_grouped_alike_by_replay_and_live(
    fhir_base_url, tmp_path
):
    """The WBC and the neutrophil % of one draw name no specimen and were stamped a minute apart;
    only their DiagnosticReport says they are one panel (specimen, else DiagnosticReport, else
    collection instant: reference §1.2). The live loop reads the report with its results and
    decides the panel as replay does: one assessment of both results, the same event records."""
    now_us = int(time.time() * 1_000_000)
    drawn, counted = from_epoch_us(now_us - 7_200_000_000), from_epoch_us(now_us - 7_140_000_000)
    wbc = observation("6690-2", 2.0, id="dr-wbc", patient="Patient/dr", effective=drawn, specimen=None)
    # ANC = WBC x neutrophil fraction (reference §2): 2000/uL x 20 % = 400/uL, neutropenia in every
    # grading scheme (reference §3)
    neutrophils = observation(
        "770-8", 20, "%", id="dr-neut", patient="Patient/dr", effective=counted, specimen=None
    )
    report = {
        "resourceType": "DiagnosticReport",
        "id": "dr-cbc",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
        "subject": {"reference": "Patient/dr"},
        "result": [{"reference": "Observation/dr-wbc"}, {"reference": "Observation/dr-neut"}],
    }
    put_all(fhir_base_url, [wbc, neutrophils, report])
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    cycle_report, live = await cycle(settings, with_decisions=True)
    assert cycle_report.delivered_all
    events, _alerts = oracle(fhir_base_url, tmp_path / "oracle")
    alerted = [e for e in live if e["event"] == "new"]
    assert len(alerted) == 1
    assert sorted(alerted[0]["observations"]) == ["Observation/dr-neut", "Observation/dr-wbc"]
    assert live == events
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def test_a_page_refused_for_its_includes_is_read_without_them(fhir_base_url, tmp_path):
    """One Observation named by 1,001 DiagnosticReports makes the server refuse the page that holds
    it with its included reports (Medplum's include limit: a page's results and includes may not
    pass 1,000). The live loop reads that search again without the reports, counts it, and every
    patient is decided as replay decides them: such a page never stops monitoring."""
    resources = population(patients=6, days=28, seed=11)
    target = next(r for r in resources if r["resourceType"] == "Observation")
    reports = [
        {
            "resourceType": "DiagnosticReport",
            "id": f"many-{n}",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
            "subject": target["subject"],
            "result": [{"reference": f"Observation/{target['id']}"}],
        }
        for n in range(1001)
    ]
    put_all(fhir_base_url, [*resources, *reports])
    refused = (
        REGISTRY.get_sample_value("neutrowatch_includes_refused_total", {"resource_type": "Observation"})
        or 0.0
    )
    report = await cycle(settings_for(fhir_base_url, tmp_path / "s.sqlite3"))
    assert report.delivered_all and report.written > 0
    assert (
        REGISTRY.get_sample_value("neutrowatch_includes_refused_total", {"resource_type": "Observation"})
        == refused + 1
    )
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def test_staged_arrival_matches_replay_exactly_once(fhir_base_url_each_mode, tmp_path, state):
    resources = population()
    settings = settings_for(fhir_base_url_each_mode, state)
    written = 0
    for stage in stages(resources, 4):
        put_all(fhir_base_url_each_mode, stage)
        report = await cycle(settings)
        assert report.delivered_all
        written += report.written
    counts = compare_with_oracle(fhir_base_url_each_mode, tmp_path / "oracle")
    events, _alerts = oracle(fhir_base_url_each_mode, tmp_path / "oracle-events")
    # one write per alert event; a Communication for each but the Flag-only updates (chronic, recovering)
    flag_only = sum(e["event"] in ("chronic", "recovering") for e in events)
    assert written == sum(e["event"] in {k.value for k in EventKind} for e in events)
    assert counts["communications"] == written - flag_only > 5
    # A cycle with nothing new writes nothing and the server is unchanged.
    again = await cycle(settings)
    assert (again.written, again.new_versions) == (0, 0)
    assert len(export(fhir_base_url_each_mode, "Communication")) == counts["communications"]


async def test_small_pages_lose_nothing(fhir_base_url, tmp_path):
    resources = population(patients=6, days=28, seed=5)
    put_all(fhir_base_url, resources)
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3", page_size=7)
    report = await cycle(settings)
    monitored = [
        r for r in export(fhir_base_url, "Observation") if r["code"]["coding"][-1]["code"] != "8310-5"
    ]
    assert report.pages >= len(monitored) // 7
    assert report.observations >= len(monitored)
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    assert (await store.counts())["results"] == len(monitored)
    await store.close()
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def test_crash_after_posting_before_marking_sent_gives_no_duplicate(
    fhir_base_url_each_mode, tmp_path, monkeypatch, state
):
    put_all(fhir_base_url_each_mode, population(patients=8, days=35, seed=9))
    settings = settings_for(fhir_base_url_each_mode, state)
    crashes = {"left": 3}
    store_class = SqliteStore if settings.store.backend == "sqlite" else PostgresStore
    original = store_class.mark_sent

    async def crash_once(self, entry_id, result):
        if crashes["left"]:
            crashes["left"] -= 1
            raise StoreError("simulated crash: the server confirmed the write, the store never heard")
        return await original(self, entry_id, result)

    monkeypatch.setattr(store_class, "mark_sent", crash_once)
    failed_cycles = 0
    while crashes["left"]:  # writes go out in parallel across patients: one cycle may use up several
        with pytest.raises(StoreError):
            await cycle(settings)
        failed_cycles += 1
    assert 1 <= failed_cycles <= 3
    report = await cycle(settings)
    assert report.delivered_all
    compare_with_oracle(fhir_base_url_each_mode, tmp_path / "oracle")


def _write_config(path: Path, settings) -> Path:
    data = settings.model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(data))
    return path


async def _health(port: int) -> int | None:
    """200 once a cycle has read to the end of the search (/readyz is 200 "catching up" before)."""
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as r,
        ):
            return r.status if "last successful poll" in await r.text() else None
    except (aiohttp.ClientError, TimeoutError):
        return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_kill_9_at_random_points_then_restart(fhir_base_url_each_mode, tmp_path):
    """The real process, killed with SIGKILL at seeded random moments while it works through a
    backlog arriving in stages; after the last restart the server holds exactly replay's alerts."""
    rng = random.Random(20261121)
    port = _free_port()
    settings = settings_for(fhir_base_url_each_mode, tmp_path / "k.sqlite3", page_size=25)
    config = _write_config(
        tmp_path / "config.yaml",
        settings.model_copy(update={"web": settings.web.model_copy(update={"port": port})}),
    )
    env = {**os.environ, "NEUTROWATCH_LOGGING__FORMAT": "json", "NEUTROWATCH_LOGGING__LEVEL": "warning"}
    kills = 0
    log = (tmp_path / "service.log").open("wb")
    for stage in stages(population(patients=10, days=42, seed=11), 5):
        put_all(fhir_base_url_each_mode, stage)
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and await _health(port) != 200:
            await asyncio.sleep(0.3)
        assert await _health(port) == 200, (tmp_path / "service.log").read_text()[-2000:]
        await asyncio.sleep(1.5)  # a further cycle after the first successful one
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # SIGTERM drains and exits cleanly
    assert kills == 5
    compare_with_oracle(fhir_base_url_each_mode, tmp_path / "oracle")


async def test_update_during_paging_loses_nothing(fhir_base_url, tmp_path, monkeypatch):
    """An Observation updated while the cycle pages through the results moves to the end of the
    offset-paged result set; following next links alone would skip the resource that shifted into
    its place, and the cursor would pass it for good (found by the live benchmark)."""
    obs = [
        observation(
            "6690-2",
            4.0 + i / 100,
            id=f"shift-{i:02d}",
            patient=f"Patient/s{i % 5}",
            effective=f"2026-06-01T{8 + i // 60:02d}:{i % 60:02d}:00Z",
            specimen=f"Specimen/shift-{i}",
        )
        for i in range(60)
    ]
    put_all(fhir_base_url, obs, batch_size=1)  # one request each: distinct lastUpdated stamps
    original = FhirClient.search
    fired = {"done": False}

    async def search_with_a_concurrent_update(self, resource_type, params):
        async for page in original(self, resource_type, params):
            if not fired["done"]:  # the server answered page 1; now someone updates an entry of it
                fired["done"] = True
                put_all(fhir_base_url, [dict(obs[2], status="corrected")])  # moves to the end of the results
            yield page

    monkeypatch.setattr(FhirClient, "search", search_with_a_concurrent_update)
    settings = settings_for(fhir_base_url, tmp_path / "p.sqlite3", page_size=10)
    report = await cycle(settings)
    assert fired["done"], "the update was not injected"
    assert report.delivered_all, report
    store = SqliteStore(tmp_path / "p.sqlite3")
    await store.open()
    try:
        refs = {r for (r,) in store.db.execute("SELECT ref FROM results")}
        data = store.db.execute("SELECT data FROM results WHERE ref = 'Observation/shift-02'").fetchone()[0]
    finally:
        await store.close()
    assert refs == {f"Observation/shift-{i:02d}" for i in range(60)}
    assert msgspec.msgpack.decode(data, type=LabResult).status == "corrected"  # the newer version is kept


async def test_decisions_in_small_batches_equal_replay(fhir_base_url_each_mode, tmp_path, monkeypatch):
    """A backlog is decided DECIDE_BATCH panels at a time (memory flat); batches of 3 change nothing."""
    import service.live.worker

    monkeypatch.setattr(service.live.worker, "DECIDE_BATCH", 3)
    put_all(fhir_base_url_each_mode, population(patients=8, days=35, seed=13, temperatures=True))
    settings = settings_for(fhir_base_url_each_mode, tmp_path / "b.sqlite3")
    report = await cycle(settings)
    assert report.delivered_all and report.panels_assessed > 30
    compare_with_oracle(fhir_base_url_each_mode, tmp_path / "oracle")


async def test_a_write_the_server_keeps_refusing_does_not_silence_the_others(
    fhir_base_url_each_mode, tmp_path
):
    """One patient's alert write is refused every time (a server-side validation, say). That chain
    waits in the outbox, retried every cycle; every other patient's results are still read and
    their alerts still sent. (The cycle used to stop at the failed leftover and read nothing more:
    one poison write silenced every patient; found by reasoning over the chaos campaign.)"""
    from aiohttp import web

    from tests.chaos.proxy import Fault, Proxy

    def panel(pid: str) -> list[dict]:
        kw = dict(patient=f"Patient/{pid}", effective="2026-03-02T08:00:00Z", specimen=f"Specimen/{pid}")
        return [
            observation("6690-2", 2.0, id=f"{pid}-wbc", **kw),
            observation("751-8", 0.3, id=f"{pid}-anc", **kw),
        ]

    proxy = Proxy(fhir_base_url_each_mode)
    proxy.add(
        Fault(
            lambda r: r.method == "POST",
            times=float("inf"),
            body_contains=b'"Patient/poison"',
            respond=lambda _r: web.json_response(
                {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]},
                status=422,
            ),
        )
    )
    await proxy.start()
    try:
        settings = settings_for(proxy.base, tmp_path / "s.sqlite3")
        put_all(fhir_base_url_each_mode, panel("poison") + panel("first"))
        one = await cycle(settings)
        assert one.events == {"new": 2} and not one.delivered_all
        put_all(fhir_base_url_each_mode, panel("later"))
        two = await cycle(settings)
    finally:
        await proxy.stop()
    assert (
        two.events == {"new": 1} and not two.delivered_all and two.cursor is None
    )  # the cursor waits for every write
    alerted = {c["subject"]["reference"] for c in export(fhir_base_url_each_mode, "Communication")}
    assert alerted == {"Patient/first", "Patient/later"}


def _cbc(patient: str, day: int, anc_k: float) -> list[dict]:
    """One panel (WBC + automated ANC 751-8) collected on `day` of January 2026."""
    pid, eff = patient.split("/")[-1], f"2026-01-{day:02d}T08:00:00Z"
    spec = f"Specimen/{pid}-{day}"
    return [
        observation(
            "6690-2", 4.0, "10*3/uL", id=f"{pid}-{day}-wbc", patient=patient, effective=eff, specimen=spec
        ),
        observation(
            "751-8", anc_k, "10*3/uL", id=f"{pid}-{day}-anc", patient=patient, effective=eff, specimen=spec
        ),
    ]


async def test_delayed_resolution_and_recurrence_live_equal_replay(fhir_base_url, tmp_path):
    """With the default resolution rules (3 normal panels over >= 48 h: CIBMTR ANC recovery; a drop
    within 7 days re-opens: reference §3), panels arriving over several cycles give what replay
    predicts at every step: one normal panel leaves the Flag active and "recovering" with no
    Communication; the panels that confirm it, read in a later cycle, resolve the episode; a drop
    days later re-opens the same Flag with one "recurrence" Communication."""
    patient = "Patient/recover"
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    steps = [
        (
            _cbc(patient, 2, 0.3) + _cbc(patient, 5, 1.8),
            "active",
            "recovering (1 of 3 confirmations)",
            ["new"],
        ),
        (
            _cbc(patient, 6, 1.9) + _cbc(patient, 7, 2.2),
            "inactive",
            "resolved 2026-01-07T08:00:00Z",
            ["new", "resolved"],
        ),
        (_cbc(patient, 10, 1.2), "active", "latest ANC 1,200", ["new", "resolved", "recurrence"]),
    ]
    for i, (panels, status, text, kinds) in enumerate(steps):
        put_all(fhir_base_url, panels)
        assert (await cycle(settings)).delivered_all
        compare_with_oracle(fhir_base_url, tmp_path / f"oracle{i}")
        (flag,) = export(fhir_base_url, "Flag")  # one episode, one Flag, updated in place
        assert flag["status"] == status and text in flag["code"]["text"], flag["code"]["text"]
        comms = sorted(export(fhir_base_url, "Communication"), key=lambda c: c["sent"])
        got = [c["identifier"][0]["value"].split("-")[1] for c in comms]
        assert sorted(got) == sorted(kinds)
    _events, predicted = oracle(fhir_base_url, tmp_path / "final")
    want = {
        c["identifier"][0]["value"]: c["payload"] for c in predicted if c["resourceType"] == "Communication"
    }
    assert {c["identifier"][0]["value"]: c["payload"] for c in export(fhir_base_url, "Communication")} == want
    last_flag = [r for r in predicted if r["resourceType"] == "Flag"][-1]
    assert export(fhir_base_url, "Flag")[0]["code"] == last_flag["code"]
