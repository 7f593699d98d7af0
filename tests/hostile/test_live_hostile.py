"""The hostile corpus through the live loop: the worker reads the real FHIR engine through a
middleman (tests/hostile/middleman.py) that splices the corpus, as raw bytes, into the engine's
Observation searchset pages.

For each item: the cycle does not crash, no Flag or Communication is written for it, it is counted
in neutrowatch_rejections_total{reason} (and observations_total{outcome="rejected"}), the store's
quarantine table holds it with its reason (a panel rejection: the decision log), and no log line
carries the fake PHI the items hold. Then the poison pages: a page a strict parser refuses as a
whole must not stall the other patients, and a page that cannot be read at all must not be skipped.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from service import metrics
from service.core.copies import UNPLACED, stamped
from service.core.observations import CONFLICT
from service.fhir import raw
from service.fhir.client import FhirClient
from service.fhir.fhirtime import from_epoch_us
from service.fhir.paging import UnreadablePage
from service.live.store.base import Intake
from service.live.store.sqlite import SqliteStore
from service.live.worker import intake
from service.metrics import reason_label
from tests import store_tables
from tests.fhir_server.load import export, put_all
from tests.hostile.corpus import (
    BY_NAME,
    CORPUS,
    LINE_ONLY,
    PHI,
    UPDATED,
    Hostile,
    Outcome,
    bulk_entries,
    duplicate_pair,
    fill,
    neighbour,
    observation,
)
from tests.hostile.logs import captured_logs
from tests.hostile.middleman import Middleman, Splice
from tests.integration.live import compare_with_oracle, cycle, population, settings_for

LIVE = [h for h in CORPUS if h.name not in LINE_ONLY]
POISON = (
    "nan-token",
    "exponent-overflow",
    "non-utf8-in-free-text",
    "non-utf8-in-id",
    "unpaired-surrogate",
    "deeply-nested",
    "invalid-json",
    "control-character",
    "boolean-value",
)


def counter(name: str, label: str) -> Counter[str]:
    """Current values of a labelled counter, by label value."""
    out: Counter[str] = Counter()
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels[label]] = sample.value
    return out


def delta(after: Counter[str], before: Counter[str]) -> Counter[str]:
    return Counter({k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)})


@dataclass
class LiveRun:
    reports: list[Any]
    quarantine: list[tuple[str | None, str]]
    decisions: list[dict[str, Any]]
    results: dict[str, bool]  # Observation ref -> stored with a usable value
    rejections: Counter[str]  # neutrowatch_rejections_total increase, by reason label
    observations: Counter[str]  # neutrowatch_observations_total increase, by outcome
    flagged: set[str]  # patients with a Flag on the server
    told: set[str]  # patients named by a Communication on the server
    log_lines: list[str]


async def _quarantine_and_decisions(state: Path) -> tuple[list[tuple[str | None, str]], list[dict[str, Any]]]:
    store = SqliteStore(state)
    await store.open()
    try:
        return await store_tables.quarantined(store), msgspec.to_builtins(await store.decisions())
    finally:
        await store.close()


async def _through_the_loop(
    base_url: str, state: Path, entries: list[bytes], cycles: int = 2, times: float = 1
) -> LiveRun:
    """`entries` spliced into the first CBC search page of the first `times` cycles."""
    middleman = Middleman(base_url, [Splice(entries, times=times)])
    await middleman.start()
    rejections = counter("neutrowatch_rejections_total", "reason")
    observations = counter("neutrowatch_observations_total", "outcome")
    try:
        settings = settings_for(middleman.base, state)
        with captured_logs("debug") as buffer:
            reports = [await cycle(settings) for _ in range(cycles)]
        assert middleman.spliced_pages == min(times, cycles)
    finally:
        await middleman.stop()
    quarantine, decisions = await _quarantine_and_decisions(state)
    with sqlite3.connect(state) as db:
        results = {
            ref: bool(usable) for ref, usable in db.execute("SELECT ref, data IS NOT NULL FROM results")
        }
    flags, comms = export(base_url, "Flag"), export(base_url, "Communication")
    return LiveRun(
        reports,
        quarantine,
        decisions,
        results,
        delta(counter("neutrowatch_rejections_total", "reason"), rejections),
        delta(counter("neutrowatch_observations_total", "outcome"), observations),
        {f["subject"]["reference"] for f in flags},
        {c["subject"]["reference"] for c in comms},
        buffer.getvalue().splitlines(),
    )


@pytest.fixture(scope="module")
def corpus_run(fhir_engine, tmp_path_factory) -> LiveRun:
    """The whole corpus spliced into the first page of one cycle, valid neighbours on the server."""
    fhir_engine.reset()
    put_all(fhir_engine.base_url, [fill(r) for r in neighbour("before") + neighbour("after")])
    entries = [r for item in LIVE for r in item.resources(UPDATED)]
    state = tmp_path_factory.mktemp("live-corpus") / "state.sqlite3"
    return asyncio.run(_through_the_loop(fhir_engine.base_url, state, entries))


def test_cycles_ran_and_the_neighbours_were_alerted(corpus_run: LiveRun):
    first, second = corpus_run.reports
    assert first.delivered_all and second.delivered_all
    assert first.events == {"new": 2} and second.events == {}  # the neighbours, once
    assert corpus_run.flagged == corpus_run.told == {"Patient/nb-before", "Patient/nb-after"}
    assert first.cursor is not None


@pytest.mark.parametrize("item", LIVE, ids=lambda h: h.name)
def test_each_item_is_kept_counted_and_never_alerted(corpus_run: LiveRun, item: Hostile):
    assert item.patient not in corpus_run.flagged | corpus_run.told
    if item.outcome is Outcome.ACCEPTED:
        assert corpus_run.results[item.ref] is True
        assert not [q for q in corpus_run.quarantine if q[0] == item.ref]
        return
    if item.outcome is Outcome.PANEL_REJECTED:
        (record,) = [d for d in corpus_run.decisions if item.ref in d.get("observations", ())]
        assert record["event"] == "rejected" and record["reason"].startswith(item.reason)
        assert corpus_run.rejections[reason_label(record["reason"])] >= 1
        return
    if (
        item.ref is not None and item.reason == UNPLACED.split(" (")[0]
    ):  # no version: the stamped one read stays in force
        (reason,) = [r for ref, r in corpus_run.quarantine if ref == item.ref]
        assert corpus_run.results[item.ref] is True
    elif item.ref is not None:
        (reason,) = [r for ref, r in corpus_run.quarantine if ref == item.ref]
        taken = intake(next(iter(raw.decode(item.resources()[0]))))  # stamped as the middleman does
        assert isinstance(taken, Intake)
        # Its version is stored as rejected (it supersedes, never alerts); a rejected copy without
        # lastUpdated and versionId (an undecodable entry) is no version at all.
        assert corpus_run.results.get(item.ref) is (
            False if stamped(taken.updated_us, taken.version) else None
        )
    else:  # no FHIR id could be read: quarantined as it is
        reasons = [r for ref, r in corpus_run.quarantine if ref is None and r.startswith(item.reason)]
        same = [h for h in LIVE if h.ref is None and h.reason == item.reason]
        assert len(reasons) == len(same), (item.name, reasons)
        reason = reasons[0]
    assert reason.startswith(item.reason), (item.name, reason)
    assert corpus_run.rejections[reason_label(reason)] >= 1
    records = [
        d
        for d in corpus_run.decisions
        if d["event"] == "rejected"
        and d["reason"] == reason
        and d["observations"] == ([item.ref] if item.ref else [])
    ]
    assert records and records[0]["grade"] is None  # in the decision log too


def test_every_rejection_is_counted_once(corpus_run: LiveRun):
    rejected = [h for h in LIVE if h.outcome is Outcome.REJECTED]
    assert len(corpus_run.quarantine) == len(rejected)
    assert corpus_run.observations["rejected"] == len(rejected)
    panels = [h for h in LIVE if h.outcome is Outcome.PANEL_REJECTED]
    assert sum(corpus_run.rejections.values()) == len(rejected) + len(panels)


def test_no_phi_in_any_log_line(corpus_run: LiveRun):
    lines = corpus_run.log_lines
    assert any('"observation rejected"' in line for line in lines), (
        "nothing logged: the scan would prove nothing"
    )
    assert any('"fhir_page_salvaged"' in line for line in lines)
    for line in lines:
        orjson.loads(line)  # one JSON object a line
        for phi in PHI:
            assert phi not in line, line[:300]
        assert len(line) < 4096, "a log line carries a payload"


# -- duplicates --------------------------------------------------------------------------------------


def _an_hour_ago() -> str:
    """A fixed meta.lastUpdated for entries spliced into every cycle: each cycle then re-reads the same
    version, as the overlap window does (with "@UPDATED@" the middleman stamps them from the search
    bound, which moves with the cursor: a new version every cycle)."""
    return from_epoch_us(int((time.time() - 3600) * 1_000_000))


def _stamped(entries: list[bytes], at: str) -> list[bytes]:
    return [e.replace(UPDATED.encode(), at.encode()) for e in entries]


async def test_conflicting_copies_are_quarantined_as_a_conflict(fhir_base_url, tmp_path):
    """Both copies of the version: each quarantined, counted, logged and recorded as CONFLICT."""
    patient, (first, second, wbc) = duplicate_pair(conflicting=True)
    run = await _through_the_loop(fhir_base_url, tmp_path / "s.sqlite3", [wbc, first, second], cycles=1)
    assert run.quarantine == [("Observation/h-duplicate-conflict", CONFLICT)] * 2
    assert run.rejections == Counter({reason_label(CONFLICT): 2}) and run.observations["rejected"] == 2
    records = [d for d in run.decisions if d["event"] == "rejected"]
    assert [(r["reason"], r["observations"], r["patient"]) for r in records] == [
        (CONFLICT, ["Observation/h-duplicate-conflict"], patient)
    ] * 2
    logged = [orjson.loads(line) for line in run.log_lines if '"observation rejected"' in line]
    assert [(x["observation"], x["code"], x["reason"]) for x in logged] == [
        ("Observation/h-duplicate-conflict", "751-8", CONFLICT)
    ] * 2
    assert run.results["Observation/h-duplicate-conflict"] is False  # the version in force is rejected


@pytest.mark.parametrize("order", ["normal-first", "severe-first"])
async def test_conflicting_copies_none_is_used_in_either_order_and_each_is_quarantined_once(
    fhir_base_url, tmp_path, order
):
    """As in replay: neither copy of the version is used, whichever comes first on the page (no
    alert from the severe one); each is quarantined and counted once however often the overlap
    window reads both again."""
    patient, (first, second, wbc) = duplicate_pair(conflicting=True)
    copies = [first, second] if order == "normal-first" else [second, first]
    entries = _stamped([wbc, *copies], _an_hour_ago())
    run = await _through_the_loop(
        fhir_base_url, tmp_path / "s.sqlite3", entries, cycles=3, times=float("inf")
    )
    assert run.quarantine == [("Observation/h-duplicate-conflict", CONFLICT)] * 2
    assert run.rejections == Counter({reason_label(CONFLICT): 2}) and run.observations["rejected"] == 2
    assert run.observations["seen_before"] == 2 * 3  # cycles 2 and 3: the WBC and both copies, read before
    assert patient not in run.flagged and [r.events for r in run.reports] == [{}, {}, {}]


async def test_a_copy_that_makes_a_version_a_conflict_retracts_what_its_first_copy_alerted(
    fhir_base_url, tmp_path
):
    """Cycle 1 reads only the severe copy: it alerts. From cycle 2 the normal copy of the same
    version comes too: the version is a conflict, both copies are quarantined as CONFLICT (the one
    read first too) and the alert is retracted: the Flag ends entered-in-error, the final state
    replay predicts from the same copies (where it never alerts: no Flag stays active either way)."""
    patient, (normal, severe, wbc) = duplicate_pair(conflicting=True)
    at = _an_hour_ago()
    middleman = Middleman(
        fhir_base_url,
        [
            Splice(_stamped([wbc, severe], at)),
            Splice(_stamped([wbc, severe, normal], at), times=float("inf")),
        ],
    )
    await middleman.start()
    try:
        settings = settings_for(middleman.base, tmp_path / "s.sqlite3")
        reports = [await cycle(settings) for _ in range(3)]
    finally:
        await middleman.stop()
    assert [r.events for r in reports] == [{"new": 1}, {"retracted": 1}, {}]
    quarantine, decisions = await _quarantine_and_decisions(tmp_path / "s.sqlite3")
    assert quarantine == [("Observation/h-duplicate-conflict", CONFLICT)] * 2
    assert [d["event"] for d in decisions] == ["new", "rejected", "rejected", "retracted"]
    flags = [f for f in export(fhir_base_url, "Flag") if f["subject"]["reference"] == patient]
    assert [f["status"] for f in flags] == ["entered-in-error"]


async def test_a_copy_without_meta_after_a_stamped_version_changes_nothing(fhir_base_url, tmp_path):
    """The server's version (normal) is read; then a copy of it without meta (severe) comes on
    every page: it is no version of it, so it neither alerts nor is dropped unseen: quarantined
    and counted once (UNPLACED)."""
    patient, (normal, severe, wbc) = duplicate_pair(conflicting=True)
    at = _an_hour_ago()
    no_meta = orjson.dumps({k: v for k, v in orjson.loads(severe).items() if k != "meta"})
    middleman = Middleman(
        fhir_base_url,
        [
            Splice(_stamped([wbc, normal], at)),
            Splice([no_meta, *_stamped([wbc, normal], at)], times=float("inf")),
        ],
    )
    await middleman.start()
    rejections = counter("neutrowatch_rejections_total", "reason")
    try:
        settings = settings_for(middleman.base, tmp_path / "s.sqlite3")
        reports = [await cycle(settings) for _ in range(4)]
    finally:
        await middleman.stop()
    assert [r.events for r in reports] == [{}, {}, {}, {}]
    quarantine, _decisions = await _quarantine_and_decisions(tmp_path / "s.sqlite3")
    assert quarantine == [("Observation/h-duplicate-conflict", UNPLACED)]
    assert delta(counter("neutrowatch_rejections_total", "reason"), rejections) == Counter(
        {reason_label(UNPLACED): 1}
    )
    assert patient not in {f["subject"]["reference"] for f in export(fhir_base_url, "Flag")}


async def test_an_undecodable_copy_is_quarantined_once_and_never_shadows_a_readable_version(
    fhir_base_url, tmp_path
):
    """An entry that cannot be read but whose id can (intake: lastUpdated and version -1), on every
    page: quarantined once over the cycles. When the server then holds a readable version of that
    Observation, it is read as the newer version (never taken for an older one), decided and
    alerted; the unreadable copy, still sent every cycle, neither withdraws that alert nor is
    quarantined again."""
    item = BY_NAME["invalid-json"]
    middleman = Middleman(fhir_base_url, [Splice(item.resources(_an_hour_ago()), times=float("inf"))])
    await middleman.start()
    rejections = counter("neutrowatch_rejections_total", "reason")
    try:
        settings = settings_for(middleman.base, tmp_path / "s.sqlite3")
        reports = [await cycle(settings) for _ in range(2)]
        oid = item.ref.removeprefix("Observation/")  # type: ignore[union-attr]  # this corpus item has a ref
        put_all(fhir_base_url, [fill(observation(oid, item.patient, value=0.3))])  # readable now: severe
        reports += [await cycle(settings) for _ in range(2)]
    finally:
        await middleman.stop()
    assert middleman.spliced_pages == 4
    assert [r.events for r in reports] == [{}, {}, {"new": 1}, {}]
    assert {f["subject"]["reference"] for f in export(fhir_base_url, "Flag")} == {item.patient}
    quarantine, decisions = await _quarantine_and_decisions(tmp_path / "s.sqlite3")
    ((ref, reason),) = quarantine
    assert ref == item.ref and reason.startswith(item.reason)  # type: ignore[arg-type]  # it has a reason
    assert sum(delta(counter("neutrowatch_rejections_total", "reason"), rejections).values()) == 1
    assert [d["event"] for d in decisions if item.ref in d.get("observations", ())].count("rejected") == 1
    assert "retracted" not in {d["event"] for d in decisions}


async def test_an_undecodable_copy_behind_a_readable_version_is_quarantined_once_and_withdraws_nothing(
    fhir_base_url, tmp_path
):
    """The other order: the server's readable version was read and alerted; then an unreadable copy
    of it comes on every page. It has no meta to order it by, so it neither supersedes the version
    read (no alert withdrawn on an unreadable copy) nor is dropped unseen (it was: "seen before"):
    quarantined and counted once."""
    item = BY_NAME["invalid-json"]
    broken, wbc = item.resources(_an_hour_ago())
    oid = item.ref.removeprefix("Observation/")  # type: ignore[union-attr]  # this corpus item has a ref
    put_all(fhir_base_url, [orjson.loads(wbc), fill(observation(oid, item.patient, value=0.3))])
    middleman = Middleman(fhir_base_url, [Splice([broken], times=float("inf"))])
    await middleman.start()
    rejections = counter("neutrowatch_rejections_total", "reason")
    try:
        settings = settings_for(middleman.base, tmp_path / "s.sqlite3")
        middleman.splices[0].done = float("inf")  # the first cycle reads the server as it is
        reports = [await cycle(settings)]
        middleman.splices[0].done = 0
        reports += [await cycle(settings) for _ in range(3)]
    finally:
        await middleman.stop()
    assert middleman.spliced_pages == 3
    assert [r.events for r in reports] == [{"new": 1}, {}, {}, {}]
    quarantine, decisions = await _quarantine_and_decisions(tmp_path / "s.sqlite3")
    ((ref, reason),) = quarantine
    assert ref == item.ref and reason.startswith(item.reason)  # type: ignore[arg-type]  # it has a reason
    assert sum(delta(counter("neutrowatch_rejections_total", "reason"), rejections).values()) == 1
    assert [d["event"] for d in decisions] == ["new", "rejected"]
    assert [(f["subject"]["reference"], f["status"]) for f in export(fhir_base_url, "Flag")] == [
        (item.patient, "active")
    ]


# -- poison pages ------------------------------------------------------------------------------------


async def _cycles_until_quiet(settings, limit: int = 6) -> list[Any]:
    reports = []
    for _ in range(limit):
        report = await cycle(settings)
        reports.append(report)
        if report.new_versions == 0 and report.written == 0:
            break
    return reports


async def test_a_poison_page_does_not_stall_the_other_patients(fhir_base_url, tmp_path):
    """Every Observation search page carries NaN tokens, bytes that are not UTF-8, 100 000 levels of
    nesting and a syntax error, on every read. Such a page used to be retried as a truncated body
    and then fail the cycle, every cycle: no patient's alert ever went out. Now each page is read
    entry by entry: every other patient's alerts are written (exactly replay's), the poison entries
    are quarantined, the cursor moves."""
    put_all(fhir_base_url, population(patients=8, days=35, seed=9))
    poison = [r for name in POISON for r in BY_NAME[name].resources(UPDATED)[:1]]
    middleman = Middleman(fhir_base_url, [Splice(poison, times=float("inf"))])
    await middleman.start()
    salvaged = counter("neutrowatch_damaged_pages_total", "handling")["salvaged"]
    try:
        settings = settings_for(middleman.base, tmp_path / "s.sqlite3", page_size=20)
        reports = await _cycles_until_quiet(settings)
    finally:
        await middleman.stop()
    assert middleman.spliced_pages >= 2
    assert all(r.delivered_all for r in reports) and reports[0].cursor is not None
    assert (
        counter("neutrowatch_damaged_pages_total", "handling")["salvaged"] - salvaged
        >= middleman.spliced_pages
    )
    counts = compare_with_oracle(fhir_base_url, tmp_path / "oracle")  # the oracle reads the engine itself
    assert counts["communications"] > 5
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    quarantined = {ref for ref, _reason in await store_tables.quarantined(store)}
    await store.close()
    assert {BY_NAME[n].ref for n in POISON} <= quarantined


def _truncate(page: bytes) -> bytes:
    return page[: len(page) * 2 // 3]


async def test_a_page_truncated_the_same_way_every_time_is_read_up_to_the_cut_then_refused(
    fhir_base_url, tmp_path
):
    """Broken framing is retried (a transfer cut short); the same bytes again: the entries before
    the cut are read and the search stops there. When the next search returns the very same broken
    page (its first entries lie in the overlap window: no progress), the cycle fails — the page is
    never skipped — and once the server sends whole pages again, nothing is missing."""
    put_all(fhir_base_url, population(patients=6, days=28, seed=5))
    middleman = Middleman(fhir_base_url, [Splice([], mangle=_truncate, times=float("inf"))])
    await middleman.start()
    before = counter("neutrowatch_damaged_pages_total", "handling")
    try:
        settings = settings_for(middleman.base, tmp_path / "s.sqlite3", page_size=30)
        async with FhirClient(settings.fhir) as client:  # one running process: its client remembers the page
            first = await cycle(settings, client=client)
            assert first.delivered_all and 0 < first.observations < 30
            with pytest.raises(UnreadablePage, match="not skipped, the cursor stays"):
                await cycle(settings, client=client)
        handled = delta(counter("neutrowatch_damaged_pages_total", "handling"), before)
        assert handled["retried"] >= 1 and handled["prefix"] >= 1 and handled["refused"] >= 1
        middleman.splices.clear()  # the server heals
        reports = await _cycles_until_quiet(settings)
    finally:
        await middleman.stop()
    assert all(r.delivered_all for r in reports)
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def test_a_page_that_is_not_json_at_all_fails_the_cycle_and_is_never_skipped(fhir_base_url, tmp_path):
    put_all(fhir_base_url, population(patients=4, days=21, seed=2))
    middleman = Middleman(
        fhir_base_url,
        [Splice([], mangle=lambda _page: b"<html><body>502 Bad Gateway</body></html>", times=float("inf"))],
    )
    await middleman.start()
    try:
        settings = settings_for(middleman.base, tmp_path / "s.sqlite3")
        for _ in range(2):
            with pytest.raises(UnreadablePage):
                await cycle(settings)
        assert export(fhir_base_url, "Communication") == []
        store = SqliteStore(tmp_path / "s.sqlite3")
        await store.open()
        assert await store.get_cursor() is None  # not moved past what could not be read
        await store.close()
        middleman.splices.clear()
        reports = await _cycles_until_quiet(settings)
    finally:
        await middleman.stop()
    assert all(r.delivered_all for r in reports)
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


# -- 30 000 entries on one page ----------------------------------------------------------------------


async def test_a_page_of_30000_entries_is_processed_whole(fhir_base_url, tmp_path):
    """A server that ignores _count and answers 30 000 entries on one page, with poison among them:
    all are read, stored and assessed; the poison is quarantined; the severe ones alert."""
    entries = bulk_entries(30_000, updated=UPDATED)
    for n, name in enumerate(("nan-token", "non-utf8-in-free-text", "deeply-nested")):
        entries.insert(9_000 * (n + 1), BY_NAME[name].resources(UPDATED)[0])
    put_all(fhir_base_url, [fill(r) for r in neighbour("anchor")])  # one real page for the splice to ride on
    run = await _through_the_loop(fhir_base_url, tmp_path / "s.sqlite3", entries, cycles=1)
    (report,) = run.reports
    assert report.delivered_all
    assert report.observations == 30_000 + 3 + 2
    assert sum(run.results.values()) == 30_000 + 2  # stored with a value (bulk + the anchor panel)
    assert run.flagged == {f"Patient/bulk-{p}" for p in range(10)} | {"Patient/nb-anchor"}
    assert {ref for ref, _ in run.quarantine} == {
        BY_NAME[n].ref for n in ("nan-token", "non-utf8-in-free-text", "deeply-nested")
    }


# -- a meta.lastUpdated the server cannot have written ---------------------------------------------


async def test_a_future_last_updated_does_not_carry_the_cursor_away(fhir_base_url, tmp_path):
    """One Observation stamped 9999-12-31 used to become the cursor: every later result fell below
    it and was never read, for every patient, while the cycles reported success. Now a stamp beyond
    the server's clock (its Date header; ours plus an hour without one) is a rejection: quarantined,
    counted, never the cursor."""
    put_all(fhir_base_url, [fill(r) for r in neighbour("early", 2.5)])
    future = orjson.dumps(
        fill(neighbour("future", 0.2)[1], "9999-12-31T00:00:00.000Z")
    )  # a severe ANC, stamped in 9999
    middleman = Middleman(fhir_base_url, [Splice([future])])
    await middleman.start()
    try:
        settings = settings_for(middleman.base, tmp_path / "s.sqlite3")
        first = await cycle(settings)
        assert first.cursor is not None and not first.cursor.startswith("9999")
        put_all(
            fhir_base_url, [fill(r) for r in neighbour("later", 0.2)]
        )  # a severe panel arrives afterwards
        second = await cycle(settings)
    finally:
        await middleman.stop()
    assert second.events == {"new": 1}
    assert {f["subject"]["reference"] for f in export(fhir_base_url, "Flag")} == {"Patient/nb-later"}
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    quarantined = await store_tables.quarantined(store)
    assert (
        "Observation/nb-future-anc",
        "meta.lastUpdated is later than the server's own clock",
    ) in quarantined
    await store.close()
