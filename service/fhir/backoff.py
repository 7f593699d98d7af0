"""When a failed FHIR request is tried again, and after how long: which refusals are transient,
the server's hints (Retry-After, x-ms-retry-after-ms, the RateLimit header) and one client's
backoff — full jitter over an exponential schedule, a quota pause that every request of the client
joins after a 429, and the caps on backoff per request and per cycle (docs/failure-model.md)."""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from service.fhir.outcome import serialization_failure

if TYPE_CHECKING:  # settings are only read here: no run-time import of config
    from service.config import RetrySettings

__all__ = [
    "RETRY_STATUSES",
    "Backoff",
    "BackoffCapped",
    "Wait",
    "quota_reset_seconds",
    "retry_after_seconds",
    "transient_status",
]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_STATUS = re.compile(r"^\s*(\d{3})(?!\d)")
_RATELIMIT_ITEM = re.compile(r'^\s*(?:"[^"]*"|[A-Za-z0-9_.\-]+)\s*((?:;\s*[a-z]+=[^;,]*)*)\s*$')


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
    if serialization_failure(outcome):
        return "40001"
    if code in (409, 412) or code in RETRY_STATUSES:
        return str(code)
    return None


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


class BackoffCapped(Exception):
    """The next backoff would pass a cap: `cap` is "request" (`fhir.retry.max_request_retry_seconds`)
    or "cycle" (`fhir.retry.max_cycle_retry_seconds`, the client's budget). Nothing was taken."""

    def __init__(self, cap: str) -> None:
        super().__init__(cap)
        self.cap = cap


class Wait(NamedTuple):
    seconds: float  # the backoff before the next attempt
    until: float  # when it ends (monotonic)


class Backoff:
    """The backoff state of one client: the quota pause a 429 sets for every request of the client
    (monotonic) and the budget of backoff seconds that `start_cycle()` refills."""

    def __init__(
        self,
        settings: RetrySettings,
        *,
        sleep: Callable[[float], Awaitable[Any]],
        rng: random.Random,
        monotonic: Callable[[], float],
    ) -> None:
        self._settings, self._sleep, self._rng, self._monotonic = settings, sleep, rng, monotonic
        self._paused_until = float("-inf")  # a 429 pauses every request of this client until then
        self._budget, self._budget_at = settings.max_cycle_retry_seconds, monotonic()

    def start_cycle(self) -> None:
        """A poll cycle begins: the budget (`fhir.retry.max_cycle_retry_seconds`) is full again."""
        self._budget, self._budget_at = self._settings.max_cycle_retry_seconds, self._monotonic()

    async def wait_out_pause(self, slept_until: float) -> float:
        """Before a send: wait until the client's quota pause (set by a 429) is over, unless this
        request's own backoff already reached its end. Returns the new end of this request's wait."""
        wait = self._paused_until - max(self._monotonic(), slept_until)
        if wait > 0:
            await self._sleep(wait)
            return self._paused_until
        return slept_until

    def schedule(
        self,
        retry_index: int,
        reason: str,
        after: float | None,
        headers: Mapping[str, str] | None,
        spent: float,
    ) -> Wait:
        """The wait before retry `retry_index` (0 first) of a request that has backed off `spent`
        seconds so far, taken from the budget; a 429 joins and extends the client's quota pause.
        Raises BackoffCapped when a cap would be passed."""
        delay = self._delay(retry_index, reason, after, headers)
        now = self._monotonic()
        if reason == "429":  # one quota pause for the whole client, joined by every request that meets it
            delay = max(delay, self._paused_until - now)
        if spent + delay > self._settings.max_request_retry_seconds:
            raise BackoffCapped("request")
        if not self._debit(
            max(0.0, now + delay - max(now, self._paused_until)) if reason == "429" else delay
        ):
            raise BackoffCapped("cycle")
        if reason == "429":
            self._paused_until = max(self._paused_until, now + delay)
        return Wait(delay, now + delay)

    def _debit(self, seconds: float) -> bool:
        """Take `seconds` of backoff from the client's budget; False (nothing taken) when it is short.
        The budget refills at half a second per second (so backoff never takes more than half the
        time for long) and fully at `start_cycle()`."""
        now, cap = self._monotonic(), self._settings.max_cycle_retry_seconds
        self._budget = min(cap, self._budget + max(0.0, now - self._budget_at) / 2)
        self._budget_at = now
        if seconds > self._budget:
            return False
        self._budget -= seconds
        return True

    def _delay(
        self, retry_index: int, reason: str, after: float | None, headers: Mapping[str, str] | None
    ) -> float:
        """Retry-After (or x-ms-retry-after-ms) as told, capped; a 429 without it waits into the
        quota window — a uniform half to whole `quota_window_seconds`, so the quota has been renewed
        for most of the waiting requests and they come back spread out, not in one burst (or, with a
        `RateLimit` header saying when it renews, until then plus up to a tenth of the window);
        anything else: full jitter over base * 2**n, capped."""
        cap = self._settings.backoff_max_seconds
        if after is not None:
            return min(cap, after)
        if reason == "429":
            window = self._settings.quota_window_seconds
            hint = quota_reset_seconds(headers) if headers is not None else None
            if hint is not None:  # the server says when: then, spread over a tenth of the window
                return min(window, hint + self._rng.uniform(0, window / 10))
            return self._rng.uniform(window / 2, window)
        return self._rng.uniform(0, min(cap, self._settings.backoff_base_seconds * 2**retry_index))
