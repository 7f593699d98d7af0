"""The live loop's Observation searches: what it asks the server for, and paging that is robust to a
result set changing while it is read (keyset paging on meta.lastUpdated)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import replace

import structlog

from service import metrics
from service.config import Settings
from service.core.codes import cbc_codes, temperature_codes
from service.core.terminology import NO_TERMINOLOGY, Terminology
from service.fhir import model
from service.fhir.client import FhirClient
from service.fhir.errors import FhirError, FhirHttpError
from service.fhir.fhirtime import from_epoch_us, to_epoch_us
from service.fhir.paging import Page
from service.fhir.query import code_values

LOINC = "http://loinc.org"
TEMPERATURE_BATCH = 20  # patients per temperature search (subject=a,b,...)
INCLUDES = ("_include", "_revinclude")

log = structlog.get_logger("neutrowatch.search")


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
        # the DiagnosticReports naming the results: a draw's panel when its results name no specimen
        ("_revinclude", "DiagnosticReport:result"),
    ]
    if poll.category:
        params.append(("category", poll.category))
    return params, max(since_us, 0)


def updated_us(resource: model.Resource | model.Undecodable) -> int | None:
    if isinstance(resource, model.Resource) and resource.meta is not None and resource.meta.lastUpdated:
        try:
            return to_epoch_us(resource.meta.lastUpdated)
        except ValueError:
            return None
    return None


def _matched(resource: model.Resource | model.Undecodable, resource_type: str) -> bool:
    """An entry of the searched type (not one included with it: a DiagnosticReport of the results)."""
    return not isinstance(resource, model.Resource) or resource.resourceType == resource_type


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
            page = replace(
                page, resources=[r for r in page.resources if (u := updated_us(r)) is None or u <= bound_us]
            )
        yield page


async def pages_since(
    client: FhirClient,
    resource_type: str,
    params: list[tuple[str, str]],
    since_us: int,
    anchor: str = "_lastUpdated",
) -> AsyncGenerator[Page, None]:
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
                stamps = [
                    u
                    for r in page.resources
                    if _matched(r, resource_type) and (u := updated_us(r)) is not None
                ]
                top = max(stamps, default=bound)
                if top > bound:
                    bound, key, restarted = top, "_lastUpdated", True
                    break
                # the whole page shares the bound's timestamp: only the server's next link moves on
        except FhirHttpError as err:
            if err.status != 400 or not any(name in INCLUDES for name, _ in params):
                raise
            # A server may refuse the included resources, not the search: Medplum refuses a page
            # whose results with their includes pass 1,000 ("query scope limit"), which a page of
            # results named by many DiagnosticReports reaches. Read on without the includes rather
            # than let one such page stop every patient's monitoring; the next cycle asks again.
            metrics.INCLUDES_REFUSED.labels(resource_type).inc()
            log.warning("includes refused: read without them", resource_type=resource_type, error=str(err))
            params = [p for p in params if p[0] not in INCLUDES]
            restarted = True
        finally:
            await pages.aclose()
        if not restarted:
            return


def temperature_searches(
    client: FhirClient,
    settings: Settings,
    targets: Mapping[str, tuple[str | None, int | None]],
    terminology: Terminology = NO_TERMINOLOGY,
) -> list[tuple[list[str], AsyncIterator[Page]]]:
    """The body temperature searches of `targets` (patient -> (temperature cursor, earliest
    collection time of its new results)), TEMPERATURE_BATCH patients a search (subject=a,b,...):
    a patient without a cursor by collection time from the fever window before that time, one with
    a cursor for what changed since it less the overlap. Each with the patients it covers. The code
    list holds the site's local codes mapped to a temperature term too (`terminology`)."""
    base = [
        ("code", ",".join(code_values(temperature_codes(), terminology.local_codes()))),
        ("_sort", "_lastUpdated"),
        ("_count", str(settings.fhir.page_size)),
    ]
    rules = settings.rules
    first = [(patient, newest_us) for patient, (cursor, newest_us) in targets.items() if cursor is None]
    known = [(patient, cursor) for patient, (cursor, _newest) in targets.items() if cursor is not None]
    batches: list[tuple[list[str], AsyncIterator[Page]]] = []
    for i in range(0, len(first), TEMPERATURE_BATCH):  # by collection time, from 24 h before the ANC
        group_first = first[i : i + TEMPERATURE_BATCH]
        since = max(
            min((n or 0) for _, n in group_first) - rules.fever_window_us - rules.fever_sustained_us, 0
        )
        subjects = ",".join(p for p, _ in group_first)
        pages = pages_since(client, "Observation", [("subject", subjects), *base], since, anchor="date")
        batches.append(([p for p, _ in group_first], pages))
    overlap_us = int(settings.poll.overlap_seconds * 1_000_000)
    for i in range(0, len(known), TEMPERATURE_BATCH):
        group = known[i : i + TEMPERATURE_BATCH]
        since = min(to_epoch_us(c) for _, c in group) - overlap_us
        subjects = ",".join(p for p, _ in group)
        batches.append(
            ([p for p, _ in group], pages_since(client, "Observation", [("subject", subjects), *base], since))
        )
    return batches
