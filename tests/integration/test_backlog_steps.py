"""A backlog is worked through in bounded steps against the real engine: each step reads at most
poll.max_pages_per_step pages, decides, posts and moves the cursor; a kill between steps loses at most
that step; /readyz says "catching up" while steps commit and "stuck" when they stop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from service import metrics
from service.config import Settings
from service.fhir.client import FhirClient
from service.fhir.fhirtime import to_epoch_us
from service.live.app import Service
from service.live.report import CycleReport
from service.live.store import make_store
from service.live.store.base import Store
from service.live.web import make_app
from service.live.worker import Worker
from tests.builders import observation
from tests.fhir_server.engine import FhirEngine
from tests.fhir_server.load import export, put_all
from tests.integration.live import compare_with_oracle, cycle, oracle, population, settings_for

TEMPERATURE = "8310-5"
Hook = Callable[[int, str], Awaitable[None]]


def _monitored_updated(base_url: str) -> list[int]:
    """meta.lastUpdated (epoch µs) of every monitored Observation the server holds."""
    return sorted(
        to_epoch_us(r["meta"]["lastUpdated"])
        for r in export(base_url, "Observation")
        if r["code"]["coding"][-1]["code"] != TEMPERATURE
    )


def _watch_commits(store: Store, hook: Hook) -> list[tuple[str, int, int]]:
    """Wrap the store's set_cursor (the commit of a step): after each commit record (cursor, results
    stored, writes pending) and await `hook(n, cursor)`."""
    commits: list[tuple[str, int, int]] = []
    original = store.set_cursor

    async def set_cursor(value: str) -> None:
        await original(value)
        commits.append((value, (await store.counts())["results"], await store.outbox_pending_count()))
        await hook(len(commits), value)

    store.set_cursor = set_cursor  # type: ignore[method-assign]  # the store's method patched for this test
    return commits


async def _nothing(_n: int, _cursor: str) -> None:
    return None


async def _cycle_watched(
    settings: Settings, hook: Hook = _nothing
) -> tuple[CycleReport, list[tuple[str, int, int]]]:
    store = make_store(settings.store)
    await store.open()
    try:
        assert await store.lead()
        commits = _watch_commits(store, hook)
        async with FhirClient(settings.fhir) as client:
            return await Worker(settings, client, store).run_cycle(), commits
    finally:
        await store.close()


async def test_a_backlog_is_read_in_steps_that_each_commit_and_end_as_replay_predicts(
    fhir_base_url, tmp_path
):
    """With 7 entries a page and 2 pages a step, one cycle takes many steps; after each, the cursor
    has moved forward, every monitored Observation updated before it is in the store (the cursor
    never passes anything unread) and no write is pending (nor anything undelivered). The cycle
    ends caught up, the backlog gauge back at 0, and the server holds exactly replay's alerts."""
    put_all(fhir_base_url, population(patients=8, days=35, seed=9))
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3", page_size=7, max_pages_per_step=2)
    updated = _monitored_updated(fhir_base_url)
    steps_before = (
        metrics.REGISTRY.get_sample_value("neutrowatch_steps_total", {"outcome": "committed"}) or 0.0
    )
    report, commits = await _cycle_watched(settings)
    assert report.caught_up and report.delivered_all
    assert report.search_pages >= len(updated) // 7
    assert (
        report.steps == len(commits) == -(-report.search_pages // 2) > 5
    )  # 2 pages a step, every step committed
    cursors = [to_epoch_us(c) for c, _, _ in commits]
    assert cursors == sorted(cursors) and len(set(cursors)) > 5  # forward, step by step
    for cursor, stored, pending in commits:
        assert pending == 0, "the cursor moved past an undelivered write"
        assert stored >= sum(1 for u in updated if u < to_epoch_us(cursor)), (
            "the cursor passed an unread Observation"
        )
    assert commits[-1][1] == len(updated)
    assert (
        metrics.REGISTRY.get_sample_value("neutrowatch_steps_total", {"outcome": "committed"})
        == steps_before + report.steps
    )
    assert metrics.REGISTRY.get_sample_value("neutrowatch_backlog_pages") == 0
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def test_a_kill_between_steps_then_a_restart_loses_nothing_and_doubles_nothing(
    fhir_base_url, tmp_path, state, monkeypatch
):
    """The cycle task is cancelled right after its third step committed (a kill -9 between steps).
    The stored cursor is that step's; the restarted process reads on from it (with no overlap
    window, it reads only what is left, i.e. the kill cost no committed step), stores no version
    twice, and the server ends with exactly replay's alerts, none doubled."""
    put_all(fhir_base_url, population(patients=8, days=35, seed=9))
    settings = settings_for(fhir_base_url, state, page_size=7, max_pages_per_step=2, overlap_seconds=0)
    updated = _monitored_updated(fhir_base_url)
    killed = asyncio.Event()

    async def hang_after_third(n: int, _cursor: str) -> None:
        if n == 3:
            killed.set()
            await asyncio.Event().wait()  # blocks until cancelled

    task = asyncio.create_task(_cycle_watched(settings, hang_after_third))
    await asyncio.wait_for(killed.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    store = make_store(settings.store)
    await store.open()
    try:
        cursor = await store.get_cursor()
        stored = (await store.counts())["results"]
    finally:
        await store.close()
    assert cursor is not None and 0 < stored < len(updated)
    assert stored >= sum(1 for u in updated if u < to_epoch_us(cursor))

    searched: list[str] = []
    original = FhirClient.search

    def recording(self: FhirClient, resource_type: str, params: list[tuple[str, str]]) -> Any:
        searched.extend(v for k, v in params if k == "_lastUpdated" and "subject" not in dict(params))
        return original(self, resource_type, params)

    monkeypatch.setattr(FhirClient, "search", recording)
    report = await cycle(settings)  # the restart
    assert report.caught_up and report.delivered_all
    assert report.new_versions == len(updated) - stored  # nothing stored twice, nothing left out
    assert (
        searched[0] == "ge" + cursor
    )  # it reads on from the third step (no overlap here), not from the start
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")
    again = await cycle(settings)
    assert (again.written, again.new_versions) == (0, 0)


async def test_readyz_says_catching_up_while_steps_commit_and_stuck_when_the_server_goes_away(
    fhir_engine, tmp_path
):
    """During a long catch-up (many steps, one cycle) /readyz is 200 "catching up" with the pages
    read and the lag, and /metrics shows the backlog pages and steps; when the FHIR server goes
    away mid-catch-up the cycle gives up and, once no step has committed for 3 intervals, /readyz
    is 503 "stuck" with the reason."""
    engine = FhirEngine()  # its own engine, to stop in the middle (the shared one serves the other tests)
    base = await asyncio.to_thread(engine.start)
    put_all(base, population(patients=6, days=28, seed=5))
    settings = settings_for(
        base, tmp_path / "s.sqlite3", page_size=7, max_pages_per_step=2, interval_seconds=1.0
    )
    seen: dict[int, tuple[int, str, str]] = {}
    try:
        async with Service(settings) as service:
            assert await service.open_store() and await service.lead()
            async with TestClient(TestServer(make_app(service.ready))) as http:

                async def probe(
                    n: int, _cursor: str
                ) -> None:  # n: the step committing (the one before is complete)
                    if n in (1, 2, 3):
                        ready = await http.get("/readyz")
                        seen[n] = (
                            ready.status,
                            await ready.text(),
                            await (await http.get("/metrics")).text(),
                        )
                    if n == 3:
                        await asyncio.to_thread(
                            engine.stop
                        )  # the server goes away in the middle of the catch-up

                _watch_commits(service.store, probe)
                assert await service.cycle() is None  # the cycle gave up after the server went away
                assert service.worker is not None and service.worker.progress.catching_up
                assert seen[1][:2] == (503, "not ready: no successful poll yet\n")  # no step complete yet
                assert seen[2][0] == 200 and seen[2][1].startswith(
                    "ready: catching up: 2 pages read, lag "
                ), seen[2][1]
                assert seen[3][0] == 200 and seen[3][1].startswith(
                    "ready: catching up: 4 pages read, lag "
                ), seen[3][1]
                metrics_text = seen[3][2]
                assert "neutrowatch_backlog_pages 4.0" in metrics_text  # after step 2
                assert 'neutrowatch_steps_total{outcome="committed"}' in metrics_text
                ok, why = service.ready()
                if ok:  # the cycle gave up within 3 intervals of the last step: still counted as progress
                    assert why.startswith("catching up")
                    await asyncio.sleep(3 * settings.poll.interval_seconds)
                stuck = await http.get("/readyz")
                body = await stuck.text()
                assert (
                    stuck.status == 503
                    and body.startswith("not ready: stuck: no progress for ")
                    and "gave up" in body
                ), body
    finally:
        await asyncio.to_thread(engine.stop)


async def test_temperatures_in_small_steps_keep_the_order_of_availability(fhir_base_url, tmp_path):
    """With body temperatures searched per patient (poll.temperatures: open-episodes) and a backlog
    read 2 pages of 10 a step, each step takes only temperatures updated up to what the main search
    has read, and incomplete panels wait for the pages still to come: the febrile events, and every
    other alert, are exactly replay's (a temperature read ahead would be decided before the same
    patient's earlier panels, e.g. remembered for the next episode instead of raising a fever in
    this one)."""
    put_all(fhir_base_url, population(patients=24, days=56, seed=1, temperatures=True))
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3", page_size=10, max_pages_per_step=2)
    report = await cycle(settings)
    assert report.caught_up and report.steps > 20
    events, _ = oracle(fhir_base_url, tmp_path / "predicted")
    assert sum(1 for e in events if e["event"] == "febrile") >= 1
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def test_a_panel_waiting_for_its_other_results_keeps_the_patients_later_panels_behind_it(
    fhir_base_url, tmp_path
):
    """A patient's WBC is read in the first step, its neutrophil count only at the end of the
    backlog, and a later complete panel of the same patient in between. Replay judges the first
    panel at its first availability, with both results (severe), then the later one; the live loop
    must not decide the later panel while the earlier one waits for its other result (it would
    open the episode on the later panel and find the first one stale): the patient's later panels
    wait behind it, and the server ends with exactly replay's alerts."""

    def cbc(pid: str, day: str, wbc: float, anc: float, tag: str) -> list[dict[str, Any]]:
        kw = dict(
            patient=f"Patient/{pid}", effective=f"2026-03-{day}T08:00:00Z", specimen=f"Specimen/{pid}-{day}"
        )
        return [
            observation("6690-2", wbc, id=f"{pid}-{day}-wbc{tag}", **kw),
            observation("751-8", anc, id=f"{pid}-{day}-anc{tag}", **kw),
        ]

    first_wbc, first_anc = cbc("late", "01", 2.5, 0.4, "")
    fillers = [r for i in range(12) for r in cbc(f"f{i}", "02", 5.0, 3.0, "")]
    arrivals = [first_wbc, *fillers[:12], *cbc("late", "03", 2.8, 0.8, ""), *fillers[12:], first_anc]
    put_all(fhir_base_url, arrivals, batch_size=1)  # one request each: arrivals in this order
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3", page_size=5, max_pages_per_step=1)
    report = await cycle(settings)
    assert report.caught_up and report.steps >= 5
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")
