"""A fault-injecting reverse proxy the project owns: aiohttp on 127.0.0.1, forwarding to the FHIR
test engine, so the service under test only ever talks to it.

Faults come two ways:

* explicit `Fault`s, the first matching one with budget left (what the client tests script);
* a seeded `FaultPlan`: per request class (an Observation search page, any other GET, a write) a
  probability per fault kind, drawn from `random.Random(seed)` in request order; and armed one-shot
  process faults that fire at a moment only the proxy can see (it calls `on_kill`, which the
  campaign points at `kill -9` of the service: mid-page, after a write went upstream but before it
  is answered, or a few ms after a page was delivered while the service stores it).

Every injected fault is counted by kind (`counts`) and logged with its time (`events`). The
upstream's origin in bodies and in Location / Content-Location headers is rewritten to the proxy's
base URL (next links included), so the client sees one origin, except for the deliberate
other-origin next link, which points at `other` (a sink that records whatever reaches it: nothing
should). `down()` stops accepting connections (refused) and drops requests on open ones; `up()`
listens again on the same port.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from service.fhir.fhirtime import to_epoch_us

# request classes
SEARCH, READ, WRITE = "search", "read", "write"

# network fault kinds
HTTP_500, HTTP_502, HTTP_503 = "http-500", "http-502", "http-503"
RETRY_AFTER_SECONDS, RETRY_AFTER_DATE = "429-retry-after-seconds", "429-retry-after-date"
SLOW = "slow-response"  # answered after the client's timeout (a write is applied first)
RESET = "reset-mid-body"  # part of the body, then the connection is aborted
TRUNCATED = "truncated-json"  # a complete HTTP answer whose JSON body is cut
REPEATED = "repeated-entries"  # a search page that repeats entries of the previous page
OTHER_ORIGIN = "next-other-origin"  # next link to another origin, where the client will follow it
APPLIED_502 = "write-applied-502"  # the write is applied upstream, the answer is a 502
DOWN = "server-down"  # connections refused for a while (counted by whoever calls down())
# process faults the proxy triggers (armed by the campaign)
KILL_MID_PAGE = "kill-9-mid-page"
KILL_AFTER_POST = "kill-9-after-post"
KILL_IN_STORE_WRITE = "kill-9-in-store-write"
PROXY_KILLS = (KILL_MID_PAGE, KILL_AFTER_POST, KILL_IN_STORE_WRITE)

NETWORK_KINDS = (
    HTTP_500,
    HTTP_502,
    HTTP_503,
    RETRY_AFTER_SECONDS,
    RETRY_AFTER_DATE,
    SLOW,
    RESET,
    TRUNCATED,
    REPEATED,
    OTHER_ORIGIN,
    APPLIED_502,
)
APPLICABLE: dict[str, tuple[str, ...]] = {
    SEARCH: (
        HTTP_500,
        HTTP_502,
        HTTP_503,
        RETRY_AFTER_SECONDS,
        RETRY_AFTER_DATE,
        SLOW,
        RESET,
        TRUNCATED,
        REPEATED,
        OTHER_ORIGIN,
    ),
    READ: (
        HTTP_500,
        HTTP_502,
        HTTP_503,
        RETRY_AFTER_SECONDS,
        RETRY_AFTER_DATE,
        SLOW,
        RESET,
        TRUNCATED,
        OTHER_ORIGIN,
    ),
    WRITE: (HTTP_500, HTTP_503, RETRY_AFTER_SECONDS, RETRY_AFTER_DATE, SLOW, RESET, TRUNCATED, APPLIED_502),
}
_PASSED = ("accept", "content-type", "if-none-exist", "if-match", "prefer", "x-engine-keep-meta")
_KEPT = ("content-type", "etag", "location", "content-location", "last-modified")
_PAGING = ("_lastUpdated", "_offset", "_count", "date")

Handler = Callable[[web.Request], web.StreamResponse]
Mutate = Callable[[int, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


def outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


@dataclass
class Seen:
    method: str
    raw_path: str  # path and query exactly as received (after the prefix)
    headers: dict[str, str]
    started: float = 0.0
    ended: float | None = None
    fault: str | None = None


@dataclass
class Fault:
    """For the first `times` requests matching `when` (and whose body holds `body_contains`): answer
    with `respond` (nothing forwarded), or forward and pass the answer through
    `mutate(status, headers, body)`, optionally after `delay`. Counted under `kind` when given."""

    when: Callable[[web.Request], bool]
    times: float = 1
    respond: Handler | None = None
    mutate: Mutate | None = None
    delay: float = 0.0
    kind: str | None = None
    body_contains: bytes | None = None


@dataclass
class FaultPlan:
    """Probability of each fault kind per request, by request class. At most one fault a request."""

    probabilities: dict[str, dict[str, float]]
    enabled: bool = True
    slow_seconds: float = 2.5  # must exceed the client's timeout
    retry_after_seconds: int = 1
    retry_after_date_seconds: int = 2  # an HTTP-date this far ahead (1 s resolution)
    repeat_entries: int = 3  # entries of the previous page put in front of the page

    def __post_init__(self) -> None:
        for cls, kinds in self.probabilities.items():
            unknown = set(kinds) - set(APPLICABLE[cls])
            if unknown:
                raise ValueError(f"{cls}: fault kinds {sorted(unknown)} do not apply")
            if sum(kinds.values()) > 1:
                raise ValueError(f"{cls}: probabilities add up to more than 1")

    def draw(self, cls: str, rng: random.Random) -> str | None:
        u = rng.random()  # drawn even when disabled: the schedule stays tied to the request order
        if not self.enabled:
            return None
        for kind in APPLICABLE[cls]:
            p = self.probabilities.get(cls, {}).get(kind, 0.0)
            if u < p:
                return kind
            u -= p
        return None


@dataclass
class OtherOrigin:
    """Stands for any other server: records what reaches it, answers an empty Bundle."""

    base: str = ""
    seen: list[Seen] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), time.time()))
        return web.json_response({"resourceType": "Bundle", "type": "searchset", "entry": []})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # a started site
        self.base = f"http://127.0.0.1:{port}"
        return self.base

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def request_class(method: str, path: str) -> str:
    if method != "GET":
        return WRITE
    return SEARCH if path.rstrip("/").endswith("/Observation") else READ


class Proxy:
    """The reverse proxy. `base` is its FHIR base URL (http://127.0.0.1:<port><prefix>)."""

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        plan: FaultPlan | None = None,
        prefix: str = "/fhir",
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.prefix, self.host, self.port = prefix, host, port
        self.rng = random.Random(seed)
        self.plan = plan
        self.record = record
        self.base = ""
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self.counts: Counter[str] = Counter()
        self.events: list[tuple[float, str, str]] = []  # (time, kind, "METHOD path")
        self.requests_by_class: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.on_kill: Callable[[str], bool] | None = None  # kill the service; False when it was not running
        self.other = OtherOrigin()
        self.session: aiohttp.ClientSession | None = None
        self._armed: list[str] = []
        self._down = False
        self._previous: dict[tuple[Any, ...], list[Any]] = {}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", self.prefix, self.handle)
        app.router.add_route("*", self.prefix + "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        await self.other.start()
        await self._listen()
        self.base = f"http://{self.host}:{self.port}{self.prefix}"
        return self.base

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.session is not None:
            await self.session.close()
            self.session = None
        await self.other.stop()

    async def _listen(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._runner.server, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def is_down(self) -> bool:
        return self._down

    async def down(self) -> None:
        """Refuse new connections; requests arriving on open keep-alive connections are dropped."""
        if self._down:
            return
        self._down = True
        if self._server is not None:
            self._server.close()
            self._server = None

    async def up(self) -> None:
        if not self._down:
            return
        await self._listen()
        self._down = False

    # -- scripting -------------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def arm(self, kind: str) -> None:
        """One-shot process fault, fired at the next request it fits (see PROXY_KILLS)."""
        assert kind in PROXY_KILLS, kind
        self._armed.append(kind)

    def disarm(self) -> list[str]:
        left, self._armed = self._armed, []
        return left

    @property
    def armed(self) -> list[str]:
        return list(self._armed)

    def requests(self, method: str, path_prefix: str = "") -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.raw_path.startswith(path_prefix)]

    def count(self, kind: str, what: str = "") -> None:
        self.counts[kind] += 1
        self.events.append((time.time(), kind, what))

    def _take_armed(self, kind: str) -> bool:
        if kind in self._armed:
            self._armed.remove(kind)
            return True
        return False

    def _kill(self, kind: str, what: str) -> None:
        if self.on_kill is not None and self.on_kill(kind):
            self.count(kind, what)
        elif kind not in self._armed:
            self._armed.append(kind)  # nothing was running: try again at the next chance

    # -- the handler -----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._down:  # a request on a connection opened before the server went down
            _abort(request)
            return web.Response(status=503)
        raw_path = (
            request.raw_path[len(self.prefix) :]
            if request.raw_path.startswith(self.prefix)
            else request.raw_path
        )
        raw_path = raw_path if raw_path.startswith("/") else "/" + raw_path
        seen = Seen(request.method, raw_path, dict(request.headers), time.time())
        if self.record:
            self.seen.append(seen)
        cls = request_class(request.method, request.path)
        self.requests_by_class[cls] += 1
        self.in_flight[cls] += 1
        self.max_in_flight[cls] = max(self.max_in_flight[cls], self.in_flight[cls])
        try:
            return await self._handle(request, raw_path, cls, seen)
        finally:
            self.in_flight[cls] -= 1
            seen.ended = time.time()

    async def _handle(self, request: web.Request, raw_path: str, cls: str, seen: Seen) -> web.StreamResponse:
        what = f"{request.method} {request.path.removeprefix(self.prefix) or '/'}"
        body = await request.read()
        fault = next(
            (
                f
                for f in self.faults
                if f.times > 0 and f.when(request) and (f.body_contains is None or f.body_contains in body)
            ),
            None,
        )
        if fault is not None:  # an explicit fault replaces the plan for this request
            return await self._explicit_fault(fault, request, raw_path, body, seen, what)

        # armed process faults come first
        if cls == WRITE and self._take_armed(KILL_AFTER_POST):
            await self._forward(request, raw_path, body)  # applied upstream...
            self._kill(KILL_AFTER_POST, what)  # ...and the service dies before it hears so
            _abort(request)
            return web.Response(status=502)
        kind = self.plan.draw(cls, self.rng) if self.plan is not None else None
        refused = await self._refuse_unforwarded(request, cls, kind, seen, what)
        if refused is not None:
            return refused
        if kind == SLOW and cls != WRITE:
            assert self.plan is not None
            self.count(kind, what)
            seen.fault = kind
            await asyncio.sleep(self.plan.slow_seconds)  # the client gave up meanwhile

        status, headers, data = await self._forward(request, raw_path, body)

        spoiled = await self._spoil_forwarded(request, cls, kind, status, headers, data, seen, what)
        if spoiled is not None:
            return spoiled

        if cls == READ and kind == OTHER_ORIGIN and 200 <= status < 300 and request.path.endswith("/Flag"):
            data = self._next_elsewhere(raw_path, data, seen, what)  # search_all follows every next link
        if cls == SEARCH and 200 <= status < 300:
            data = self._search_page(request, raw_path, data, kind, seen, what)
            if _has_entries(data):
                killed = await self._kill_on_page(request, status, headers, data, what)
                if killed is not None:
                    return killed
        return await _send(request, status, headers, data)

    async def _refuse_unforwarded(
        self, request: web.Request, cls: str, kind: str | None, seen: Seen, what: str
    ) -> web.StreamResponse | None:
        """The planned faults answered without forwarding (5xx, 429): their response, else None."""
        if kind in (HTTP_500, HTTP_503) or (kind == HTTP_502 and cls != WRITE):
            self.count(kind, what)
            seen.fault = kind
            return await _send(
                request,
                int(kind[-3:]),
                {"Content-Type": "application/fhir+json"},
                orjson.dumps(outcome("transient", f"injected {kind}")),
            )
        if kind in (RETRY_AFTER_SECONDS, RETRY_AFTER_DATE):
            assert self.plan is not None
            self.count(kind, what)
            seen.fault = kind
            after = (
                str(self.plan.retry_after_seconds)
                if kind == RETRY_AFTER_SECONDS
                else formatdate(time.time() + self.plan.retry_after_date_seconds, usegmt=True)
            )
            return await _send(
                request,
                429,
                {"Content-Type": "application/fhir+json", "Retry-After": after},
                orjson.dumps(outcome("throttled", "injected 429")),
            )
        return None

    async def _spoil_forwarded(
        self,
        request: web.Request,
        cls: str,
        kind: str | None,
        status: int,
        headers: dict[str, str],
        data: bytes,
        seen: Seen,
        what: str,
    ) -> web.StreamResponse | None:
        """The planned faults applied once the request was forwarded: their response, or None to go on
        (after a slow write's delay, or for no such fault)."""
        if kind == SLOW and cls == WRITE:
            assert self.plan is not None
            self.count(kind, what)
            seen.fault = kind
            await asyncio.sleep(self.plan.slow_seconds)  # applied, answered too late
        elif kind == APPLIED_502:
            self.count(kind, what)
            seen.fault = kind
            return await _send(
                request,
                502,
                {"Content-Type": "application/fhir+json"},
                orjson.dumps(outcome("transient", "injected 502 after the write was applied")),
            )
        elif kind == RESET and len(data) > 1:
            self.count(kind, what)
            seen.fault = kind
            return await _send(request, status, headers, data, cut=len(data) // 2)
        elif kind == TRUNCATED and len(data) > 1:
            self.count(kind, what)
            seen.fault = kind
            return await _send(request, status, headers, data[: len(data) // 2])
        return None

    async def _explicit_fault(
        self, fault: Fault, request: web.Request, raw_path: str, body: bytes, seen: Seen, what: str
    ) -> web.StreamResponse:
        fault.times -= 1
        if fault.kind:
            self.count(fault.kind, what)
            seen.fault = fault.kind
        await asyncio.sleep(fault.delay)
        if fault.respond is not None:
            return fault.respond(request)
        status, headers, data = await self._forward(request, raw_path, body)
        if fault.mutate is not None:
            status, headers, data = fault.mutate(status, headers, data)
        return await _send(request, status, headers, data)

    async def _kill_on_page(
        self, request: web.Request, status: int, headers: dict[str, str], data: bytes, what: str
    ) -> web.StreamResponse | None:
        """An armed kill during a search page with entries: its response, or None if none is armed."""
        if self._take_armed(KILL_MID_PAGE):
            return await _send(
                request,
                status,
                headers,
                data,
                cut=len(data) // 2,
                then=lambda: self._kill(KILL_MID_PAGE, what),
            )
        if self._take_armed(KILL_IN_STORE_WRITE):
            response = await _send(request, status, headers, data)
            delay = self.rng.uniform(0.0, 0.04)  # the service is storing the page now
            asyncio.get_running_loop().call_later(delay, self._kill, KILL_IN_STORE_WRITE, what)
            return response
        return None

    def _search_page(
        self, request: web.Request, raw_path: str, data: bytes, kind: str | None, seen: Seen, what: str
    ) -> bytes:
        """Repeated entries and the other-origin next link; remembers each search's last page."""
        query = parse_qsl(urlsplit(raw_path).query, keep_blank_values=True)
        family = (request.path, tuple(sorted((k, v) for k, v in query if k not in _PAGING)))
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
        if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
            return data
        entries = list(doc.get("entry") or [])
        previous = self._previous.get(family)
        self._previous[family] = entries
        changed = False
        if kind == REPEATED and previous and self.plan is not None:
            doc["entry"] = previous[-self.plan.repeat_entries :] + entries
            changed = True
            self.count(kind, what)
            seen.fault = kind
        elif kind == OTHER_ORIGIN and _followed(doc, query):
            for link in doc.get("link") or ():
                if link.get("relation") == "next":
                    parts = urlsplit(link["url"])
                    link["url"] = (
                        f"{self.other.base}{self.prefix}{parts.path.removeprefix(self.prefix)}?{parts.query}"
                    )
                    changed = True
            if changed:
                self.count(kind, what)
                seen.fault = kind
        return orjson.dumps(doc) if changed else data

    def _next_elsewhere(self, raw_path: str, data: bytes, seen: Seen, what: str) -> bytes:
        """A searchset that says more results are on another origin."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
        if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
            return data
        target = f"{self.other.base}{self.prefix}{urlsplit(raw_path).path}?_offset=100"
        doc["link"] = [link for link in doc.get("link") or () if link.get("relation") != "next"] + [
            {"relation": "next", "url": target}
        ]
        self.count(OTHER_ORIGIN, what)
        seen.fault = OTHER_ORIGIN
        return orjson.dumps(doc)

    async def _forward(
        self, request: web.Request, raw_path: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        assert self.session is not None
        passed = {k: v for k, v in request.headers.items() if k.lower() in _PASSED}
        async with self.session.request(
            request.method,
            URL(self.upstream + raw_path, encoded=True),
            data=body if body else None,
            headers=passed,
            allow_redirects=False,
        ) as resp:
            data = (await resp.read()).replace(self.upstream.encode(), self.base.encode())
            headers = {
                k: v.replace(self.upstream, self.base) for k, v in resp.headers.items() if k.lower() in _KEPT
            }
            return resp.status, headers, data


def _has_entries(data: bytes) -> bool:
    return b'"entry":[{' in data or b'"entry": [{' in data


def _followed(doc: dict[str, Any], query: Sequence[tuple[str, str]]) -> bool:
    """Would neutrowatch's keyset paging follow this page's next link? Only when the page has one
    and every entry shares the search's _lastUpdated lower bound (service/live/search.py pages_since)."""
    if not any(link.get("relation") == "next" for link in doc.get("link") or ()):
        return False
    bounds = [v[2:] for k, v in query if k == "_lastUpdated" and v.startswith("ge")]
    if len(bounds) != 1:
        return False
    try:
        bound = to_epoch_us(bounds[0])
        stamps = [
            to_epoch_us(e["resource"]["meta"]["lastUpdated"])
            for e in doc.get("entry") or ()
            if (e.get("search") or {}).get("mode") != "include"
        ]  # not the DiagnosticReports included
    except (KeyError, TypeError, ValueError):
        return False
    return all(s <= bound for s in stamps)


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _send(
    request: web.Request,
    status: int,
    headers: dict[str, str],
    body: bytes,
    *,
    cut: int | None = None,
    then: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """Answer with `body`; with `cut`, announce the whole length, send `cut` bytes, then (after
    `then`) abort the connection: a reset mid-response."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = len(body)
    try:
        await response.prepare(request)
        if cut is None:
            await response.write(body)
            await response.write_eof()
            return response
        await response.write(body[:cut])
        await asyncio.sleep(0.01)  # let the part reach the client
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        return response
    if then is not None:
        then()
    _abort(request)
    return response
