"""The fault campaign's CI form (a fixed seed, SQLite, >= 200 injected faults, a few minutes on two
cores) and back-pressure: slow search pages make cycles slower, never overlapping, and every alert
still arrives exactly once. The longer soak: `python -m tests.chaos.campaign --seed N --faults M`."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from service.config import ResolutionSettings, Settings
from service.fhir.errors import FhirError
from service.fhir.fhirtime import to_epoch_us
from tests.chaos import proxy as px
from tests.chaos.campaign import CampaignSpec, is_cbc, required_kinds, run_campaign
from tests.chaos.harness import ServiceProcess, StoreProbe, free_port, log_time, put_batch, read_log
from tests.fhir_server.load import export
from tests.integration.live import compare_with_oracle, population, settings_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CI_SEED = int(
    os.environ.get("NEUTROWATCH_CHAOS_SEED", "20261122")
)  # the override: local reruns with other seeds
CI_FAULTS = 200


async def test_fault_campaign_loses_and_doubles_no_alert(fhir_base_url: str, tmp_path: Path) -> None:
    result = await run_campaign(
        fhir_base_url, tmp_path / "campaign", CampaignSpec(seed=CI_SEED, faults=CI_FAULTS)
    )
    print(result.summary)
    assert not result.problems, result.summary
    assert all(result.counts[k] >= 1 for k in required_kinds("sqlite")), result.summary
    assert sum(result.counts.values()) >= CI_FAULTS
    a = result.alerts
    assert a["communications_expected"] > 10
    assert a["communications_found"] == a["communications_expected"]
    assert (
        a["communications_missing"] == a["communications_duplicated"] == a["communications_unexpected"] == 0
    )
    assert a["flags_found"] == a["flags_expected"] and a["flags_duplicated"] == 0


SLOW_PAGE = 2.0


async def test_slow_search_pages_slow_the_cycles_down_without_overlap(
    fhir_base_url: str, tmp_path: Path
) -> None:
    """Every Observation search page answered 2 s late (poll interval 0.5 s): cycles take longer
    than the interval, APScheduler skips the runs that fall due meanwhile (max_instances=1), no two
    cycles ever run at once, SIGTERM in the middle of a slow cycle lets it finish and exits 0 within
    10 s, the next start resumes, and the server ends with exactly replay's alerts."""
    proxy = px.Proxy(fhir_base_url)
    proxy.add(
        px.Fault(
            lambda r: r.method == "GET" and r.path.endswith("/Observation"),
            times=float("inf"),
            delay=SLOW_PAGE,
            kind="slow-page",
        )
    )
    await proxy.start()
    state = tmp_path / "state.sqlite3"
    settings = settings_for(proxy.base, state, page_size=100, interval_seconds=0.5, overlap_seconds=3)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    service = ServiceProcess(config, tmp_path / "service.log", free_port())
    probe = StoreProbe(sqlite_path=state)
    resources = population(patients=6, days=28, seed=4)
    half = len(resources) // 2
    lifetimes: list[tuple[float, float]] = []
    try:
        put_batch(fhir_base_url, resources[:half])
        began = time.time()
        service.start()
        await _caught_up(probe, service, fhir_base_url)
        put_batch(fhir_base_url, resources[half:])
        await _caught_up(probe, service, fhir_base_url)
        # SIGTERM a moment into the next (idle) cycle's first slow page
        seen = proxy.counts["slow-page"]
        while proxy.counts["slow-page"] == seen:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        drained = await service.terminate(timeout=15)
        lifetimes.append((began, time.time()))
        began = time.time()
        service.start()  # resumes: two more cycles
        await _cycles(service, 2)
        metrics = await service.metrics()  # of this second process
        wall = time.time() - began
        stopped = await service.terminate(timeout=15)
        lifetimes.append((began, time.time()))
    finally:
        if service.alive:
            service.kill9()
        await proxy.stop()
    records = list(read_log(service.log_path))
    summary = (
        _overlap_evidence(proxy, records, metrics, wall, lifetimes)
        + f"; SIGTERM (code, s): {drained}, {stopped}"
    )
    print(summary)
    assert drained[0] == 0 and drained[1] <= 10 and stopped[0] == 0, (summary, service.log_tail())
    # drained, not cut: the cycle under way at SIGTERM finished (its "poll cycle" record comes
    # between "stopping" and "stopped") and no cycle was cancelled
    events = [r.get("event") for r in records]
    first_stop = events.index("stopping")
    assert "poll cycle" in events[first_stop : events.index("stopped", first_stop)], summary
    assert not any("raised an exception" in str(e) for e in events), summary
    # never two cycles at once: within each process's life, its search requests never overlap
    for born, died in lifetimes:
        spans = _searches(proxy, born, died)
        assert spans and all(b[0] >= a[1] for a, b in zip(spans, spans[1:], strict=False)), summary
    ends = [log_time(r) for r in records if r.get("event") == "poll cycle"]
    assert len(ends) >= 4 and all(b - a >= SLOW_PAGE - 0.05 for a, b in zip(ends, ends[1:], strict=False)), (
        summary
    )
    assert any("maximum number of running instances reached" in str(e) for e in events), summary
    duration_sum, count = (
        metrics["neutrowatch_poll_duration_seconds_sum"],
        metrics["neutrowatch_poll_duration_seconds_count"],
    )
    assert count >= 2 and duration_sum <= wall and duration_sum / count >= SLOW_PAGE, summary
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def _cycles(service: ServiceProcess, n: int, timeout: float = 60) -> None:
    """Until the running process logged `n` completed cycles."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        records = list(read_log(service.log_path))
        starts = [i for i, r in enumerate(records) if r.get("event") == "service started"]
        if (
            len(starts) == service.starts
            and sum(1 for r in records[starts[-1] :] if r.get("event") == "poll cycle") >= n
        ):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"fewer than {n} cycles in {timeout} s\n{service.log_tail()}")


async def _caught_up(probe: StoreProbe, service: ServiceProcess, base_url: str, timeout: float = 120) -> None:
    """Until the cursor passed the newest monitored Observation and nothing is pending."""
    target = max(to_epoch_us(o["meta"]["lastUpdated"]) for o in export(base_url, "Observation") if is_cbc(o))
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        cursor = await probe.cursor_us()
        if cursor is not None and cursor >= target and await probe.pending() == 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no catch-up in {timeout} s\n{service.log_tail()}")


def _searches(proxy: px.Proxy, born: float, died: float) -> list[tuple[float, float]]:
    """(start, end) of the Observation searches one process made (started within its life)."""
    return sorted(
        (s.started, s.ended or died)
        for s in proxy.seen
        if s.method == "GET" and s.raw_path.startswith("/Observation") and born <= s.started <= died
    )


def _overlap_evidence(
    proxy: px.Proxy,
    records: list[dict],
    metrics: dict[str, float],
    wall: float,
    lifetimes: list[tuple[float, float]],
) -> str:
    ends = [log_time(r) for r in records if r.get("event") == "poll cycle"]
    gaps = [round(b - a, 2) for a, b in zip(ends, ends[1:], strict=False)]
    skipped = sum(
        1 for r in records if re.search("maximum number of running instances", str(r.get("event", "")))
    )
    overlaps = sum(
        1
        for born, died in lifetimes
        for a, b in zip(_searches(proxy, born, died), _searches(proxy, born, died)[1:], strict=False)
        if b[0] < a[1]
    )
    return (
        f"searches through the proxy: {proxy.counts['slow-page']} (each {SLOW_PAGE} s late), "
        "overlapping pairs within "
        f"one process: {overlaps}; cycles: {len(ends)}, gaps between their ends {gaps}; "
        f"APScheduler runs skipped (max_instances=1): {skipped}; second process: poll_duration_seconds sum "
        f"{metrics.get('neutrowatch_poll_duration_seconds_sum', 0):.1f} s over count "
        f"{metrics.get('neutrowatch_poll_duration_seconds_count', 0):.0f} in {wall:.1f} s of wall time"
    )


def one_normal_resolves(settings: Settings) -> Settings:
    """The former resolution rule (one normal panel closes an episode), set explicitly: the episode and
    Communication ids below were found under it; what is tested is the truncated page, not resolution."""
    legacy = ResolutionSettings(confirmations=1, min_hours=0, reopen_days=0, memory_days=0)
    return settings.model_copy(
        update={"clinical": settings.clinical.model_copy(update={"resolution": legacy})}
    )


async def test_a_temperature_page_truncated_twice_loses_no_febrile_alert(fhir_engine, tmp_path: Path) -> None:
    """One patient of the campaign's seed-11 population, stage by stage; in the stage that brings the
    second reading of a sustained fever and a severe ANC, the temperature search's page comes back
    truncated the same way twice. Without the fault the febrile alert is sent (checked first). Found
    by the campaign (seed 11, PostgreSQL): the client read the page up to the cut as if it were the
    last, the worker decided without the unread temperatures and moved their cursor past them.
    Now a cut-short temperature page fails the cycle and the next one reads it whole."""
    from tests.chaos.campaign import split_stages
    from tests.integration.live import cycle

    stages = [
        [r for r in s if r["id"].startswith("nw11-p00017-")]
        for s in split_stages(
            population(patients=42, days=42, seed=11, temperatures=True, corrections=0.03), 16
        )
    ]
    febrile = "de14532153cd534542e9ef35a07734a1-febrile-3"

    async def run(base: str, truncate: bool, state: Path) -> set[str]:
        proxy = px.Proxy(base)
        await proxy.start()
        try:
            settings = one_normal_resolves(settings_for(proxy.base, state, page_size=10, overlap_seconds=3))
            for i, stage in enumerate(stages):
                if stage:
                    put_batch(base, stage)
                    if i == 13 and truncate:
                        proxy.add(
                            px.Fault(
                                lambda r: r.method == "GET" and "subject=" in r.query_string,
                                times=2,
                                mutate=lambda status, headers, body: (
                                    status,
                                    headers,
                                    body[: len(body) // 2],
                                ),
                            )
                        )
                        with pytest.raises(FhirError, match="truncated twice"):
                            await cycle(settings)  # nothing decided on a partial view of the temperatures
                        assert febrile not in {
                            c["identifier"][0]["value"] for c in export(base, "Communication")
                        }
                    await cycle(settings)
        finally:
            await proxy.stop()
        return {c["identifier"][0]["value"] for c in export(base, "Communication")}

    fhir_engine.reset()
    assert febrile in await run(fhir_engine.base_url, False, tmp_path / "clean.sqlite3")
    fhir_engine.reset()
    assert febrile in await run(fhir_engine.base_url, True, tmp_path / "cut.sqlite3")


@pytest.mark.parametrize("seed", [7, 11, 20261122])
def test_stages_never_hold_two_later_versions_of_one_draw(seed: int) -> None:
    """The staging that keeps replay an exact oracle: a draw's first versions arrive together, each
    later version after the one before it, and no stage holds two later versions of one draw
    (seed 7 had a corrected WBC and neutrophil % in one stage: replay, taking them one by one,
    predicted an alert the live loop rightly never sent)."""
    from tests.chaos.campaign import _DRAW, split_stages

    resources = population(
        patients=114 if seed == 7 else 40, days=42, seed=seed, temperatures=True, corrections=0.03
    )
    stages = split_stages(resources, 41)
    seen: dict[tuple[str, str], int] = {}
    first_of_draw: dict[str, int] = {}
    later_in_stage: dict[tuple[str, int], int] = {}
    for i, stage in enumerate(stages):
        for r in stage:
            key = (r["resourceType"], r["id"])
            m = _DRAW.match(r["id"]) if r["resourceType"] in ("Observation", "DiagnosticReport") else None
            draw = m.group(1) if m else r["id"]
            if key in seen:
                assert i > seen[key], key
                later_in_stage[(draw, i)] = later_in_stage.get((draw, i), 0) + 1
            else:
                assert first_of_draw.setdefault(draw, i) == i, draw
            seen[key] = i
    assert sum(later_in_stage.values()) > 10  # the population does hold corrections
    assert max(later_in_stage.values()) == 1
