"""Observation searches by code: every monitored LOINC code and every local code the site's ConceptMaps
translate to one, in as many searches as keep each URL under fhir.max_search_url_length (servers and
proxies refuse long GETs: IIS's default query limit is 2048 characters), read as one stream.

Several searches are merged by meta.lastUpdated (each is sorted by it, `pages_since`): a resource is
handed on only when every other search has nothing older left, so a cursor moved to what was handed
on passes nothing any of the searches still holds (resources sharing that instant are read again
from the cursor less the overlap, as with one search).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from urllib.parse import urlencode

from service.fhir import model
from service.fhir.paging import Page

LOINC = "http://loinc.org"
# What `pages_since` adds to each search: ("_lastUpdated" or "date", "ge" + an instant), with room to spare.
RESERVED = len("&_lastUpdated=ge") + len("2026-01-01T00:00:00.000000+00:00") + 16
MERGED = "merged"  # the `next_url` of a merged page that is not the last one (a marker, never requested)

PageStream = AsyncGenerator[Page, None]


def code_values(loinc_codes: Sequence[str], local_codes: Iterable[tuple[str, str, str]]) -> list[str]:
    """`system|code` of the LOINC codes, then of every local code translated to one of them
    (`local_codes`: (system, code, LOINC code), as the site's terminology lists them)."""
    wanted = set(loinc_codes)
    local = [f"{system}|{code}" for system, code, loinc in local_codes if loinc in wanted]
    return [f"{LOINC}|{c}" for c in loinc_codes] + local


def split_searches(
    url: str, params: Sequence[tuple[str, str]], codes: Sequence[str], max_length: int
) -> list[list[tuple[str, str]]]:
    """`params` (without a code) with the code list spread over as few searches as keep each URL
    (`url` + "?" + query) within `max_length`. One code that does not fit alone is a search of its own
    (the server may still refuse it: visible as that search's error, not a silent gap)."""
    fixed = len(url) + 1 + len(urlencode(list(params))) + len("&code=") + RESERVED
    searches: list[list[tuple[str, str]]] = []
    chunk: list[str] = []
    for code in codes:
        if chunk and fixed + len(urlencode([("code", ",".join([*chunk, code]))])) - len("code=") > max_length:
            searches.append([("code", ",".join(chunk)), *params])
            chunk = []
        chunk.append(code)
    if chunk:
        searches.append([("code", ",".join(chunk)), *params])
    return searches


def _updated_key(
    updated: Callable[[model.Resource | model.Undecodable], int | None],
) -> Callable[[model.Resource | model.Undecodable], int]:
    return lambda r: u if (u := updated(r)) is not None else -1


async def merged(
    streams: Sequence[PageStream],
    page_size: int,
    updated: Callable[[model.Resource | model.Undecodable], int | None],
) -> PageStream:
    """Pages of `page_size` resources taken from `streams` in meta.lastUpdated order (a resource
    without one first: it cannot be placed later). The last page has `next_url` None."""
    try:
        if len(streams) == 1:
            async for page in streams[0]:
                yield page
            return
        async for page in _merge(streams, page_size, _updated_key(updated)):
            yield page
    finally:
        for stream in streams:
            await stream.aclose()


async def _merge(
    streams: Sequence[PageStream], page_size: int, key: Callable[[model.Resource | model.Undecodable], int]
) -> PageStream:
    """The k-way merge: the oldest head among the searches' buffered resources, each search's next
    page read only when its buffer is empty (so every search's head is known before one is taken)."""
    buffers: list[deque[model.Resource | model.Undecodable]] = [deque() for _ in streams]
    open_streams = set(range(len(streams)))
    out: list[model.Resource | model.Undecodable] = []
    cut_short = False
    while True:
        for i in sorted(open_streams):
            cut_short = await _refill(streams[i], buffers[i], open_streams, i) or cut_short
        filled = [i for i, b in enumerate(buffers) if b]
        if not filled:
            yield Page(out, None, MERGED, cut_short)
            return
        first = min(filled, key=lambda i: key(buffers[i][0]))
        out.append(buffers[first].popleft())
        if len(out) >= page_size:
            yield Page(out, MERGED, MERGED, cut_short)
            out, cut_short = [], False


async def _refill(
    stream: PageStream, buffer: deque[model.Resource | model.Undecodable], open_streams: set[int], index: int
) -> bool:
    """Read pages of one search until its buffer holds a resource or the search has ended (then it
    leaves `open_streams`). Returns whether a page read was cut short."""
    cut_short = False
    while not buffer and index in open_streams:
        page = await anext(stream, None)
        if page is None or page.next_url is None:
            open_streams.discard(index)
        if page is not None:
            cut_short = cut_short or page.cut_short
            buffer.extend(page.resources)
    return cut_short
