"""Async FHIR R4 client: search with paging, read, history, (conditional) create, versioned update
and transactions — each interaction a public method over the transport (`transport`: retries,
bounded concurrency and the rule that the access token never leaves the base URL) and the pager
(`paging`: next links, damaged pages).

Construct it inside a running event loop (it makes an aiohttp session unless given one)::

    async with FhirClient(settings.fhir) as fhir:
        async for page in fhir.search("Observation", [("code", "http://loinc.org|751-8")]):
            ...
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlencode, urljoin

import aiohttp
import orjson

from service.fhir.auth import Auth
from service.fhir.bodies import bundle_object, entry_resources, json_object, optional_object
from service.fhir.errors import FhirError
from service.fhir.model import FhirJson
from service.fhir.paging import BrokenPages, Page, read_page, walk
from service.fhir.transport import RESOURCE_TYPE, Transport

if TYPE_CHECKING:  # settings are only read here: no run-time import of config
    from service.config import FhirSettings

__all__ = ["FhirClient"]

MAX_SEARCH_ALL_PAGES = 100
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


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
        self._transport = Transport(
            settings, auth=auth, session=session, sleep=sleep, rng=rng, clock=clock, monotonic=monotonic
        )
        self._base = self._transport.base
        self._broken_pages = BrokenPages()

    def start_cycle(self) -> None:
        """A poll cycle begins: the backoff budget (`fhir.retry.max_cycle_retry_seconds`) is full again."""
        self._transport.start_cycle()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    # -- interactions ------------------------------------------------------------------------------

    async def metadata(self) -> FhirJson:
        return await self._transport.request(
            "GET", f"{self._base}/metadata", idempotent=True, parse=json_object
        )

    async def search(
        self, resource_type: str, params: Sequence[tuple[str, str]]
    ) -> AsyncGenerator[Page, None]:
        """Pages of a search: the first built from `params`, then Bundle.link[next] exactly as given."""
        pages = functools.partial(read_page, broken=self._broken_pages)
        async for entries, next_url, url in walk(
            self._transport, self._search_url(resource_type, params), pages
        ):
            yield Page(entries.items, next_url, url, entries.cut_short)

    async def search_all(self, resource_type: str, params: Sequence[tuple[str, str]]) -> list[FhirJson]:
        """Every entry resource of a small search as plain dicts (match and include entries; the
        server's search.mode=outcome OperationOutcomes are left out). At most 100 pages."""
        found: list[FhirJson] = []
        pages = 0
        url = self._search_url(resource_type, params)
        async for doc, next_url, _url in walk(self._transport, url, bundle_object):
            found.extend(entry_resources(doc))
            pages += 1
            if pages >= MAX_SEARCH_ALL_PAGES and next_url is not None:
                raise FhirError(f"search_all {resource_type}: more than {MAX_SEARCH_ALL_PAGES} pages")
        return found

    async def read(self, resource_type: str, id: str) -> tuple[FhirJson, str | None]:
        """The current version and its ETag."""
        url = f"{self._type_url(resource_type)}/{self._checked_id(id)}"
        return await self._transport.request(
            "GET", url, idempotent=True, parse=lambda r: (json_object(r), r.headers.get("ETag"))
        )

    async def history(self, resource_type: str, id: str) -> list[FhirJson]:
        """Every version of one resource (`GET [type]/[id]/_history`, paged like a search, at most
        MAX_SEARCH_ALL_PAGES pages); entries without a resource of that type (deletions) are left out."""
        url = f"{self._type_url(resource_type)}/{self._checked_id(id)}/_history"
        found: list[FhirJson] = []
        pages = 0
        async for doc, next_url, _url in walk(self._transport, url, bundle_object):
            found.extend(r for r in entry_resources(doc) if r.get("resourceType") == resource_type)
            pages += 1
            if pages >= MAX_SEARCH_ALL_PAGES and next_url is not None:
                raise FhirError(f"history {resource_type}: more than {MAX_SEARCH_ALL_PAGES} pages")
        return found

    async def create(
        self, resource: FhirJson, *, if_none_exist: str | None = None
    ) -> tuple[FhirJson | None, int]:
        """POST; with `if_none_exist` (a query such as "identifier=sys|val") a conditional create,
        which is safe to retry. Returns (resource or None without a body, 201 or 200)."""
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else {}
        url = self._type_url(resource.get("resourceType", ""))
        return await self._write("POST", url, resource, headers, idempotent=bool(if_none_exist))

    async def update(self, resource: FhirJson, *, if_match: str | None = None) -> tuple[FhirJson | None, int]:
        """PUT /Type/id; `if_match` is an ETag (W/"3") or a bare version id. A stale version raises
        PreconditionFailed. Retried only with If-Match: a retry whose first attempt was applied then
        answers 412, so on PreconditionFailed re-read before concluding there was a conflict."""
        url = f"{self._type_url(resource.get('resourceType', ''))}/{self._checked_id(resource.get('id', ''))}"
        headers = {}
        if if_match:
            headers["If-Match"] = if_match if if_match.startswith(('W/"', '"')) else f'W/"{if_match}"'
        return await self._write("PUT", url, resource, headers, idempotent=bool(if_match))

    async def transaction(self, bundle: FhirJson) -> FhirJson:
        """POST a transaction (or batch) Bundle to the base; returns the response Bundle. Retried only
        when every entry is conditional (POST with ifNoneExist, PUT with ifMatch) or a read."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
            raise ValueError("transaction() needs a Bundle of type transaction or batch")
        idempotent = all(_is_idempotent_entry(e) for e in bundle.get("entry") or ())
        doc, _status = await self._write("POST", self._base, bundle, {}, idempotent=idempotent)
        if doc is None or doc.get("resourceType") != "Bundle":
            raise FhirError("transaction response is not a Bundle")
        return doc

    async def identified(self, resource_type: str, identifier: Sequence[str]) -> list[FhirJson]:
        """The resources of `resource_type` with `identifier` ((system, value): a token search)."""
        return await self.search_all(resource_type, [("identifier", "|".join(identifier))])

    async def transaction_answers(self, entries: list[FhirJson]) -> list[FhirJson]:
        """POST `entries` as one transaction Bundle; the answer's entries, one per entry sent, in
        order (FHIR http.html#transaction-response). An answer of another length raises FhirError."""
        response = await self.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        answers = response.get("entry") or []
        if len(answers) != len(entries):
            raise FhirError(f"server answered {len(answers)} entries to a transaction of {len(entries)}")
        return [a if isinstance(a, dict) else {} for a in answers]

    # -- URLs --------------------------------------------------------------------------------------

    def _type_url(self, resource_type: str) -> str:
        if not isinstance(resource_type, str) or not RESOURCE_TYPE.match(resource_type):
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

    # -- writes ------------------------------------------------------------------------------------

    async def _write(
        self,
        method: str,
        url: str,
        resource: FhirJson,
        headers: dict[str, str],
        *,
        idempotent: bool,
    ) -> tuple[FhirJson | None, int]:
        response = await self._transport.request(
            method,
            url,
            body=orjson.dumps(resource),
            headers=headers,
            idempotent=idempotent,
            parse=lambda r: r,
        )
        location = response.headers.get("Location")
        if location and not self._transport.within_base(urljoin(url, location)):
            self._transport.refuse(urljoin(url, location), "location")  # counted and ignored
        doc = optional_object(response)
        same_type = doc is not None and doc.get("resourceType") == resource.get("resourceType")
        return (doc if same_type else None), response.status  # not e.g. an OperationOutcome
