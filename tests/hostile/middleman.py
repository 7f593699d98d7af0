"""A small aiohttp middleman between the worker and the real FHIR engine that splices hostile
entries, as raw bytes, into the engine's Observation searchset pages (the engine itself refuses
invalid resources on write, so they can only be injected on the way back).

Every request is recorded (`requests`: what the worker asked the server for). Everything is
forwarded as is, except: the engine's origin in bodies and Location headers becomes
the middleman's (so next links stay under the client's base URL), and for a GET of an Observation
search matching a `Splice`, the splice's entries go in front of the page's entries, with
"@UPDATED@" replaced by the smallest meta.lastUpdated on the page (or the search's own
_lastUpdated bound), so injected entries never move the worker's cursor past real data; or the
whole body goes through `mangle` (a truncated page, a page that is not JSON).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import aiohttp
import orjson
from aiohttp import web

from tests.hostile.corpus import UPDATED, entry

_PASSED = ("accept", "content-type", "if-none-exist", "if-match", "prefer")
_KEPT = ("content-type", "etag", "location", "last-modified")


@dataclass
class Splice:
    entries: list[bytes]  # resources as raw bytes (each wrapped as one searchset entry)
    when: Callable[[dict[str, str]], bool] = lambda query: (
        "751-8" in query.get("code", "")
    )  # the main CBC search
    times: float = 1  # pages to splice into (float("inf"): every one)
    mangle: Callable[[bytes], bytes] | None = None  # instead of entries: the page body, mangled
    done: int = 0


@dataclass
class Middleman:
    upstream: str
    splices: list[Splice] = field(default_factory=list)
    base: str = ""
    spliced_pages: int = 0
    requests: list[str] = field(default_factory=list)  # "METHOD /path?query" of every request, in order
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]  # a started site has a server
        self._session = aiohttp.ClientSession()
        return self.base

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        self.requests.append(f"{request.method} {request.raw_path}")
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED}
        body = await request.read() if request.can_read_body else None
        async with self._session.request(
            request.method,
            self.upstream + request.raw_path,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as up:
            status, data = up.status, await up.read()
            kept = {
                k: v.replace(self.upstream, self.base) for k, v in up.headers.items() if k.lower() in _KEPT
            }
        data = data.replace(self.upstream.encode(), self.base.encode())
        if request.method == "GET" and request.path.rstrip("/").endswith("/Observation") and status == 200:
            data = self._splice(dict(parse_qsl(request.query_string)), data)
        return web.Response(status=status, body=data, headers=kept)

    def _splice(self, query: dict[str, str], page: bytes) -> bytes:
        for splice in self.splices:
            if splice.done >= splice.times or not splice.when(query):
                continue
            splice.done += 1
            self.spliced_pages += 1
            if splice.mangle is not None:
                return splice.mangle(page)
            stamp = _oldest_stamp(page) or query.get("_lastUpdated", "ge2026-01-01T00:00:00Z")[2:]
            spliced = b",".join(entry(e.replace(UPDATED.encode(), stamp.encode())) for e in splice.entries)
            if b'"entry":[' in page:
                head, tail = page.split(b'"entry":[', 1)
                return head + b'"entry":[' + spliced + (b"," if not tail.startswith(b"]") else b"") + tail
            return page.replace(
                b'{"resourceType":"Bundle",', b'{"resourceType":"Bundle","entry":[' + spliced + b"],", 1
            )
        return page


def _oldest_stamp(page: bytes) -> str | None:
    bundle = orjson.loads(page)
    stamps = [
        e["resource"]["meta"]["lastUpdated"]
        for e in bundle.get("entry", [])
        if "meta" in e.get("resource", {})
    ]
    return min(stamps) if stamps else None
