"""Where a survey's resources come from: files and directories, read by replay's own reader, or a
bounded, read-only sample of the configured server's Observations (searches only, at most `limit`
resources, newest first)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import aclosing
from pathlib import Path

from service.config import FhirSettings
from service.errors import NeutrowatchError
from service.fhir import model, raw
from service.fhir.client import FhirClient
from service.fhir.fhirtime import from_epoch_us
from service.replay.documents import file_documents, files

_DURATION = re.compile(r"(\d{1,6})([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def file_resources(inputs: Sequence[str | Path]) -> Iterator[model.Resource | model.Undecodable]:
    """Every resource of the inputs, as replay reads them (NDJSON, Bundles, .gz, large Bundles entry
    by entry, references inside a Bundle resolved)."""
    for path in files(inputs):
        for document in file_documents(path):
            yield from raw.decode(document) if isinstance(document, bytes) else document


def duration_seconds(text: str) -> int:
    """ "90m", "12h", "7d" -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise NeutrowatchError(f"--since {text!r} is not a duration such as 30m, 12h or 7d")
    return int(m[1]) * _SECONDS[m[2]]


def search_params(since_seconds: int | None, limit: int, page_size: int, now: float) -> list[tuple[str, str]]:
    params = [("_sort", "-_lastUpdated"), ("_count", str(max(1, min(page_size, limit))))]
    if since_seconds is not None:
        params.append(("_lastUpdated", "ge" + from_epoch_us(int((now - since_seconds) * 1_000_000))))
    return params


async def server_resources(
    settings: FhirSettings, since_seconds: int | None, limit: int, now: float | None = None
) -> list[model.Resource | model.Undecodable]:
    """At most `limit` Observations of the server, newest first (`since_seconds`: updated within)."""
    if not settings.base_url:
        raise NeutrowatchError("fhir.base_url is not set: no server to survey")
    params = search_params(since_seconds, limit, settings.page_size, time.time() if now is None else now)
    found: list[model.Resource | model.Undecodable] = []
    async with FhirClient(settings) as client:
        async with aclosing(client.search("Observation", params)) as pages:
            async for page in pages:
                found.extend(page.resources[: limit - len(found)])
                if len(found) >= limit:
                    break
    return found
