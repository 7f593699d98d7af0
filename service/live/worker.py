"""One poll cycle: deliver leftovers, then steps until the search is read to its end, each: search (at
most poll.max_pages_per_step pages) -> normalise -> store -> temperatures -> decide -> outbox -> post ->
advance the cursor. Effectively once: decisions and their writes are stored in one transaction, writes
are conditional creates keyed on deterministic identifiers, and the cursor moves only after the
server has confirmed every write; a kill loses at most the step in progress."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping

import structlog

from service import metrics
from service.config import Settings
from service.core.anc import is_complete
from service.core.codes import LOINC
from service.core.episodes import PatientState
from service.core.observations import DEFAULT_READ, Ignored, LabResult, ReadPolicy, Rejected, version_number
from service.core.panels import Report, panel_key
from service.core.triage import PatientFact, ReportMembers, memberships, triage
from service.core.undecided import ignored_unassessed, rejection_unassessed
from service.errors import NeutrowatchError
from service.fhir import model
from service.fhir.client import FhirClient
from service.fhir.fhirtime import from_epoch_us, to_epoch_us
from service.fhir.paging import Page
from service.fhir.query import code_values, merged, split_searches
from service.live.directory import LiveDirectory
from service.live.report import CycleReport, Progress, StepTally, panel_records
from service.live.search import (
    pages_since,
    search_params,
    temperature_searches,
    updated_until,
    updated_us,
    whole_result,
)
from service.live.store.base import Decided, Intake, OutboxEntry, PanelWork, Store
from service.live.terminology import ServerConceptMaps
from service.live.writer import AlertWriter
from service.output.events import rejected_record
from service.output.outcomes import Judged, concluded, judged, orders, quarantined
from service.output.transaction import Delivery

log = structlog.get_logger("neutrowatch.worker")
DECIDE_BATCH = 1000  # dirty panels read, decided and committed at a time


def intake(
    resource: model.Resource | model.Undecodable,
    policy: ReadPolicy = DEFAULT_READ,
    reports: Mapping[str, Report] | None = None,
) -> Intake | Rejected | Ignored:
    """A search entry as the store takes it (service/core/triage.py): an Intake, a Rejected without
    an id (quarantined only), or Ignored (another resource type, or a code not monitored).
    `reports`: the DiagnosticReport of each Observation the page's reports name (its panel's key
    when the result names no specimen, as replay keys it)."""
    triaged = triage(resource, policy)
    if isinstance(triaged, ReportMembers | PatientFact):  # context is the directory's, membership `reports`'
        return Ignored("not an Observation")
    if isinstance(triaged, Ignored) or (isinstance(triaged, Rejected) and triaged.ref is None):
        return triaged
    assert triaged.ref is not None
    updated = triaged.updated_us if triaged.updated_us is not None else -1
    panel = panel_key(triaged, (reports or {}).get(triaged.ref)) if isinstance(triaged, LabResult) else None
    return Intake(triaged.ref, updated, version_number(triaged.version), triaged.patient, panel, triaged)


class Worker:
    def __init__(
        self, settings: Settings, client: FhirClient, store: Store, *, clock: Callable[[], float] = time.time
    ):
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
        self.writer = AlertWriter(client, settings.fhir.base_url)

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
                await pages.aclose()
            metrics.POLLS.labels("ok" if report.delivered_all else "undelivered").inc()
            if report.delivered_all:
                metrics.LAST_POLL_OK.set(self.clock())
            if report.caught_up:
                self.progress.catching_up = False
                metrics.BACKLOG_PAGES.set(0)
        except Exception as err:
            # Whatever fails the cycle as a whole is counted and named; the caller retries next cycle.
            metrics.POLLS.labels("error").inc()
            log.error(
                "poll cycle failed",
                error_type=type(err).__name__,
                error=str(err)[:200] if isinstance(err, NeutrowatchError) else None,
                steps=report.steps,
                cursor=report.cursor,
            )
            raise
        finally:
            metrics.POLL_SECONDS.observe(time.perf_counter() - started)
            metrics.OUTBOX_PENDING.set(await self.store.outbox_pending_count())
        log.info(
            "poll cycle",
            pages=report.pages,
            observations=report.observations,
            new=report.new_versions,
            panels=report.panels_assessed,
            events=report.events,
            written=report.written,
            cursor=report.cursor,
            steps=report.steps,
            caught_up=report.caught_up,
        )
        return report

    def _observation_pages(self, params: list[tuple[str, str]], since_us: int) -> AsyncGenerator[Page, None]:
        """The main search, its code list extended with the site's mapped local codes and split when
        the URL would exceed fhir.max_search_url_length (service/fhir/query.py)."""
        codes = [c.removeprefix(f"{LOINC}|") for k, v in params if k == "code" for c in v.split(",")]
        rest = [p for p in params if p[0] != "code"]
        searches = split_searches(
            f"{self.settings.fhir.base_url}/Observation",
            rest,
            code_values(codes, self.read_policy.terminology.local_codes()),
            self.settings.fhir.max_search_url_length,
        )
        streams = [pages_since(self.client, "Observation", search, since_us) for search in searches]
        return merged(streams, self.settings.fhir.page_size, updated_us)

    async def _step(
        self, pages: AsyncIterator[Page], report: CycleReport, newest_us: int | None
    ) -> tuple[int | None, bool]:
        """One step: read, temperatures, decide, deliver, commit. Returns the newest meta.lastUpdated
        read so far and whether the search has been read to its end.

        The cursor moves to the newest meta.lastUpdated read only when every write decided so far is
        confirmed (deliver retries all pending writes, so True means the outbox is empty). Pages come
        sorted by _lastUpdated, so everything before that instant has been read; what shares it, or
        commits late behind it, is read again from the cursor less the overlap (de-duplicated on
        (id, versionId)). A step whose writes are not all confirmed leaves the cursor where it is
        and the cycle goes on reading: one refused write must not silence every later patient."""
        before = StepTally.of(report)
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
        before.log_step(report, committed=delivered, lag=lag, caught_up=caught_up)
        return newest_us, caught_up

    async def _read(
        self, pages: AsyncIterator[Page], report: CycleReport, newest_us: int | None
    ) -> tuple[int | None, bool, set[str]]:
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
            reports = memberships(last.resources, self.read_policy)
            for resource in last.resources:
                item = intake(resource, self.read_policy, reports)
                if isinstance(item, Intake) and item.patient is not None:
                    edge.add(item.patient)
        return newest_us, ended, edge

    async def _ingest(
        self, pages: AsyncIterator[Page], report: CycleReport, newest_us: int | None
    ) -> int | None:
        async for page in pages:
            report.pages += 1  # (the client counts pages in metrics.PAGES)
            items: list[Intake] = []
            now = self.clock()
            reports = memberships(page.resources, self.read_policy)
            for resource in page.resources:
                if isinstance(resource, model.Resource) and resource.resourceType == "DiagnosticReport":
                    continue  # included for its results' panel membership (`reports`)
                item = intake(resource, self.read_policy, reports)
                if isinstance(item, Ignored):
                    metrics.OBSERVATIONS.labels("ignored").inc()
                    metrics.count_unassessed(ignored_unassessed(item.reason))
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

    async def _temperatures(
        self,
        report: CycleReport,
        read_up_to_us: int | None,
        *,
        caught_up: bool = True,
        changed_since: float | None = None,
    ) -> None:
        """poll.temperatures = open-episodes: body temperatures of the patients with new results in
        this step and, once the search is read to its end, of every patient with an open episode.
        Patients are searched a batch at a time (`search.temperature_searches`).

        Before the end of the search (a step of a catch-up) only temperatures updated up to what the
        main search has read (`read_up_to_us`) are taken, and the cursors stop there: a later one
        would be decided before the same patient's panels still to be read, out of the order of
        availability that replay follows (a resolution then a fever remembered for the next episode
        is not a fever then a resolution). Open episodes without new results, and panels still
        waiting from an earlier step (`changed_since`), are searched at the end only, once a cycle as
        when a cycle read everything before deciding: their later temperatures are read, in order,
        with their patient's next results or at the end."""
        # Patients with an open episode, and patients with new results this step (an episode may
        # open, and even close, within the step: their temperatures must be in before the decisions).
        opened = {e.patient: (e.temperature_cursor, e.newest_us) for e in await self.store.open_patients()}
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
        batches = temperature_searches(self.client, self.settings, targets, self.read_policy.terminology)
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
        metrics.count_unassessed(rejection_unassessed(rejected.reason))
        log.warning(
            "observation rejected", observation=rejected.ref, code=rejected.code, reason=rejected.reason
        )
        await self.store.record_decision(rejected_record(rejected))

    async def _dirty_batches(self) -> AsyncIterator[list[PanelWork]]:
        """Every dirty panel in decision order, DECIDE_BATCH at a time (memory flat on a backlog)."""
        after = None
        while batch := await self.store.dirty_panels(after=after, limit=DECIDE_BATCH):
            after = batch[-1].key
            yield batch

    async def _decide(
        self, report: CycleReport, *, caught_up: bool = True, edge: set[str] | None = None
    ) -> None:
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
        for work in ready:
            before = states.get(work.patient, PatientState())
            step = await self._judge(work, before, int(now * 1_000_000), sent)
            states[work.patient] = step.state
            decided.append(Decided(work.patient, work.panel, step.state, panel_records(work, step, report)))
        await self.store.commit(decided)

    async def _judge(self, work: PanelWork, before: PatientState, clock_us: int, sent: str) -> Judged:
        """The panel judged as replay judges it (service/output/outcomes.py), with the patient's context
        and each event's recipients read from the server (service/live/directory.py)."""
        try:
            context = await self.directory.context(work.patient)
            step = judged(before, work.patient, work.panel, work.results, self.rules, context, clock_us)
            if isinstance(step, Judged):
                return step
            found = {b: await self.directory.recipients(work.patient, b) for b in map(orders, step.events)}
        except NeutrowatchError:
            raise  # the store or the server failed under us: the cycle fails as a whole and is retried
        except Exception as err:  # noqa: BLE001 - contained to this panel (service/output/outcomes.py)
            return quarantined(before, work.patient, work.panel, work.results, err)
        return concluded(
            before,
            work.patient,
            work.panel,
            work.results,
            step,
            found.__getitem__,
            self.scheme,
            self.settings.alerts,
            sent=sent,
        )

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
            try:
                async with asyncio.TaskGroup() as group:
                    for chain in by_patient.values():
                        group.create_task(self._chain(chain, gate, failed, report))
            except* NeutrowatchError as errors:  # the store failed under us: the cycle fails as a whole
                raise errors.exceptions[0] from None

    async def _chain(
        self, chain: list[OutboxEntry], gate: asyncio.Semaphore, failed: set[str], report: CycleReport
    ) -> None:
        """One patient's writes in order, until the first the server does not confirm (its patient
        then goes into `failed`)."""
        async with gate:
            for entry in chain:
                await self.store.check_leader()  # a replaced leader stops before the next write
                try:
                    result = await self._post(entry)
                except NeutrowatchError as err:
                    await self.store.mark_failed(entry.id, str(err))
                    metrics.WRITES.labels("bundle", "failed").inc()
                    log.warning("alert write failed, will retry", outbox=entry.id, error=str(err))
                    failed.add(entry.patient)
                    return
                await self.store.mark_sent(entry.id, result)
                report.written += 1

    async def _post(self, entry: OutboxEntry) -> Delivery:
        """One outbox entry to the server (service/live/writer.py)."""
        return await self.writer.post(entry.writes)
