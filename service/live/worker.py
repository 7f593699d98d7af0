"""One poll cycle: deliver leftovers, then steps until the search is read to its end, each: search (at
most poll.max_pages_per_step pages) -> normalise -> store -> temperatures -> decide -> outbox -> post ->
advance the cursor. Effectively once: decisions and their writes are stored in one transaction, writes
are conditional creates keyed on deterministic identifiers, and the cursor moves only after the
server has confirmed every write; a kill loses at most the step in progress."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from service import metrics
from service.output.alerts import AlertWrites, outbox_fields, provenance_entry
from service.fhir import raw
from service.core.anc import is_complete
from service.core.codes import cbc_codes, temperature_codes
from service.core.episodes import PatientState
from service.fhir.fhirtime import from_epoch_us, to_epoch_us
from service.core.observations import (
    DEFAULT_READ,
    Ignored,
    LabResult,
    ReadPolicy,
    Rejected,
    normalise,
    undecodable_rejection,
    version_number,
)
from service.core.panels import decide, panel_key
from service.config import Settings
from service.live.directory import LiveDirectory
from service.errors import NeutrowatchError
from service.output.events import rejected_record
from service.fhir.client import FhirClient, Page, transient_status
from service.fhir.query import code_values, merged, split_searches
from service.live.terminology import ServerConceptMaps
from service.fhir.errors import FhirError, PreconditionFailed
from service.output.outcomes import failure_record, panel_outcome
from service.live.store.base import Decided, Intake, OutboxEntry, PanelWork, Store

log = structlog.get_logger("neutrowatch.worker")
TEMPERATURE_BATCH = 20  # patients per temperature search (subject=a,b,...)
DECIDE_BATCH = 1000  # dirty panels read, decided and committed at a time
TARGET_ATTEMPTS = 3  # Flag+Communication requests per write: 412 re-reads, re-posts after a mixed answer
ENTRY_BACKOFF_SECONDS = 0.5  # first backoff (full jitter, doubling) before re-posting entries refused transiently
KNOWN_FLAGS = 5000  # episodes' Flags (id, version, content) the worker remembers between writes
LOINC = "http://loinc.org"


@dataclass
class CycleReport:
    pages: int = 0
    observations: int = 0
    new_versions: int = 0
    panels_assessed: int = 0
    events: dict[str, int] = field(default_factory=dict)
    written: int = 0
    delivered_all: bool = True
    temperature_searches: int = 0
    cursor: str | None = None
    search_pages: int = 0  # pages of the main search (`pages` counts temperature searches' pages too)
    steps: int = 0  # steps taken (each: at most poll.max_pages_per_step pages, decided, posted, committed)
    caught_up: bool = False  # the search was read to its end (False: stopped between steps)


@dataclass
class Progress:
    """What /readyz and the metrics say about the cycle in progress: updated after every step, so a
    long catch-up is visibly working (a step committed recently) or visibly stuck (none did)."""

    step_at: float | None = None  # local time the last step committed (read, decided, delivered, cursor moved)
    catching_up: bool = False  # a cycle has committed a step and has not yet read to the end of the search
    pages: int = 0  # pages of the main search read so far by the cycle in progress
    lag_seconds: float | None = None  # now - the newest meta.lastUpdated read, after the last step
    writes_pending: bool = False  # the last step ended with writes the server has not confirmed (the cursor stayed)


def intake(resource: raw.Resource | raw.Undecodable, policy: ReadPolicy = DEFAULT_READ) -> Intake | Rejected | Ignored:
    """A search entry as the store takes it: an Intake, a Rejected without an id (quarantined
    only), or Ignored (another resource type, or a code not monitored)."""
    if isinstance(resource, raw.Undecodable):
        if resource.resource_type not in (None, "Observation"):
            return Ignored(f"undecodable {resource.resource_type}")
        rejected = undecodable_rejection(resource, policy)
        if rejected.ref is None:
            return rejected
        return Intake(rejected.ref, -1, -1, rejected.patient, None, rejected)
    if resource.resourceType != "Observation":
        return Ignored(f"{resource.resourceType} not used")
    outcome = normalise(resource, policy)
    if isinstance(outcome, Ignored):
        return outcome
    if isinstance(outcome, Rejected) and outcome.ref is None:
        return outcome
    updated = outcome.updated_us if outcome.updated_us is not None else -1
    panel = panel_key(outcome, None) if isinstance(outcome, LabResult) else None
    return Intake(outcome.ref, updated, version_number(outcome.version), outcome.patient, panel, outcome)  # type: ignore[arg-type]


def search_params(settings: Settings, cursor: str | None, now: float) -> tuple[list[tuple[str, str]], int]:
    """The Observation search (without its _lastUpdated bound) and the instant to read from: the
    cursor less the overlap window, or the initial look-back."""
    poll = settings.poll
    if cursor is not None:
        since_us = to_epoch_us(cursor) - int(poll.overlap_seconds * 1_000_000)
    else:
        since_us = int((now - poll.initial_lookback_hours * 3600) * 1_000_000)
    codes = cbc_codes() + (temperature_codes() if poll.temperatures == "all" else [])
    params = [
        ("code", ",".join(f"{LOINC}|{c}" for c in codes)),
        ("_sort", "_lastUpdated"),
        ("_count", str(settings.fhir.page_size)),
    ]
    if poll.category:
        params.append(("category", poll.category))
    return params, max(since_us, 0)


def _updated(resource: raw.Resource | raw.Undecodable) -> int | None:
    if isinstance(resource, raw.Resource) and resource.meta is not None and resource.meta.lastUpdated:
        try:
            return to_epoch_us(resource.meta.lastUpdated)
        except ValueError:
            return None
    return None


async def whole_result(pages: AsyncIterator[Page]) -> AsyncIterator[Page]:
    """The pages of a search whose whole result this cycle's decisions need (temperatures): a page
    the client had to cut short fails the cycle before its entries are taken, so neither the
    decisions nor the temperature cursors move on a partial view (next cycle asks again)."""
    async for page in pages:
        if page.cut_short:
            raise FhirError("a temperature search page came back truncated twice: the cycle is retried")
        yield page


async def updated_until(pages: AsyncIterator[Page], bound_us: int | None) -> AsyncIterator[Page]:
    """The pages with only the resources updated at or before `bound_us` (all of them when None;
    a resource without a readable meta.lastUpdated is kept: it cannot be placed later)."""
    async for page in pages:
        if bound_us is not None:
            page = replace(page, resources=[r for r in page.resources if (u := _updated(r)) is None or u <= bound_us])
        yield page


async def pages_since(
    client: FhirClient, resource_type: str, params: list[tuple[str, str]], since_us: int, anchor: str = "_lastUpdated"
) -> AsyncIterator[Page]:
    """Every page of `params` with `anchor` >= `since_us`, sorted by _lastUpdated, robust to a result
    set that changes while it is read.

    Following offset-based `next` links over a live result set skips a resource whenever an earlier
    one is updated meanwhile (it moves to the end and everything after it shifts up by one; seen
    against the engine, and the cursor then passes the skipped resource for good). So after each
    page the search is started again from the newest meta.lastUpdated read (keyset paging);
    re-read resources are de-duplicated on (id, versionId). Only when a whole page shares one
    timestamp is the server's `next` link followed, exactly as given."""
    bound = since_us
    key = anchor
    while True:
        pages = client.search(resource_type, [*params, (key, "ge" + from_epoch_us(bound))])
        restarted = False
        try:
            async for page in pages:
                yield page
                if page.next_url is None:
                    return
                stamps = [u for u in map(_updated, page.resources) if u is not None]
                top = max(stamps, default=bound)
                if top > bound:
                    bound, key, restarted = top, "_lastUpdated", True
                    break
                # the whole page shares the bound's timestamp: only the server's next link moves on
        finally:
            await pages.aclose()  # type: ignore[attr-defined]
        if not restarted:
            return


class Worker:
    def __init__(self, settings: Settings, client: FhirClient, store: Store, *, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.client = client
        self.store = store
        self.clock = clock
        self.scheme = settings.scheme
        self.rules = settings.rules
        self.read_policy = settings.read_policy
        self.directory = LiveDirectory(settings, client)
        self.concept_maps = ServerConceptMaps(settings, client)
        self.progress = Progress()
        self._stop = False
        # The episodes' Flags as this process last wrote or read them (id, version, content), so an
        # update needs no identifier search first. Bounded; a stale entry costs one 412 and a re-read.
        self._flags: OrderedDict[str, KnownFlag] = OrderedDict()

    # the cycle ---------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the step in progress and end the cycle there (SIGTERM): the cursor already covers
        every committed step, so the next process resumes where this one stopped."""
        self._stop = True

    async def run_cycle(self) -> CycleReport:
        """Deliver leftovers, then steps until the search is read to its end: each step reads at most
        poll.max_pages_per_step pages into the store, reads temperatures, decides, posts, and moves the
        cursor to the newest meta.lastUpdated read once every write is confirmed. A kill loses at most
        the step in progress; a stop request or a lost leadership ends the cycle between steps.

        There is no time budget that ends a cycle before it has caught up: the next cycle would start
        again from the cursor less poll.overlap_seconds, and on a backlog written within that window
        (a bulk load) it would re-read the same pages every cycle and never get through. The page
        stream stays open across steps instead (keyset paging continues from where it stopped)."""
        report = CycleReport()
        started = time.perf_counter()
        self.progress.pages = 0
        self.client.start_cycle()  # the client's retry budget is per cycle
        try:
            # Leftovers first. A chain that still fails (one write the server keeps refusing) must
            # not stop the reading: it would silence every patient. It is retried at every step and
            # every cycle; the cursor waits until every write is confirmed.
            await self.deliver(report)
            cursor = await self.store.get_cursor()
            newest_us = to_epoch_us(cursor) if cursor else None
            self.read_policy = await self.concept_maps.policy()
            pages = self._observation_pages(*search_params(self.settings, cursor, self.clock()))
            try:
                while True:
                    newest_us, report.caught_up = await self._step(pages, report, newest_us)
                    if report.caught_up or self._stop:
                        break
                    # a replaced leader stops here, before reading further (its writes are fenced anyway)
                    await self.store.check_leader()
            finally:
                await pages.aclose()  # type: ignore[attr-defined]
            metrics.POLLS.labels("ok" if report.delivered_all else "undelivered").inc()
            if report.delivered_all:
                metrics.LAST_POLL_OK.set(self.clock())
            if report.caught_up:
                self.progress.catching_up = False
                metrics.BACKLOG_PAGES.set(0)
        except Exception as err:
            # Whatever fails the cycle as a whole is counted and named; the caller retries next cycle.
            metrics.POLLS.labels("error").inc()
            log.error("poll cycle failed", error_type=type(err).__name__, error=str(err)[:200] if isinstance(err, NeutrowatchError) else None,
                      steps=report.steps, cursor=report.cursor)
            raise
        finally:
            metrics.POLL_SECONDS.observe(time.perf_counter() - started)
            metrics.OUTBOX_PENDING.set(await self.store.outbox_pending_count())
        log.info("poll cycle", pages=report.pages, observations=report.observations, new=report.new_versions,
                 panels=report.panels_assessed, events=report.events, written=report.written, cursor=report.cursor,
                 steps=report.steps, caught_up=report.caught_up)
        return report

    def _observation_pages(self, params: list[tuple[str, str]], since_us: int) -> AsyncIterator[Page]:
        """The main search, its code list extended with the site's mapped local codes and split when
        the URL would exceed fhir.max_search_url_length (service/fhir/query.py)."""
        codes = [c.removeprefix(f"{LOINC}|") for k, v in params if k == "code" for c in v.split(",")]
        rest = [p for p in params if p[0] != "code"]
        searches = split_searches(f"{self.settings.fhir.base_url}/Observation", rest,
                                  code_values(codes, self.read_policy.terminology), self.settings.fhir.max_search_url_length)
        streams = [pages_since(self.client, "Observation", search, since_us) for search in searches]
        return merged(streams, self.settings.fhir.page_size, _updated)

    async def _step(self, pages: AsyncIterator[Page], report: CycleReport, newest_us: int | None) -> tuple[int | None, bool]:
        """One step: read, temperatures, decide, deliver, commit. Returns the newest meta.lastUpdated
        read so far and whether the search has been read to its end.

        The cursor moves to the newest meta.lastUpdated read only when every write decided so far is
        confirmed (deliver retries all pending writes, so True means the outbox is empty). Pages come
        sorted by _lastUpdated, so everything before that instant has been read; what shares it, or
        commits late behind it, is read again from the cursor less the overlap (de-duplicated on
        (id, versionId)). A step whose writes are not all confirmed leaves the cursor where it is
        and the cycle goes on reading: one refused write must not silence every later patient."""
        before = (report.search_pages, report.observations, report.new_versions, report.panels_assessed, report.written,
                  sum(report.events.values()))
        began = self.clock()
        newest_us, caught_up, edge = await self._read(pages, report, newest_us)
        if self.settings.poll.temperatures == "open-episodes":
            # before deciding, so temperatures and panels are taken in one order of availability
            await self._temperatures(report, newest_us, caught_up=caught_up, changed_since=began)
        await self._decide(report, caught_up=caught_up, edge=edge)
        delivered = await self.deliver(report)
        report.delivered_all = delivered
        report.steps += 1
        lag = None if newest_us is None else max(0.0, self.clock() - newest_us / 1_000_000)
        if lag is not None:
            metrics.POLL_LAG.set(lag)
            self.progress.lag_seconds = lag
        if delivered:
            if newest_us is not None:
                report.cursor = from_epoch_us(newest_us)
                await self.store.set_cursor(report.cursor)
            self.progress.step_at = time.time()
            metrics.LAST_POLL_OK.set(self.clock())  # a committed step is a successful poll of its pages
        self.progress.pages = report.search_pages
        self.progress.writes_pending = not delivered
        if not caught_up:
            self.progress.catching_up = True
            metrics.BACKLOG_PAGES.set(report.search_pages)
        metrics.STEPS.labels("committed" if delivered else "undelivered").inc()
        pages_read, observations, new, panels, written, events = (
            now - then for now, then in zip((report.search_pages, report.observations, report.new_versions, report.panels_assessed,
                                             report.written, sum(report.events.values())), before, strict=True))
        log.info("poll step", step=report.steps, pages=pages_read, observations=observations, new=new, panels=panels,
                 events=events, written=written, committed=delivered, cursor=report.cursor,
                 lag_seconds=None if lag is None else round(lag, 1), caught_up=caught_up, cycle_pages=report.search_pages)
        return newest_us, caught_up

    async def _read(self, pages: AsyncIterator[Page], report: CycleReport, newest_us: int | None) -> tuple[int | None, bool, set[str]]:
        """Read at most poll.max_pages_per_step pages of the open search into the store. Returns the
        newest meta.lastUpdated seen (starting from `newest_us`), whether the search ended, and the
        patients with results on the last page read (a panel of theirs may go on past it)."""
        limit = self.settings.poll.max_pages_per_step
        ended = False
        last: Page | None = None

        async def bounded() -> AsyncIterator[Page]:
            nonlocal ended, last
            for _ in range(limit):
                try:
                    page = await anext(pages)
                except StopAsyncIteration:
                    ended = True
                    return
                report.search_pages += 1
                last = page
                yield page
                if page.next_url is None:  # pages_since ends after a page without a next link
                    ended = True
                    return

        newest_us = await self._ingest(bounded(), report, newest_us)
        edge: set[str] = set()
        if last is not None and not ended:
            for resource in last.resources:
                item = intake(resource, self.read_policy)
                if isinstance(item, Intake) and item.patient is not None:
                    edge.add(item.patient)
        return newest_us, ended, edge

    async def _ingest(self, pages: AsyncIterator[Page], report: CycleReport, newest_us: int | None) -> int | None:
        async for page in pages:
            report.pages += 1  # (the client counts pages in metrics.PAGES)
            items: list[Intake] = []
            now = self.clock()
            for resource in page.resources:
                item = intake(resource, self.read_policy)
                if isinstance(item, Ignored):
                    metrics.OBSERVATIONS.labels("ignored").inc()
                    continue
                report.observations += 1
                if isinstance(item, Rejected):  # no id: nothing to supersede, quarantined as it is
                    await self.store.quarantine(item, now)
                    await self._rejected(item)
                    continue
                items.append(item)
                if item.updated_us >= 0 and (newest_us is None or item.updated_us > newest_us):
                    newest_us = item.updated_us
            new = await self.store.ingest(items, now)
            report.new_versions += len(new)
            for item in new:
                if isinstance(item.outcome, Rejected):
                    await self._rejected(item.outcome)
                else:
                    metrics.OBSERVATIONS.labels("stored").inc()
            # (a batch may quarantine more than it read: a stored copy found to conflict)
            metrics.OBSERVATIONS.labels("seen_before").inc(max(0, len(items) - len(new)))
        return newest_us

    async def _temperatures(self, report: CycleReport, read_up_to_us: int | None, *, caught_up: bool = True,
                            changed_since: float | None = None) -> None:
        """poll.temperatures = open-episodes: body temperatures of the patients with new results in
        this step and, once the search is read to its end, of every patient with an open episode.
        Patients are searched TEMPERATURE_BATCH at a time (subject=a,b,...): the first time by
        collection time from 24 h (the fever window) before the newest ANC, after that for what
        changed since their cursors less the overlap.

        Before the end of the search (a step of a catch-up) only temperatures updated up to what the
        main search has read (`read_up_to_us`) are taken, and the cursors stop there: a later one
        would be decided before the same patient's panels still to be read, out of the order of
        availability that replay follows (a resolution then a fever remembered for the next episode
        is not a fever then a resolution). Open episodes without new results, and panels still
        waiting from an earlier step (`changed_since`), are searched at the end only, once a cycle as
        when a cycle read everything before deciding: their later temperatures are read, in order,
        with their patient's next results or at the end."""
        poll = self.settings.poll
        overlap_us = int(poll.overlap_seconds * 1_000_000)
        base = [("code", ",".join(code_values(temperature_codes(), self.read_policy.terminology))), ("_sort", "_lastUpdated"),
                ("_count", str(self.settings.fhir.page_size))]
        # Patients with an open episode, and patients with new results this step (an episode may
        # open, and even close, within the step: their temperatures must be in before the decisions).
        opened = {patient: (cursor, newest_us) for patient, cursor, newest_us in await self.store.open_patients()}
        targets: dict[str, tuple[str | None, int | None]] = dict(opened) if caught_up else {}
        async for batch in self._dirty_batches():
            for work in batch:
                if not caught_up and changed_since is not None and work.changed_at < changed_since:
                    continue  # waiting since an earlier step, nothing new in this one
                earliest = min((r.effective_us for r in work.results), default=None)
                cursor, newest_us = targets.get(work.patient, opened.get(work.patient, (None, None)))
                if earliest is not None and (newest_us is None or earliest < newest_us):
                    newest_us = earliest
                targets[work.patient] = (cursor, newest_us)
        first: list[tuple[str, int | None]] = []
        known: list[tuple[str, str]] = []
        for patient, (cursor, newest_us) in targets.items():
            if cursor is None:
                first.append((patient, newest_us))
            else:
                known.append((patient, cursor))
        batches: list[tuple[list[str], AsyncIterator[Page]]] = []
        for i in range(0, len(first), TEMPERATURE_BATCH):  # by collection time, from 24 h before the ANC
            group_first = first[i : i + TEMPERATURE_BATCH]
            since = max(min((n or 0) for _, n in group_first) - self.rules.fever_window_us - self.rules.fever_sustained_us, 0)
            subjects = ",".join(p for p, _ in group_first)
            pages = pages_since(self.client, "Observation", [("subject", subjects), *base], since, anchor="date")
            batches.append(([p for p, _ in group_first], pages))
        for i in range(0, len(known), TEMPERATURE_BATCH):
            group = known[i : i + TEMPERATURE_BATCH]
            since = min(to_epoch_us(c) for _, c in group) - overlap_us
            subjects = ",".join(p for p, _ in group)
            batches.append(([p for p, _ in group], pages_since(self.client, "Observation", [("subject", subjects), *base], since)))
        bound = None if caught_up else read_up_to_us
        for patients, pages in batches:
            report.temperature_searches += 1
            newest = await self._ingest(updated_until(whole_result(pages), bound), report, read_up_to_us)
            if newest is not None:
                for patient in patients:
                    await self.store.set_temperature_cursor(patient, from_epoch_us(newest))

    async def _rejected(self, rejected: Rejected) -> None:
        metrics.OBSERVATIONS.labels("rejected").inc()
        metrics.REJECTIONS.labels(metrics.reason_label(rejected.reason)).inc()
        log.warning("observation rejected", observation=rejected.ref, code=rejected.code, reason=rejected.reason)
        await self.store.record_decision(rejected_record(rejected))

    async def _dirty_batches(self) -> AsyncIterator[list[PanelWork]]:
        """Every dirty panel in decision order, DECIDE_BATCH at a time (memory flat on a backlog)."""
        after = None
        while batch := await self.store.dirty_panels(after=after, limit=DECIDE_BATCH):
            after = batch[-1].key
            yield batch

    async def _decide(self, report: CycleReport, *, caught_up: bool = True, edge: set[str] | None = None) -> None:
        """Ready panels in order of first availability, committed a batch at a time.

        Before the search is read to its end (a step of a catch-up) only complete panels are ready,
        and none of a patient after one of theirs that is not: the pages still to come may hold an
        incomplete panel's other results, and a step boundary is no arrival time (a step is not a
        wait), so the panel waits as it did when a cycle read everything before deciding, and the
        patient's later panels wait behind it (a patient's panels are decided in order of first
        availability, as replay decides them). The patients on the step's last page (`edge`) wait
        for the next step too: a panel's results are written together, so one cut by the step's
        end is whole on the next page, and a panel complete without all its results would
        otherwise be decided, then revised, where replay decides it once. Once
        caught up, an incomplete panel waits poll.settle_seconds."""
        now = self.clock()
        settle = self.settings.poll.settle_seconds
        waiting: set[str] = set(edge or ())  # patients with a panel held back in this step
        async for batch in self._dirty_batches():
            if caught_up:
                ready = [w for w in batch if is_complete(w.results) or now - w.changed_at >= settle]
            else:
                ready = []
                for w in batch:
                    if w.patient not in waiting and is_complete(w.results):
                        ready.append(w)
                    else:
                        waiting.add(w.patient)
            if ready:
                await self._decide_batch(ready, now, report)

    async def _decide_batch(self, ready: list[PanelWork], now: float, report: CycleReport) -> None:
        states = await self.store.load_states([w.patient for w in ready])
        decided: list[Decided] = []
        sent = from_epoch_us(int(now * 1_000_000))
        clock_us = int(now * 1_000_000)
        for work in ready:
            before = states.get(work.patient, PatientState())
            try:
                context = await self.directory.context(work.patient)
                d = decide(before, work.patient, work.panel, work.results, self.rules, context, clock_us)
                recipients = [await self.directory.recipients(work.patient, e.assessment.based_on if e.assessment else ())
                              for e in d.events]
                outcome = panel_outcome(d, work.results, recipients, self.scheme, self.settings.alerts, sent=sent)
            except NeutrowatchError:
                raise  # the store or the server failed under us: the cycle fails as a whole and is retried
            except Exception as err:  # noqa: BLE001 - contained to this panel (service/output/outcomes.py)
                record = failure_record(work.patient, work.panel, work.results, err)
                metrics.PANEL_FAILURES.labels(type(err).__name__).inc()
                log.error("panel quarantined: could not be decided", patient=work.patient, panel=work.panel,
                          observations=record["observations"], error_type=type(err).__name__)
                decided.append(Decided(work.patient, work.panel, before, [(record, None)]))
                continue
            states[work.patient] = d.state
            if d.assessed:
                report.panels_assessed += 1
                metrics.PANELS.inc()
            if d.stale:
                metrics.STALE_PANELS.inc()
                log.info("stale panel: collected before the newest assessed", patient=work.patient, panel=work.panel)
            records: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
            for record, alert in outcome.records:
                if alert is None:
                    if record["event"] == "rejected":
                        metrics.REJECTIONS.labels(metrics.reason_label(record["reason"])).inc()
                        log.warning("panel rejected", patient=work.patient, panel=work.panel, reason=record["reason"])
                    records.append((record, None))
                    continue
                records.append((record, _writes_dict(alert, record["event"])))
                metrics.ALERTS.labels(record["event"], record["grade"] or "none").inc()
                report.events[record["event"]] = report.events.get(record["event"], 0) + 1
                log.info("alert decided", patient=work.patient, alert=record["event"], grade=record["grade"],
                         episode=record["episode"], observations=record["observations"])
            decided.append(Decided(work.patient, work.panel, d.state, records))
        await self.store.commit(decided)

    # delivery ----------------------------------------------------------------------------------------

    async def deliver(self, report: CycleReport) -> bool:
        """Post pending writes: in order within a patient (an episode's writes build on each other),
        patients side by side up to fhir.max_concurrency. A patient's chain stops at its first
        failure and is retried next cycle; other patients go on."""
        failed: set[str] = set()
        while True:
            entries = [e for e in await self.store.pending_outbox(limit=500) if e.patient not in failed]
            if not entries:
                return not failed
            by_patient: dict[str, list[OutboxEntry]] = {}
            for entry in entries:
                by_patient.setdefault(entry.patient, []).append(entry)
            gate = asyncio.Semaphore(self.settings.fhir.max_concurrency)

            async def chain(patient: str, chain_entries: list[OutboxEntry]) -> None:
                async with gate:
                    for entry in chain_entries:
                        await self.store.check_leader()  # a replaced leader stops before the next write
                        try:
                            result = await self._post(entry)
                        except NeutrowatchError as err:
                            await self.store.mark_failed(entry.id, str(err))
                            metrics.WRITES.labels("bundle", "failed").inc()
                            log.warning("alert write failed, will retry", outbox=entry.id, error=str(err))
                            failed.add(patient)
                            return
                        await self.store.mark_sent(entry.id, result)
                        report.written += 1

            try:
                async with asyncio.TaskGroup() as group:
                    for p, es in by_patient.items():
                        group.create_task(chain(p, es))
            except* NeutrowatchError as errors:  # the store failed under us: the cycle fails as a whole
                raise errors.exceptions[0] from None

    async def _post(self, entry: OutboxEntry) -> dict[str, Any]:
        """One write: the Flag (conditional create, versioned PUT, or nothing when the server's Flag
        already says the same) and the Communication (conditional create on identifier) in one
        Bundle; then, once the server has confirmed both, the Provenance on its own (conditional
        create on _tag), its targets the server ids it answered.

        Not one Bundle of three: many servers process a `transaction` as a batch (Medplum without
        transaction bundles: 200, one status per entry, the successful entries kept). The server
        reserves an id for each create and rewrites the urn:uuid references to it before any entry
        runs, so a Provenance in the same Bundle as a Flag or Communication entry that fails is kept,
        pointing at an id that never exists; the retry writes the target under another id. Posted
        after its targets, the Provenance can only name what the server holds. It goes even when
        nothing else does: a write whose answer was lost, re-posted, finds it there and writes
        nothing, so it exists once per write. Two requests a write (three when the Flag is searched)."""
        w = entry.writes
        ids, statuses, locations = await self._post_targets(w)
        provenance = provenance_entry(w, ids.get("Flag"), ids.get("Communication"))
        if provenance is not None:
            response = await self.client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [provenance]})
            answers = response.get("entry") or []
            status = str(((answers[0] if answers else {}).get("response") or {}).get("status", ""))
            if len(answers) != 1 or not status.startswith("2"):
                raise WriteRejected(f"server answered {status or 'nothing'} to an alert's Provenance")
            metrics.WRITES.labels("Provenance", "ok").inc()
            statuses.append(status)
            locations.append((answers[0].get("response") or {}).get("location"))
        return {"statuses": statuses, "locations": locations, "ids": ids}

    async def _post_targets(self, w: dict[str, Any]) -> tuple[dict[str, str], list[str], list[str | None]]:
        """Write the Flag and the Communication until the server confirms both; returns their server
        ids by type and the statuses and locations of the entries written (Flag first).

        An atomic server answers all or nothing (an error status raises, except 412: re-read). A
        batch server may answer mixed statuses: that is counted, and only the entries that failed
        are posted again (conditional creates and If-Match PUTs are safe to repeat), up to
        TARGET_ATTEMPTS requests. A Flag entry that failed is rebuilt from a fresh read (a 412 means
        it changed under us). Unconfirmed after that: WriteRejected, so no Provenance is posted and
        the write stays in the outbox for the next cycle."""
        comm_entry = _communication_entry(w)
        ids: dict[str, str] = {}
        written: dict[str, tuple[str, str | None]] = {}  # type -> (status, location)
        failed: list[str] = []
        for _attempt in range(TARGET_ATTEMPTS):
            entries: list[dict[str, Any]] = []
            put_id: str | None = None
            if "Flag" not in ids:
                flag_entry, flag_id = await self._flag_entry(w)
                if flag_entry is None:
                    assert flag_id is not None
                    ids["Flag"] = flag_id  # unchanged: nothing to write
                else:
                    entries.append(flag_entry)
                    put_id = flag_id
            if comm_entry is not None and "Communication" not in ids:
                entries.append(comm_entry)
            if not entries:
                break
            try:
                response = await self.client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
            except PreconditionFailed:
                # The Flag changed since we read it, or our own PUT, retried after a lost answer, was
                # applied: read it again.
                failed = ["412"]
                self._flags.pop(_key(w), None)
                continue
            answers = response.get("entry") or []
            if len(answers) != len(entries):
                raise WriteRejected(f"server answered {len(answers)} entries to an alert transaction of {len(entries)}")
            failed = []
            reasons: list[str | None] = []  # why each refused entry is transient (None: a refusal to keep)
            for sent, answer in zip(entries, answers, strict=True):
                kind = sent["resource"]["resourceType"]
                result = answer.get("response") or {}
                status = str(result.get("status", ""))
                if not status.startswith("2"):
                    failed.append(status)
                    reasons.append(transient_status(status, result.get("outcome")))
                    metrics.WRITES.labels(kind, "failed").inc()
                    if kind == "Flag":
                        self._flags.pop(_key(w), None)  # read it again before the next attempt
                    continue
                identifier = w["flag_identifier"] if kind == "Flag" else w["communication_identifier"]
                ids[kind] = (put_id if kind == "Flag" and put_id is not None
                             else answered_id(kind, result.get("location"), answer.get("resource"))
                             or await self._find(kind, identifier))
                written[kind] = (status, result.get("location"))
                metrics.WRITES.labels(kind, "ok").inc()
                if kind == "Flag":
                    self._remember(w, sent, ids[kind], status, result, answer.get("resource"))
            if failed and len(failed) < len(entries):
                metrics.NONATOMIC_TRANSACTIONS.inc()
                log.warning("transaction answered entry by entry (the server processes it as a batch): "
                            "re-posting what failed", statuses=[str((a.get("response") or {}).get("status", "")) for a in answers])
            if reasons and all(reasons):
                # A refusal the server lifts once a concurrent write has committed (409, a
                # serialization failure) or an overload: back off before re-posting what failed,
                # within this cycle, rather than waiting a whole poll interval.
                for reason in reasons:
                    metrics.FHIR_RETRIES.labels(reason).inc()
                await asyncio.sleep(random.uniform(0, ENTRY_BACKOFF_SECONDS * 2**_attempt))
            elif reasons:
                break  # a refusal to keep: re-posting would only repeat it
        if "Flag" not in ids or (comm_entry is not None and "Communication" not in ids):
            if failed and all(s.startswith("412") for s in failed):
                raise WriteRejected(f"Flag kept changing under us (412 {TARGET_ATTEMPTS} times)")
            raise WriteRejected(f"server answered {failed} to an alert's Flag/Communication: no Provenance posted")
        order = [k for k in ("Flag", "Communication") if k in written]
        return ids, [written[k][0] for k in order], [written[k][1] for k in order]

    async def _find(self, kind: str, identifier: list[str]) -> str:
        """The server id of the one resource with `identifier`: for a 2xx answer without a usable
        location (a conditional create that found the resource may give none)."""
        found = await self.client.search_all(kind, [("identifier", "|".join(identifier))])
        if len(found) != 1 or not isinstance(found[0].get("id"), str):
            raise WriteRejected(f"{kind} confirmed, but its identifier search found {len(found)}")
        return str(found[0]["id"])

    async def _flag_entry(self, w: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """The Flag's transaction entry and, when it is not conditionally created (a PUT, or none
        because it is unchanged), the server id of the existing Flag. The existing Flag is the one
        this process last wrote or read when it remembers it (no request), else it is searched."""
        flag = w["flag"]
        create = _conditional_create(flag, "identifier=" + "|".join(w["flag_identifier"]), w.get("flag_full_url"))
        if w["event"] == "new":
            return create, None
        known = self._flags.get(_key(w))
        if known is None:
            existing = await self.client.search_all("Flag", [("identifier", "|".join(w["flag_identifier"]))])
            if not existing:
                return create, None
            current = existing[0]
            known = KnownFlag(current["id"], str(current.get("meta", {}).get("versionId", "")), current)
            self._keep(_key(w), known)
        if _same(known.flag, flag):
            return None, known.id
        put = {
            "fullUrl": f"{self.settings.fhir.base_url}/Flag/{known.id}",
            "resource": {**flag, "id": known.id},
            "request": {"method": "PUT", "url": f"Flag/{known.id}", "ifMatch": f'W/"{known.version}"'},
        }
        return put, known.id

    def _remember(self, w: dict[str, Any], sent: dict[str, Any], flag_id: str, status: str, result: dict[str, Any],
                  answered: Any) -> None:
        """Keep the Flag as the server now holds it: the resource it answered, else what was sent
        when the server wrote it (a PUT, or a create answered 201; a conditional create answered
        200 found a Flag whose content we do not know), with the version from the answer."""
        if isinstance(answered, dict) and answered.get("resourceType") == "Flag" and answered.get("id") == flag_id:
            content: dict[str, Any] | None = answered
        elif sent["request"]["method"] == "PUT" or status.startswith("201"):
            content = sent["resource"]
        else:
            content = None
        version = answered_version(result, answered)
        if content is None or version is None:
            self._flags.pop(_key(w), None)
        else:
            self._keep(_key(w), KnownFlag(flag_id, version, content))

    def _keep(self, key: str, known: KnownFlag) -> None:
        self._flags[key] = known
        self._flags.move_to_end(key)
        while len(self._flags) > KNOWN_FLAGS:
            self._flags.popitem(last=False)


@dataclass(frozen=True, slots=True)
class KnownFlag:
    """An episode's Flag as the server holds it after this process's last write or read of it."""

    id: str
    version: str
    flag: dict[str, Any]


def _key(w: dict[str, Any]) -> str:
    return "|".join(w["flag_identifier"])


def answered_version(result: dict[str, Any], resource: Any) -> str | None:
    """The version a transaction entry wrote: response.etag (W/"v"), the location's `_history/v`,
    or the answered resource's meta.versionId."""
    etag = result.get("etag")
    if isinstance(etag, str) and etag.strip():
        return etag.strip().removeprefix("W/").strip('"') or None
    location = result.get("location")
    if isinstance(location, str) and "/_history/" in location:
        vid = location.split("?", 1)[0].rsplit("/_history/", 1)[1].strip("/")
        if _FHIR_ID.match(vid):
            return vid
    meta = resource.get("meta") if isinstance(resource, dict) else None
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return version if isinstance(version, str) and version else None


_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def answered_id(kind: str, location: Any, resource: Any) -> str | None:
    """The server id of a `kind` written by a transaction entry: from its response.location
    (`Type/id`, `Type/id/_history/vid`, relative or absolute: FHIR http.html#transaction-response),
    else from the resource returned with it; None when neither names one."""
    if isinstance(location, str):
        segments = location.split("?", 1)[0].split("#", 1)[0].rstrip("/").split("/")
        if "_history" in segments[-2:]:
            segments = segments[: segments.index("_history", max(len(segments) - 2, 0))]
        if len(segments) >= 2 and segments[-2] == kind and _FHIR_ID.match(segments[-1]):
            return segments[-1]
    if isinstance(resource, dict) and resource.get("resourceType") == kind and isinstance(resource.get("id"), str) \
            and _FHIR_ID.match(resource["id"]):
        return str(resource["id"])
    return None


class WriteRejected(NeutrowatchError):
    """The server refused an alert write; it stays in the outbox and is retried."""


def _conditional_create(resource: dict[str, Any], if_none_exist: str, full_url: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"fullUrl": full_url} if full_url else {}
    return {**entry, "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": if_none_exist}}


def _communication_entry(w: dict[str, Any]) -> dict[str, Any] | None:
    communication = w["communication"]
    if communication is None:
        return None
    return _conditional_create(communication, "identifier=" + "|".join(w["communication_identifier"]),
                               w.get("communication_full_url"))


def _same(existing: dict[str, Any], desired: dict[str, Any]) -> bool:
    """The server's resource says what `desired` says. `meta` is compared by its profiles only: the
    server adds versionId and lastUpdated."""
    for key, value in desired.items():
        if key == "meta":
            if (existing.get("meta") or {}).get("profile") != (value or {}).get("profile"):
                return False
        elif existing.get(key) != value:
            return False
    return True


def _writes_dict(writes: AlertWrites, event: str) -> dict[str, Any]:
    return {
        "event": event,
        "flag": writes.flag,
        "communication": writes.communication,
        "flag_identifier": list(writes.flag_identifier),
        "communication_identifier": list(writes.communication_identifier) if writes.communication_identifier else None,
        **outbox_fields(writes),
    }
