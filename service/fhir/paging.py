"""Search results page by page: Bundle.link[next] followed exactly as given and only under the base
URL (`walk`), and a searchset page read so that damage stays with the entry that holds it
(`read_page`): salvaged, cut short at a break seen twice, or refused — never skipped."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import NamedTuple, TypeVar, cast
from urllib.parse import urljoin

import structlog

from service.fhir import model, raw
from service.fhir.bodies import next_link
from service.fhir.errors import FhirError
from service.fhir.fhirtime import to_epoch_us
from service.fhir.references import patient_reference
from service.fhir.transport import RESOURCE_TYPE, Response, Retry, Transport
from service.metrics import DAMAGED_PAGES, PAGES, reason_label

__all__ = [
    "FUTURE_STAMP",
    "BrokenPages",
    "Page",
    "PageEntries",
    "UnreadablePage",
    "read_page",
    "walk",
    "without_future_stamps",
]

log = structlog.get_logger("neutrowatch.fhir")

FUTURE_STAMP = "meta.lastUpdated is later than the server's own clock"
_DATE_SLACK_US = 5 * 60 * 1_000_000  # clocks of a server's nodes differ a little
_NO_DATE_SLACK_US = 60 * 60 * 1_000_000  # no Date header: our clock, with room for the server's to be ahead
T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    resources: list[model.Resource | model.Undecodable]  # searchset entries, flattened (include-mode too)
    next_url: str | None
    url: str  # the URL this page came from
    # the same truncated page came twice: `resources` are the entries before the cut and the search
    # stops here. Sorted by _lastUpdated, a cursor moved to what was read loses nothing; a reader
    # that needs the whole result now (temperatures for this cycle's decisions) must fail instead.
    cut_short: bool = False


class UnreadablePage(FhirError):
    """A search page whose framing is broken (truncated, not JSON at all) came back byte for byte
    the same: after a retry with no readable entry in it, or again after its readable entries were
    read. It is not skipped: nothing is known of what the rest holds (which patients, which
    meta.lastUpdated), so moving the cursor past it could lose an alert. The cycle fails instead —
    visible in neutrowatch_polls_total{outcome="error"}, /readyz,
    neutrowatch_damaged_pages_total{handling="refused"} and the log (size and digest of the page,
    never its content)."""


async def walk(
    transport: Transport,
    url: str,
    parse: Callable[[Response], tuple[T, str | None]],
) -> AsyncIterator[tuple[T, str | None, str]]:
    """Parsed pages with their next link and URL; follows next only under the base URL."""
    seen: set[str] = set()
    while True:
        seen.add(url)
        payload, next_url = await transport.request("GET", url, idempotent=True, parse=parse)
        PAGES.inc()
        next_url = urljoin(url, next_url) if next_url else None
        yield payload, next_url, url
        if next_url is None:
            return
        if not transport.within_base(next_url):
            raise transport.refuse(next_url, "next")
        if next_url in seen:
            raise FhirError(f"search {transport.resource_type(url)}: next link repeats an earlier page")
        url = next_url


class BrokenPages:
    """The broken search pages a client has seen lately (sha256 of the body -> times seen): the same
    broken bytes again are not a transfer cut short. One per client, so per process: a restarted
    process takes the page for a transfer cut short once more."""

    LIMIT = 64

    def __init__(self) -> None:
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def sightings(self, body: bytes) -> int:
        """How many times this exact body has been seen broken, this time included."""
        key = hashlib.sha256(body).digest()
        seen = self._seen.pop(key, 0) + 1
        self._seen[key] = seen
        if len(self._seen) > self.LIMIT:
            self._seen.popitem(last=False)
        return seen


class PageEntries(NamedTuple):
    items: list[model.Resource | model.Undecodable]
    cut_short: bool = False


def read_page(response: Response, broken: BrokenPages) -> tuple[PageEntries, str | None]:
    """A searchset page's entries, read so that damage stays with the entry that holds it.

    * Strict JSON (nearly always): typed, entry by entry when an entry does not fit the types.
    * A whole document that a strict parser refuses (NaN or Infinity tokens, 1e999, bytes that are
      not UTF-8, one entry nested 100 000 levels deep or with a syntax error inside): not retried
      (the server would send the same bytes again) but salvaged entry by entry (`raw.read`): a NaN
      value becomes that Observation's rejection, an entry that cannot be read at all an
      `Undecodable` with its id when that much can be read; the worker rejects, counts, logs and
      quarantines each. The cursor moves as usual: every entry of the page is accounted for.
    * Broken framing (truncated, not JSON at all): first retried, as a transfer cut short would
      be. The same bytes a second time are not a transfer problem: the entries before the break
      are read and the search stops there (no next link). Results are sorted by _lastUpdated, so
      the cursor covers only what was read and the rest is read again from it next cycle: nothing
      is skipped. If the same broken page then comes back a third time (reading its first entries
      did not move the search past it: e.g. they all lie in the overlap window), or it holds no
      readable entry at all, `UnreadablePage`: the cycle fails and the cursor stays, so the stall
      is visible (polls_total{outcome="error"}, /readyz, damaged_pages_total{handling="refused"},
      an error log line with the page's size and digest) instead of silent.
    """
    doc = raw.read(response.body)
    doc = doc._replace(items=without_future_stamps(doc.items, response.headers))
    if doc.complete:
        if doc.resource_type != "Bundle":
            shown = (
                doc.resource_type
                if doc.resource_type and RESOURCE_TYPE.match(doc.resource_type)
                else "something else"
            )
            raise FhirError(f"search answered with {shown}, not a Bundle")
        if doc.damage is not None:
            DAMAGED_PAGES.labels("salvaged").inc()
            log.warning(
                "fhir_page_salvaged",
                status=response.status,
                size=len(response.body),
                entries=len(doc.items),
                unreadable=sum(isinstance(i, model.Undecodable) for i in doc.items),
                damage=reason_label(doc.damage),
            )
        return PageEntries(doc.items), next_link(doc.links)
    seen = broken.sightings(response.body)
    if seen == 1:
        DAMAGED_PAGES.labels("retried").inc()
        raise Retry("invalid_json", ambiguous=False, response=response)
    digest = hashlib.sha256(response.body).hexdigest()[:16]
    damage = reason_label(doc.damage or "broken")
    if seen == 2 and doc.resource_type == "Bundle" and doc.items:
        DAMAGED_PAGES.labels("prefix").inc()
        log.warning(
            "fhir_page_truncated",
            size=len(response.body),
            sha256=digest,
            entries=len(doc.items),
            damage=damage,
            action="entries before the break read; the rest is read from the cursor next cycle",
        )
        return PageEntries(doc.items, cut_short=True), None
    DAMAGED_PAGES.labels("refused").inc()
    log.error(
        "fhir_page_unreadable",
        size=len(response.body),
        sha256=digest,
        damage=damage,
        seen=seen,
        action="not skipped: the cycle fails and the cursor stays",
    )
    raise UnreadablePage(
        f"search page unreadable ({damage}; {len(response.body)} bytes, sha256 {digest}, seen {seen} times): "
        "not skipped, the cursor stays"
    )


def without_future_stamps(
    items: list[model.Resource | model.Undecodable], headers: Mapping[str, str]
) -> list[model.Resource | model.Undecodable]:
    """Entries whose meta.lastUpdated lies beyond the server's clock (its Date header) become
    rejections. The server stamps what it stores, so such a stamp is not one it wrote; believed, it
    would carry the cursor into the future (9999-12-31: every later result falls below the cursor
    and is never read — monitoring stops for every patient, silently)."""
    limit = _clock_limit_us(headers)
    out: list[model.Resource | model.Undecodable] = []
    for item in items:
        stamp = item.meta.lastUpdated if isinstance(item, model.Resource) and item.meta is not None else None
        if stamp:
            try:
                future = to_epoch_us(stamp) > limit
            except (ValueError, OverflowError):
                future = False
            if future:
                resource = cast(model.Resource, item)  # a stamp is read from Resources only
                subject = resource.subject.reference if resource.subject is not None else None
                out.append(
                    model.Undecodable(
                        FUTURE_STAMP,
                        raw.clean_text(resource.resourceType, 64),
                        raw.fhir_id(resource.id),
                        patient_reference(subject),
                    )
                )
                continue
        out.append(item)
    return out


def _clock_limit_us(headers: Mapping[str, str]) -> int:
    try:
        date = parsedate_to_datetime(headers.get("Date") or "")
    except (TypeError, ValueError, IndexError):
        date = None
    if date is None:
        return int(time.time() * 1_000_000) + _NO_DATE_SLACK_US
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    return int(date.timestamp() * 1_000_000) + _DATE_SLACK_US
