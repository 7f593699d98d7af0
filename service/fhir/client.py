"""Async FHIR R4 client: search with paging, read, (conditional) create, versioned update and
transactions, with retries, bounded concurrency and a hard rule that the access token never leaves
the base URL (next links and redirects elsewhere are refused).

Construct it inside a running event loop (it makes an aiohttp session unless given one)::

    async with FhirClient(settings.fhir) as fhir:
        async for page in fhir.search("Observation", [("code", "http://loinc.org|751-8")]):
            ...
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar, cast
from urllib.parse import unquote, urlencode, urljoin, urlsplit

import aiohttp
import orjson
import structlog
from yarl import URL

from service.config import FhirSettings
from service.errors import ConfigError
from service.fhir import jsonscan, raw
from service.fhir.auth import Auth, make_auth
from service.fhir.errors import (
    FhirError,
    FhirHttpError,
    FhirUnavailable,
    PreconditionFailed,
    UnsafeLinkError,
)
from service.fhir.fhirtime import to_epoch_us
from service.fhir.references import patient_reference
from service.fhir.tls import ssl_option
from service.metrics import (
    DAMAGED_PAGES,
    FHIR_PACED_SECONDS,
    FHIR_REQUESTS,
    FHIR_RETRIES,
    FHIR_RETRY_CAPS,
    OVERSIZED_RESPONSES,
    PAGES,
    UNSAFE_LINKS,
    reason_label,
)

__all__ = [
    "FhirClient",
    "Page",
    "ResponseTooLarge",
    "UnreadablePage",
    "quota_reset_seconds",
    "transient_status",
]

log = structlog.get_logger("neutrowatch.fhir")

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_SEARCH_ALL_PAGES = 100
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# The session closes of clients whose construction failed: a running task needs a strong reference
# until it is done (asyncio.create_task), and the half-built client that started it is dropped.
_closing: set[asyncio.Task[None]] = set()
T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    resources: list[raw.Resource | raw.Undecodable]  # searchset entries, flattened (include-mode too)
    next_url: str | None
    url: str  # the URL this page came from
    # the same truncated page came twice: `resources` are the entries before the cut and the search
    # stops here. Sorted by _lastUpdated, a cursor moved to what was read loses nothing; a reader
    # that needs the whole result now (temperatures for this cycle's decisions) must fail instead.
    cut_short: bool = False


@dataclass(frozen=True)
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    authorized: bool  # an Authorization header was sent


class _Retry(Exception):
    """One attempt failed in a way that may be retried. `ambiguous`: a write may have been applied."""

    def __init__(
        self, reason: str, *, ambiguous: bool, response: _Response | None = None, after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason, self.ambiguous, self.response, self.after = reason, ambiguous, response, after


def _origin(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    except ValueError:
        return None
    if parts.username is not None or parts.password is not None:
        return None  # userinfo would become a second set of credentials
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from `x-ms-retry-after-ms` or `Retry-After` (delta-seconds or HTTP-date)."""
    try:
        if (ms := headers.get("x-ms-retry-after-ms")) is not None and float(ms) >= 0:
            return float(ms) / 1000
    except ValueError:
        pass
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


_SERIALIZATION = re.compile(r"\b40001\b|could not serialize access", re.IGNORECASE)
_STATUS = re.compile(r"^\s*(\d{3})(?!\d)")


def transient_status(status: int | str | None, outcome: Any = None) -> str | None:
    """Why a refusal is transient, or None when it is a refusal to keep: the retry reason
    (`neutrowatch_fhir_retries_total{reason}`) for a response status, or a transaction/batch entry's
    `response.status` ("409 Conflict"), and its OperationOutcome (a dict, e.g. the entry's
    `response.outcome`, or a body as bytes).

    * "40001": the outcome says the server's database could not serialize the transaction
      (PostgreSQL SQLSTATE 40001, "could not serialize access"), whatever the status: nothing was
      applied, the same request succeeds once the concurrent one has committed.
    * "409": a conflict — Medplum answers it to concurrent conditional creates, which it runs
      serializably.
    * "412": a precondition failed (a stale If-Match). Transient, but a verbatim resend meets the
      same stale version: the caller re-reads, rebuilds and resends. The client itself never resends
      a 412 unless it carries the 40001 marker; it raises PreconditionFailed.
    * "429", "500", "502", "503", "504": overload, as for whole requests.

    Every other status (2xx, 400, 401, 403, 404, 422, ...) is None: a refusal that a retry within the
    cycle would only repeat. The outcome's free text is searched for the marker only, never kept.
    A retry of a non-idempotent write stays the caller's decision: only conditional creates and
    If-Match updates are safe to repeat."""
    if isinstance(status, int):
        code: int | None = status
    else:
        match = _STATUS.match(status) if isinstance(status, str) else None
        code = int(match.group(1)) if match else None
    if code is None or code < 400:
        return None
    if _serialization_failure(outcome):
        return "40001"
    if code in (409, 412) or code in RETRY_STATUSES:
        return str(code)
    return None


def _serialization_failure(outcome: Any) -> bool:
    if isinstance(outcome, bytes | bytearray):
        try:
            outcome = orjson.loads(outcome) if outcome.strip() else None
        except (orjson.JSONDecodeError, RecursionError):
            return False
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return False
    for issue in outcome.get("issue") or ():
        if not isinstance(issue, dict):
            continue
        found = issue.get("details")
        details = found if isinstance(found, dict) else {}
        listed = details.get("coding")
        codings = listed if isinstance(listed, list) else []
        texts = [
            issue.get("diagnostics"),
            details.get("text"),
            *(c.get("code") for c in codings if isinstance(c, dict)),
        ]
        if any(isinstance(t, str) and _SERIALIZATION.search(t[:2000]) for t in texts):
            return True
    return False


class _Pacer:
    """`fhir.max_requests_per_minute`: at most `limit` sends in any `window` seconds — a sliding log
    of send times, so a burst after a quiet minute is allowed up to the limit and never beyond it
    (a server's per-minute quota counts the same way). Waits are real time (pacing, not backoff)."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit, self._window, self._clock = limit, window, clock
        self._sent: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:  # in order: a waiting request is not overtaken
            while True:
                now = self._clock()
                while self._sent and self._sent[0] <= now - self._window:
                    self._sent.popleft()
                if len(self._sent) < self._limit:
                    self._sent.append(now)
                    return
                wait = self._sent[0] + self._window - now
                FHIR_PACED_SECONDS.inc(wait)
                await asyncio.sleep(wait)


_RATELIMIT_ITEM = re.compile(r'^\s*(?:"[^"]*"|[A-Za-z0-9_.\-]+)\s*((?:;\s*[a-z]+=[^;,]*)*)\s*$')


def quota_reset_seconds(headers: Mapping[str, str]) -> float | None:
    """A 429's hint of when the quota renews, when it has no Retry-After: the `RateLimit` header
    (IETF httpapi ratelimit-headers, the form Medplum sends: `"fhirInteractions";r=0;t=37`) — the
    largest `t` (seconds until reset) among the policies with nothing remaining (`r=0`). None when
    absent or unreadable: the client then waits into the quota window instead. A hint only shortens
    or aims the wait; it is never longer than `fhir.retry.quota_window_seconds`."""
    value = headers.get("RateLimit") or ""
    found: float | None = None
    for item in value.split(",")[:16]:
        match = _RATELIMIT_ITEM.match(item)
        if match is None:
            continue
        params = dict(p.strip().split("=", 1) for p in match.group(1).split(";") if "=" in p)
        remaining, reset = params.get("r", "").strip(), params.get("t", "").strip()
        if remaining == "0" and reset.isdigit():
            found = max(found or 0.0, float(reset))
    return found


def outcome_summary(body: bytes) -> str:
    """One line from an OperationOutcome, at most 200 characters: per issue its code, the codes of
    its `details` and the element paths (`expression`) it names. Never `diagnostics` or
    `details.text`: servers put free text there, often echoing the resource they refused (a name,
    a value), and this line goes to logs, errors and /readyz."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in doc.get("issue") or ():
        if not isinstance(issue, dict):
            continue
        details = issue.get("details")
        codings = details.get("coding") if isinstance(details, dict) else None
        codes = [c.get("code") for c in codings if isinstance(c, dict)] if isinstance(codings, list) else []
        expression = issue.get("expression")
        paths = expression if isinstance(expression, list) else []
        words = [_token(issue.get("code")), *map(_token, codes), *(f"at {p}" for p in map(_path, paths) if p)]
        parts.append(" ".join(w for w in words if w))
    return "; ".join(p for p in parts if p)[:200]


_CODE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_PATH = re.compile(r"^[A-Za-z][A-Za-z0-9_.\[\]()]{0,120}$")


def _token(value: Any) -> str:
    return value if isinstance(value, str) and _CODE.match(value) else ""


def _path(value: Any) -> str:
    return value if isinstance(value, str) and _PATH.match(value) else ""


def _is_idempotent_entry(entry: Any) -> bool:
    request = entry.get("request") if isinstance(entry, dict) else None
    if not isinstance(request, dict):
        return False
    method = str(request.get("method", "")).upper()
    return (
        method in ("GET", "HEAD")
        or (method == "POST" and bool(request.get("ifNoneExist")))
        or (method == "PUT" and bool(request.get("ifMatch")))
    )


def _next_link(links: Any) -> str | None:
    for link in links or ():
        relation, url = (
            (link.relation, link.url)
            if isinstance(link, raw.Link)
            else ((link.get("relation"), link.get("url")) if isinstance(link, dict) else (None, None))
        )
        if relation == "next" and isinstance(url, str) and url:
            return url
    return None


def _json_object(response: _Response) -> dict[str, Any]:
    """The body of a GET as a dict. Strict JSON first; a whole document that only a tolerant parser
    reads (NaN, bytes that are not UTF-8 — replaced by U+FFFD here, nothing in these bodies is a
    number we assess) is read so; a truncated or broken body is retryable (a transfer cut short)."""
    try:
        doc = orjson.loads(response.body)
    except (orjson.JSONDecodeError, RecursionError):
        doc = _tolerant_object(response)
    if not isinstance(doc, dict):
        raise FhirError(f"HTTP {response.status} body is not a FHIR resource")
    return doc


def _tolerant_object(response: _Response) -> Any:
    text = response.body.removeprefix(raw.BOM).decode("utf-8", "replace")
    if not jsonscan.single_document(text):
        raise _Retry("invalid_json", ambiguous=False, response=response)
    try:
        return _scrubbed(raw.loads_tolerant(text))
    except RecursionError:
        raise FhirError(f"HTTP {response.status} body is nested too deeply to read") from None
    except ValueError:
        raise FhirError(f"HTTP {response.status} body is not JSON") from None


def _scrubbed(value: Any) -> Any:
    """Lone surrogates (unpaired \\ud800 escapes) replaced, so nothing read can fail to encode later."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode() if not value.isascii() else value
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {_scrubbed(k): _scrubbed(v) for k, v in value.items()}
    return value


def _optional_object(response: _Response) -> dict[str, Any] | None:
    """The body of a write: None when empty (return=minimal) or unreadable (the write happened)."""
    try:
        doc = orjson.loads(response.body) if response.body.strip() else None
    except (orjson.JSONDecodeError, RecursionError):
        log.warning("fhir_unreadable_write_response", status=response.status)
        return None
    return doc if isinstance(doc, dict) else None


def _bundle_object(response: _Response) -> tuple[dict[str, Any], str | None]:
    doc = _json_object(response)
    if doc.get("resourceType") != "Bundle":
        shown = doc.get("resourceType")
        raise FhirError(
            "search answered with "
            f"{shown if isinstance(shown, str) and _TYPE.match(shown) else 'something else'}, not a Bundle"
        )
    return doc, _next_link(doc.get("link"))


def _entry_resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        search = entry.get("search") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and not (isinstance(search, dict) and search.get("mode") == "outcome"):
            found.append(resource)
    return found


class UnreadablePage(FhirError):
    """A search page whose framing is broken (truncated, not JSON at all) came back byte for byte
    the same: after a retry with no readable entry in it, or again after its readable entries were
    read. It is not skipped: nothing is known of what the rest holds (which patients, which
    meta.lastUpdated), so moving the cursor past it could lose an alert. The cycle fails instead —
    visible in neutrowatch_polls_total{outcome="error"}, /readyz,
    neutrowatch_damaged_pages_total{handling="refused"} and the log (size and digest of the page,
    never its content)."""


class ResponseTooLarge(FhirError):
    """A response whose body exceeds `fhir.max_response_bytes` (its Content-Length says so, or the
    body streams past it): refused unread, so one huge page cannot take the process over its memory
    limit (and into a restart loop on the same page). Not retried: the server would send the same.
    A search page so refused is not skipped either: nothing is known of what it holds, so the cycle
    fails and the cursor stays (as `UnreadablePage`) — neutrowatch_oversized_responses_total,
    polls_total{outcome="error"}, /readyz and an error log line that names the setting to raise."""


_BODY_CHUNK = 1 << 16


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
    items: list[raw.Resource | raw.Undecodable]
    cut_short: bool = False


def _page(response: _Response, broken: BrokenPages) -> tuple[PageEntries, str | None]:
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
    doc = doc._replace(items=_without_future_stamps(doc.items, response.headers))
    if doc.complete:
        if doc.resource_type != "Bundle":
            shown = (
                doc.resource_type
                if doc.resource_type and _TYPE.match(doc.resource_type)
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
                unreadable=sum(isinstance(i, raw.Undecodable) for i in doc.items),
                damage=reason_label(doc.damage),
            )
        return PageEntries(doc.items), _next_link(doc.links)
    seen = broken.sightings(response.body)
    if seen == 1:
        DAMAGED_PAGES.labels("retried").inc()
        raise _Retry("invalid_json", ambiguous=False, response=response)
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


FUTURE_STAMP = "meta.lastUpdated is later than the server's own clock"
_DATE_SLACK_US = 5 * 60 * 1_000_000  # clocks of a server's nodes differ a little
_NO_DATE_SLACK_US = 60 * 60 * 1_000_000  # no Date header: our clock, with room for the server's to be ahead


def _without_future_stamps(
    items: list[raw.Resource | raw.Undecodable], headers: Mapping[str, str]
) -> list[raw.Resource | raw.Undecodable]:
    """Entries whose meta.lastUpdated lies beyond the server's clock (its Date header) become
    rejections. The server stamps what it stores, so such a stamp is not one it wrote; believed, it
    would carry the cursor into the future (9999-12-31: every later result falls below the cursor
    and is never read — monitoring stops for every patient, silently)."""
    limit = _clock_limit_us(headers)
    out: list[raw.Resource | raw.Undecodable] = []
    for item in items:
        stamp = item.meta.lastUpdated if isinstance(item, raw.Resource) and item.meta is not None else None
        if stamp:
            try:
                future = to_epoch_us(stamp) > limit
            except (ValueError, OverflowError):
                future = False
            if future:
                resource = cast(raw.Resource, item)  # a stamp is read from Resources only
                subject = resource.subject.reference if resource.subject is not None else None
                out.append(
                    raw.Undecodable(
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


HTML_PAGE = "the server answered with an HTML page, not FHIR JSON — a proxy or login page?"


def _is_html(response: _Response) -> bool:
    """A page for a person (a proxy's or single sign-on login page, an error page), not a FHIR
    answer: said so, instead of a JSON parse error that sends the operator looking at the server."""
    media = (response.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    return media in ("text/html", "application/xhtml+xml")


def _request_url(url: str) -> URL:
    """Send a URL exactly as given (next links included) unless it holds characters that must be encoded."""
    return URL(url, encoded=True) if url.isascii() and url.isprintable() and " " not in url else URL(url)


class FhirClient:
    def __init__(
        self,
        settings: FhirSettings,
        *,
        auth: Auth | None = None,
        session: aiohttp.ClientSession | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not settings.base_url:
            raise ConfigError("fhir.base_url: required")
        self._settings, self._retry = settings, settings.retry
        self._base = settings.base_url.rstrip("/")
        self._origin = _origin(self._base)
        self._base_path = urlsplit(self._base).path.rstrip("/")
        self._ssl = ssl_option(settings)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)
        self._sleep, self._rng, self._clock, self._monotonic = sleep, rng or random.Random(), clock, monotonic
        self._pacer = _Pacer(settings.max_requests_per_minute) if settings.max_requests_per_minute else None
        self._broken_pages = BrokenPages()
        self._paused_until = float("-inf")  # a 429 pauses every request of this client until then (monotonic)
        self._budget, self._budget_at = self._retry.max_cycle_retry_seconds, monotonic()
        self._own_session = session is None
        self._session = session or aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl))
        try:
            self._auth: Auth = auth if auth is not None else make_auth(settings, self._session)
        except BaseException:
            if self._own_session:
                task = asyncio.get_running_loop().create_task(self._session.close())
                _closing.add(task)
                task.add_done_callback(_closing.discard)
            raise

    def start_cycle(self) -> None:
        """A poll cycle begins: the backoff budget (`fhir.retry.max_cycle_retry_seconds`) is full again."""
        self._budget, self._budget_at = self._retry.max_cycle_retry_seconds, self._monotonic()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and not self._session.closed:
            await self._session.close()

    # -- interactions ------------------------------------------------------------------------------

    async def metadata(self) -> dict[str, Any]:
        return await self._request("GET", f"{self._base}/metadata", idempotent=True, parse=_json_object)

    async def search(self, resource_type: str, params: Sequence[tuple[str, str]]) -> AsyncIterator[Page]:
        """Pages of a search: the first built from `params`, then Bundle.link[next] exactly as given."""
        pages = functools.partial(_page, broken=self._broken_pages)
        async for entries, next_url, url in self._walk(self._search_url(resource_type, params), pages):
            yield Page(entries.items, next_url, url, entries.cut_short)

    async def search_all(self, resource_type: str, params: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        """Every entry resource of a small search as plain dicts (match and include entries; the
        server's search.mode=outcome OperationOutcomes are left out). At most 100 pages."""
        found: list[dict[str, Any]] = []
        pages = 0
        async for doc, next_url, _url in self._walk(self._search_url(resource_type, params), _bundle_object):
            found.extend(_entry_resources(doc))
            pages += 1
            if pages >= MAX_SEARCH_ALL_PAGES and next_url is not None:
                raise FhirError(f"search_all {resource_type}: more than {MAX_SEARCH_ALL_PAGES} pages")
        return found

    async def read(self, resource_type: str, id: str) -> tuple[dict[str, Any], str | None]:
        """The current version and its ETag."""
        url = f"{self._type_url(resource_type)}/{self._checked_id(id)}"
        return await self._request(
            "GET", url, idempotent=True, parse=lambda r: (_json_object(r), r.headers.get("ETag"))
        )

    async def history(self, resource_type: str, id: str) -> list[dict[str, Any]]:
        """Every version of one resource (`GET [type]/[id]/_history`, paged like a search, at most
        MAX_SEARCH_ALL_PAGES pages); entries without a resource of that type (deletions) are left out."""
        url = f"{self._type_url(resource_type)}/{self._checked_id(id)}/_history"
        found: list[dict[str, Any]] = []
        pages = 0
        async for doc, next_url, _url in self._walk(url, _bundle_object):
            found.extend(r for r in _entry_resources(doc) if r.get("resourceType") == resource_type)
            pages += 1
            if pages >= MAX_SEARCH_ALL_PAGES and next_url is not None:
                raise FhirError(f"history {resource_type}: more than {MAX_SEARCH_ALL_PAGES} pages")
        return found

    async def create(
        self, resource: dict[str, Any], *, if_none_exist: str | None = None
    ) -> tuple[dict[str, Any] | None, int]:
        """POST; with `if_none_exist` (a query such as "identifier=sys|val") a conditional create,
        which is safe to retry. Returns (resource or None without a body, 201 or 200)."""
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else {}
        url = self._type_url(resource.get("resourceType", ""))
        return await self._write("POST", url, resource, headers, idempotent=bool(if_none_exist))

    async def update(
        self, resource: dict[str, Any], *, if_match: str | None = None
    ) -> tuple[dict[str, Any] | None, int]:
        """PUT /Type/id; `if_match` is an ETag (W/"3") or a bare version id. A stale version raises
        PreconditionFailed. Retried only with If-Match: a retry whose first attempt was applied then
        answers 412, so on PreconditionFailed re-read before concluding there was a conflict."""
        url = f"{self._type_url(resource.get('resourceType', ''))}/{self._checked_id(resource.get('id', ''))}"
        headers = {}
        if if_match:
            headers["If-Match"] = if_match if if_match.startswith(('W/"', '"')) else f'W/"{if_match}"'
        return await self._write("PUT", url, resource, headers, idempotent=bool(if_match))

    async def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction (or batch) Bundle to the base; returns the response Bundle. Retried only
        when every entry is conditional (POST with ifNoneExist, PUT with ifMatch) or a read."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
            raise ValueError("transaction() needs a Bundle of type transaction or batch")
        idempotent = all(_is_idempotent_entry(e) for e in bundle.get("entry") or ())
        doc, _status = await self._write("POST", self._base, bundle, {}, idempotent=idempotent)
        if doc is None or doc.get("resourceType") != "Bundle":
            raise FhirError("transaction response is not a Bundle")
        return doc

    async def identified(self, resource_type: str, identifier: Sequence[str]) -> list[dict[str, Any]]:
        """The resources of `resource_type` with `identifier` ((system, value): a token search)."""
        return await self.search_all(resource_type, [("identifier", "|".join(identifier))])

    async def transaction_answers(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST `entries` as one transaction Bundle; the answer's entries, one per entry sent, in
        order (FHIR http.html#transaction-response). An answer of another length raises FhirError."""
        response = await self.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        answers = response.get("entry") or []
        if len(answers) != len(entries):
            raise FhirError(f"server answered {len(answers)} entries to a transaction of {len(entries)}")
        return [a if isinstance(a, dict) else {} for a in answers]

    # -- URLs --------------------------------------------------------------------------------------

    def _type_url(self, resource_type: str) -> str:
        if not isinstance(resource_type, str) or not _TYPE.match(resource_type):
            raise ValueError(f"not a FHIR resource type: {str(resource_type)[:40]!r}")
        return f"{self._base}/{resource_type}"

    @staticmethod
    def _checked_id(id: Any) -> str:
        if not isinstance(id, str) or not _ID.match(id):
            raise ValueError("not a FHIR resource id")
        return id

    def _search_url(self, resource_type: str, params: Sequence[tuple[str, str]]) -> str:
        query = urlencode(list(params))
        return f"{self._type_url(resource_type)}?{query}" if query else self._type_url(resource_type)

    def _within_base(self, url: str) -> bool:
        """Same origin as the base URL, path under the base path, no dot segments, no userinfo."""
        origin = _origin(url)
        path = urlsplit(url).path
        if (
            origin is None
            or origin != self._origin
            or any(s in (".", "..") for s in unquote(path).split("/"))
        ):
            return False
        return not self._base_path or path == self._base_path or path.startswith(self._base_path + "/")

    def _refuse(self, url: str, kind: str) -> UnsafeLinkError:
        UNSAFE_LINKS.labels(kind=kind).inc()
        parts = urlsplit(url)
        log.warning("fhir_unsafe_link", kind=kind, target=f"{parts.scheme}://{parts.netloc}")
        return UnsafeLinkError(
            f"{kind} to {parts.scheme}://{parts.netloc} refused: it leaves the FHIR base URL {self._base}"
        )

    def _resource_type(self, url: str) -> str:
        """For logs and messages: the first path segment after the base (never ids or queries)."""
        rest = urlsplit(url).path[len(self._base_path) :].strip("/").split("/")[0]
        return rest if _TYPE.match(rest) or rest == "metadata" else ""

    # -- paging ------------------------------------------------------------------------------------

    async def _walk(
        self,
        url: str,
        parse: Callable[[_Response], tuple[T, str | None]],
    ) -> AsyncIterator[tuple[T, str | None, str]]:
        """Parsed pages with their next link and URL; follows next only under the base URL."""
        seen: set[str] = set()
        while True:
            seen.add(url)
            payload, next_url = await self._request("GET", url, idempotent=True, parse=parse)
            PAGES.inc()
            next_url = urljoin(url, next_url) if next_url else None
            yield payload, next_url, url
            if next_url is None:
                return
            if not self._within_base(next_url):
                raise self._refuse(next_url, "next")
            if next_url in seen:
                raise FhirError(f"search {self._resource_type(url)}: next link repeats an earlier page")
            url = next_url

    # -- requests ----------------------------------------------------------------------------------

    async def _write(
        self,
        method: str,
        url: str,
        resource: dict[str, Any],
        headers: dict[str, str],
        *,
        idempotent: bool,
    ) -> tuple[dict[str, Any] | None, int]:
        response = await self._request(
            method,
            url,
            body=orjson.dumps(resource),
            headers=headers,
            idempotent=idempotent,
            parse=lambda r: r,
        )
        location = response.headers.get("Location")
        if location and not self._within_base(urljoin(url, location)):
            self._refuse(urljoin(url, location), "location")  # counted and ignored
        doc = _optional_object(response)
        same_type = doc is not None and doc.get("resourceType") == resource.get("resourceType")
        return (doc if same_type else None), response.status  # not e.g. an OperationOutcome

    async def _request(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool,
        parse: Callable[[_Response], T],
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> T:
        attempt, reauthorised, spent = 0, False, 0.0
        slept_until = float("-inf")  # the end of this request's own last backoff (monotonic)
        what = f"{method} {self._resource_type(url) or 'base'}"
        while True:
            attempt += 1
            try:
                slept_until = await self._wait_out_pause(slept_until)
                response = await self._exchange(method, url, body, headers or {})
                if response.status == 401 and response.authorized and not reauthorised:
                    reauthorised, attempt = True, attempt - 1
                    self._auth.invalidate()
                    FHIR_RETRIES.labels(reason="401").inc()
                    continue
                return self._accept(response, parse)
            except _Retry as retry:
                if retry.ambiguous and not idempotent:
                    raise self._not_retried(what, retry, attempt) from None
                if attempt >= self._retry.max_attempts:
                    raise FhirUnavailable(
                        f"{what}: gave up after {attempt} attempts; last: {retry.reason}",
                        reason=retry.reason,
                        attempts=attempt,
                    ) from None
                delay = self._delay(attempt - 1, retry)
                now = self._monotonic()
                if (
                    retry.reason == "429"
                ):  # one quota pause for the whole client, joined by every request that meets it
                    delay = max(delay, self._paused_until - now)
                if spent + delay > self._retry.max_request_retry_seconds:
                    raise self._capped(what, retry, attempt, "request", spent) from None
                if not self._debit(
                    max(0.0, now + delay - max(now, self._paused_until)) if retry.reason == "429" else delay
                ):
                    raise self._capped(what, retry, attempt, "cycle", spent) from None
                spent += delay
                if retry.reason == "429":
                    self._paused_until = max(self._paused_until, now + delay)
                slept_until = now + delay
                FHIR_RETRIES.labels(reason=retry.reason).inc()
                log.warning(
                    "fhir_retry",
                    method=method,
                    resource_type=self._resource_type(url),
                    reason=retry.reason,
                    attempt=attempt,
                    delay=round(delay, 3),
                )
                await self._sleep(delay)

    async def _wait_out_pause(self, slept_until: float) -> float:
        """Before a send: wait until the client's quota pause (set by a 429) is over, unless this
        request's own backoff already reached its end. Returns the new end of this request's wait."""
        wait = self._paused_until - max(self._monotonic(), slept_until)
        if wait > 0:
            await self._sleep(wait)
            return self._paused_until
        return slept_until

    def _debit(self, seconds: float) -> bool:
        """Take `seconds` of backoff from the client's budget; False (nothing taken) when it is short.
        The budget refills at half a second per second (so backoff never takes more than half the
        time for long) and fully at `start_cycle()`."""
        now, cap = self._monotonic(), self._retry.max_cycle_retry_seconds
        self._budget = min(cap, self._budget + max(0.0, now - self._budget_at) / 2)
        self._budget_at = now
        if seconds > self._budget:
            return False
        self._budget -= seconds
        return True

    def _capped(self, what: str, retry: _Retry, attempt: int, cap: str, spent: float) -> FhirUnavailable:
        FHIR_RETRY_CAPS.labels(cap=cap).inc()
        setting = "max_request_retry_seconds" if cap == "request" else "max_cycle_retry_seconds"
        log.warning(
            "fhir_retry_capped",
            what=what,
            reason=retry.reason,
            attempt=attempt,
            cap=cap,
            spent=round(spent, 3),
        )
        return FhirUnavailable(
            f"{what}: not retried after {attempt} attempt(s), fhir.retry.{setting} reached; "
            f"last: {retry.reason}",
            reason=retry.reason,
            attempts=attempt,
        )

    def _accept(self, response: _Response, parse: Callable[[_Response], T]) -> T:
        status = response.status
        if status in RETRY_STATUSES:
            after = retry_after_seconds(response.headers, self._clock())
            reason = "40001" if _serialization_failure(response.body) else str(status)
            raise _Retry(reason, ambiguous=status != 429, response=response, after=after)
        if status in (409, 412) and (transient := transient_status(status, response.body)) != "412":
            # A conflict (a concurrent conditional create) or a serialization failure: nothing was
            # applied, so a conditional create or an If-Match update is sent again after a backoff.
            # "ambiguous" keeps the rule that a plain POST is never repeated.
            raise _Retry(transient or str(status), ambiguous=True, response=response)
        html = _is_html(response)
        if 200 <= status < 300:
            if html:
                raise FhirError(f"HTTP {status}: {HTML_PAGE}")
            return parse(response)
        summary = HTML_PAGE if html else outcome_summary(response.body)
        if status == 412:
            raise PreconditionFailed(status, summary)
        raise FhirHttpError(status, summary)

    def _not_retried(self, what: str, retry: _Retry, attempt: int) -> FhirError:
        if retry.response is not None:
            summary = outcome_summary(retry.response.body) or "not retried: the write is not idempotent"
            return FhirHttpError(retry.response.status, summary)
        return FhirUnavailable(
            f"{what}: {retry.reason} after {attempt} attempt(s); not retried, the write is not "
            "idempotent and its outcome is unknown",
            reason=retry.reason,
            attempts=attempt,
        )

    def _delay(self, retry_index: int, retry: _Retry) -> float:
        """Retry-After (or x-ms-retry-after-ms) as told, capped; a 429 without it waits into the
        quota window — a uniform half to whole `quota_window_seconds`, so the quota has been renewed
        for most of the waiting requests and they come back spread out, not in one burst (or, with a
        `RateLimit` header saying when it renews, until then plus up to a tenth of the window);
        anything else: full jitter over base * 2**n, capped."""
        cap = self._retry.backoff_max_seconds
        if retry.after is not None:
            return min(cap, retry.after)
        if retry.reason == "429":
            window = self._retry.quota_window_seconds
            hint = quota_reset_seconds(retry.response.headers) if retry.response is not None else None
            if hint is not None:  # the server says when: then, spread over a tenth of the window
                return min(window, hint + self._rng.uniform(0, window / 10))
            return self._rng.uniform(window / 2, window)
        return self._rng.uniform(0, min(cap, self._retry.backoff_base_seconds * 2**retry_index))

    async def _exchange(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> _Response:
        """One request, following at most one redirect, and only one that stays under the base URL."""
        response = await self._send(method, url, body, headers)
        if response.status not in REDIRECT_STATUSES:
            return response
        location = response.headers.get("Location")
        if not location:
            raise FhirHttpError(response.status, "redirect without a Location")
        target = urljoin(url, location)
        if not self._within_base(target):
            raise self._refuse(target, "redirect")
        if method != "GET" and response.status not in (307, 308):
            raise FhirHttpError(response.status, f"redirect of a {method} not followed")
        response = await self._send(method, target, body, headers)
        if response.status in REDIRECT_STATUSES:
            raise FhirHttpError(response.status, "more than one redirect")
        return response

    async def _body(self, resp: aiohttp.ClientResponse, method: str, url: str) -> bytes:
        """The response body, read chunk by chunk up to `fhir.max_response_bytes` (decompressed):
        refused at once when Content-Length is over it, else as soon as the chunks are (a chunked
        response has no length), so no more than the cap and one chunk is ever read (joining the
        chunks holds that twice for a moment)."""
        cap = self._settings.max_response_bytes
        declared = resp.content_length
        if declared is not None and declared > cap:
            raise self._too_large(method, url, f"Content-Length {declared}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(_BODY_CHUNK):
            size += len(chunk)
            if size > cap:
                raise self._too_large(method, url, f"more than {cap} bytes read")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, method: str, url: str, seen: str) -> ResponseTooLarge:
        OVERSIZED_RESPONSES.labels(method=method).inc()
        FHIR_REQUESTS.labels(method=method, status="too_large").inc()
        kind = self._resource_type(url) or "base"
        cap = self._settings.max_response_bytes
        log.error(
            "fhir_response_too_large",
            method=method,
            resource_type=kind,
            limit=cap,
            seen=seen,
            action="not read and not skipped: the cycle fails and the cursor stays; "
            "raise fhir.max_response_bytes "
            "(or lower fhir.page_size)",
        )
        return ResponseTooLarge(
            f"{method} {kind}: response body over fhir.max_response_bytes ({cap} bytes; {seen}): "
            "refused unread, not skipped; raise fhir.max_response_bytes or lower fhir.page_size"
        )

    async def _send(self, method: str, url: str, body: bytes | None, extra: Mapping[str, str]) -> _Response:
        auth = await self._auth.header()
        headers = {"Accept": FHIR_JSON, "User-Agent": self._settings.user_agent, **extra, **auth}
        if body is not None:
            headers["Content-Type"] = FHIR_JSON
        if self._pacer is not None:
            await self._pacer.acquire()  # every send counts: first attempts, retries, a followed redirect
        async with self._semaphore:
            try:
                async with self._session.request(
                    method,
                    _request_url(url),
                    data=body,
                    headers=headers,
                    timeout=self._timeout,
                    ssl=self._ssl,
                    allow_redirects=False,
                ) as resp:
                    status, resp_headers, data = (
                        resp.status,
                        resp.headers,
                        await self._body(resp, method, url),
                    )
            except TimeoutError:
                FHIR_REQUESTS.labels(method=method, status="timeout").inc()
                raise _Retry("timeout", ambiguous=True) from None
            except (
                aiohttp.ClientConnectorCertificateError,
                aiohttp.ClientSSLError,
            ) as err:  # configuration, not weather
                FHIR_REQUESTS.labels(method=method, status="connection").inc()
                message = f"{method} {self._resource_type(url)}: TLS failed ({type(err).__name__})"
                raise FhirUnavailable(message, reason="tls", attempts=1) from None
            except aiohttp.ClientConnectorError:  # never connected: nothing was sent
                FHIR_REQUESTS.labels(method=method, status="connection").inc()
                raise _Retry("connection", ambiguous=False) from None
            except aiohttp.ClientError:
                FHIR_REQUESTS.labels(method=method, status="connection").inc()
                raise _Retry("connection", ambiguous=True) from None
        FHIR_REQUESTS.labels(method=method, status=str(status)).inc()
        log.debug("fhir_response", method=method, resource_type=self._resource_type(url), status=status)
        return _Response(status, resp_headers, data, authorized="Authorization" in auth)
