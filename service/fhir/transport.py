"""The HTTP side of the FHIR client: one aiohttp session with timeouts, bounded concurrency,
optional pacing, retries (`backoff`), 401 re-authorisation, a cap on response bodies, and the rule
that a request never leaves the base URL (a redirect elsewhere is refused, and so are next links
and Locations that the client checks with `within_base`), so the access token goes nowhere else.

`Transport.request` sends one FHIR interaction, retried as its idempotency allows, and hands the
response to a `parse` function; a parse may raise `Retry` for a body that was cut short.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
import structlog
from yarl import URL

from service.errors import ConfigError
from service.fhir.auth import Auth, make_auth
from service.fhir.backoff import RETRY_STATUSES, Backoff, BackoffCapped, retry_after_seconds, transient_status
from service.fhir.errors import FhirError, FhirHttpError, FhirUnavailable, PreconditionFailed, UnsafeLinkError
from service.fhir.outcome import outcome_summary, serialization_failure
from service.fhir.tls import ssl_option
from service.metrics import (
    FHIR_PACED_SECONDS,
    FHIR_REQUESTS,
    FHIR_RETRIES,
    FHIR_RETRY_CAPS,
    OVERSIZED_RESPONSES,
    UNSAFE_LINKS,
)

if TYPE_CHECKING:  # settings are only read here: no run-time import of config
    from service.config import FhirSettings

__all__ = ["HTML_PAGE", "RESOURCE_TYPE", "Response", "ResponseTooLarge", "Retry", "Transport"]

log = structlog.get_logger("neutrowatch.fhir")

FHIR_JSON = "application/fhir+json"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
HTML_PAGE = "the server answered with an HTML page, not FHIR JSON — a proxy or login page?"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_BODY_CHUNK = 1 << 16
T = TypeVar("T")


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    authorized: bool  # an Authorization header was sent


class Retry(Exception):
    """One attempt failed in a way that may be retried. `ambiguous`: a write may have been applied."""

    def __init__(
        self, reason: str, *, ambiguous: bool, response: Response | None = None, after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason, self.ambiguous, self.response, self.after = reason, ambiguous, response, after


class ResponseTooLarge(FhirError):
    """A response whose body exceeds `fhir.max_response_bytes` (its Content-Length says so, or the
    body streams past it): refused unread, so one huge page cannot take the process over its memory
    limit (and into a restart loop on the same page). Not retried: the server would send the same.
    A search page so refused is not skipped either: nothing is known of what it holds, so the cycle
    fails and the cursor stays (as `UnreadablePage`) — neutrowatch_oversized_responses_total,
    polls_total{outcome="error"}, /readyz and an error log line that names the setting to raise."""


def _origin(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    except ValueError:
        return None
    if parts.username is not None or parts.password is not None:
        return None  # userinfo would become a second set of credentials
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _is_html(response: Response) -> bool:
    """A page for a person (a proxy's or single sign-on login page, an error page), not a FHIR
    answer: said so, instead of a JSON parse error that sends the operator looking at the server."""
    media = (response.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    return media in ("text/html", "application/xhtml+xml")


def _request_url(url: str) -> URL:
    """Send a URL exactly as given (next links included) unless it holds characters that must be encoded."""
    return URL(url, encoded=True) if url.isascii() and url.isprintable() and " " not in url else URL(url)


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


class Transport:
    """Requests to one FHIR base URL. Construct it inside a running event loop (it makes an aiohttp
    session unless given one, and closes only the session it made)."""

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
        self.base = settings.base_url.rstrip("/")
        self._origin = _origin(self.base)
        self._base_path = urlsplit(self.base).path.rstrip("/")
        self._ssl = ssl_option(settings)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)
        self._sleep, self._clock = sleep, clock
        self._pacer = _Pacer(settings.max_requests_per_minute) if settings.max_requests_per_minute else None
        self._backoff = Backoff(settings.retry, sleep=sleep, rng=rng or random.Random(), monotonic=monotonic)
        self._own_session = session is None
        self._session = session or aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl))
        try:
            self._auth: Auth = auth if auth is not None else make_auth(settings, self._session)
        except BaseException:
            if self._own_session:
                # Nothing was sent on it, so its connector holds no connection to close: detached,
                # the session counts as closed and nothing is left pending for the event loop.
                self._session.detach()
            raise

    def start_cycle(self) -> None:
        """A poll cycle begins: the backoff budget (`fhir.retry.max_cycle_retry_seconds`) is full again."""
        self._backoff.start_cycle()

    async def close(self) -> None:
        if self._own_session and not self._session.closed:
            await self._session.close()

    # -- the base URL ------------------------------------------------------------------------------

    def within_base(self, url: str) -> bool:
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

    def refuse(self, url: str, kind: str) -> UnsafeLinkError:
        """Count and log a `kind` of link ("next", "redirect", "location") that leaves the base URL;
        the error to raise when it cannot just be ignored."""
        UNSAFE_LINKS.labels(kind=kind).inc()
        parts = urlsplit(url)
        log.warning("fhir_unsafe_link", kind=kind, target=f"{parts.scheme}://{parts.netloc}")
        return UnsafeLinkError(
            f"{kind} to {parts.scheme}://{parts.netloc} refused: it leaves the FHIR base URL {self.base}"
        )

    def resource_type(self, url: str) -> str:
        """For logs and messages: the first path segment after the base (never ids or queries)."""
        rest = urlsplit(url).path[len(self._base_path) :].strip("/").split("/")[0]
        return rest if RESOURCE_TYPE.match(rest) or rest == "metadata" else ""

    # -- requests ----------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool,
        parse: Callable[[Response], T],
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> T:
        """One interaction, parsed; retried while `Retry` is raised (ambiguous failures only when
        `idempotent`), within `fhir.retry.max_attempts` and the backoff caps."""
        attempt, reauthorised, spent = 0, False, 0.0
        slept_until = float("-inf")  # the end of this request's own last backoff (monotonic)
        what = f"{method} {self.resource_type(url) or 'base'}"
        while True:
            attempt += 1
            try:
                slept_until = await self._backoff.wait_out_pause(slept_until)
                response = await self._exchange(method, url, body, headers or {})
                if response.status == 401 and response.authorized and not reauthorised:
                    reauthorised, attempt = True, attempt - 1
                    self._auth.invalidate()
                    FHIR_RETRIES.labels(reason="401").inc()
                    continue
                return self._accept(response, parse)
            except Retry as retry:
                if retry.ambiguous and not idempotent:
                    raise self._not_retried(what, retry, attempt) from None
                if attempt >= self._retry.max_attempts:
                    raise FhirUnavailable(
                        f"{what}: gave up after {attempt} attempts; last: {retry.reason}",
                        reason=retry.reason,
                        attempts=attempt,
                    ) from None
                headers_seen = retry.response.headers if retry.response is not None else None
                try:
                    wait = self._backoff.schedule(attempt - 1, retry.reason, retry.after, headers_seen, spent)
                except BackoffCapped as capped:
                    raise self._capped(what, retry, attempt, capped.cap, spent) from None
                spent += wait.seconds
                slept_until = wait.until
                FHIR_RETRIES.labels(reason=retry.reason).inc()
                log.warning(
                    "fhir_retry",
                    method=method,
                    resource_type=self.resource_type(url),
                    reason=retry.reason,
                    attempt=attempt,
                    delay=round(wait.seconds, 3),
                )
                await self._sleep(wait.seconds)

    def _capped(self, what: str, retry: Retry, attempt: int, cap: str, spent: float) -> FhirUnavailable:
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

    def _accept(self, response: Response, parse: Callable[[Response], T]) -> T:
        status = response.status
        if status in RETRY_STATUSES:
            after = retry_after_seconds(response.headers, self._clock())
            reason = "40001" if serialization_failure(response.body) else str(status)
            raise Retry(reason, ambiguous=status != 429, response=response, after=after)
        if status in (409, 412) and (transient := transient_status(status, response.body)) != "412":
            # A conflict (a concurrent conditional create) or a serialization failure: nothing was
            # applied, so a conditional create or an If-Match update is sent again after a backoff.
            # "ambiguous" keeps the rule that a plain POST is never repeated.
            raise Retry(transient or str(status), ambiguous=True, response=response)
        html = _is_html(response)
        if 200 <= status < 300:
            if html:
                raise FhirError(f"HTTP {status}: {HTML_PAGE}")
            return parse(response)
        summary = HTML_PAGE if html else outcome_summary(response.body)
        if status == 412:
            raise PreconditionFailed(status, summary)
        raise FhirHttpError(status, summary)

    def _not_retried(self, what: str, retry: Retry, attempt: int) -> FhirError:
        if retry.response is not None:
            summary = outcome_summary(retry.response.body) or "not retried: the write is not idempotent"
            return FhirHttpError(retry.response.status, summary)
        return FhirUnavailable(
            f"{what}: {retry.reason} after {attempt} attempt(s); not retried, the write is not "
            "idempotent and its outcome is unknown",
            reason=retry.reason,
            attempts=attempt,
        )

    async def _exchange(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Response:
        """One request, following at most one redirect, and only one that stays under the base URL."""
        response = await self._send(method, url, body, headers)
        if response.status not in REDIRECT_STATUSES:
            return response
        location = response.headers.get("Location")
        if not location:
            raise FhirHttpError(response.status, "redirect without a Location")
        target = urljoin(url, location)
        if not self.within_base(target):
            raise self.refuse(target, "redirect")
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
        kind = self.resource_type(url) or "base"
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

    async def _send(self, method: str, url: str, body: bytes | None, extra: Mapping[str, str]) -> Response:
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
                raise Retry("timeout", ambiguous=True) from None
            except (
                aiohttp.ClientConnectorCertificateError,
                aiohttp.ClientSSLError,
            ) as err:  # configuration, not weather
                FHIR_REQUESTS.labels(method=method, status="connection").inc()
                message = f"{method} {self.resource_type(url)}: TLS failed ({type(err).__name__})"
                raise FhirUnavailable(message, reason="tls", attempts=1) from None
            except aiohttp.ClientConnectorError:  # never connected: nothing was sent
                FHIR_REQUESTS.labels(method=method, status="connection").inc()
                raise Retry("connection", ambiguous=False) from None
            except aiohttp.ClientError:
                FHIR_REQUESTS.labels(method=method, status="connection").inc()
                raise Retry("connection", ambiguous=True) from None
        FHIR_REQUESTS.labels(method=method, status=str(status)).inc()
        log.debug("fhir_response", method=method, resource_type=self.resource_type(url), status=status)
        return Response(status, resp_headers, data, authorized="Authorization" in auth)
