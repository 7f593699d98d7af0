"""The live loop's terminology: the configured ConceptMap files plus the ConceptMaps the server holds
under terminology.concept_map_urls, read at start-up and again every poll.context_ttl_seconds.

A map the server does not return, or returns unusable, leaves the translations read before in force
(the files' alone at first) and is asked again after FAILURE_TTL_SECONDS: a terminology server hiccup
never stops the cycle, and never silently drops translations that were working.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import structlog

from service.config import Settings
from service.core.observations import ReadPolicy
from service.core.terminology import MapRow, TerminologyError, concept_map_rows
from service.fhir.client import FhirClient
from service.fhir.errors import FhirError

log = structlog.get_logger("neutrowatch.terminology")
FAILURE_TTL_SECONDS = 300.0


class ServerConceptMaps:
    def __init__(
        self, settings: Settings, client: FhirClient, *, clock: Callable[[], float] = time.monotonic
    ):
        self.settings = settings
        self.client = client
        self.clock = clock
        self._policy = settings.read_policy
        self._rows: dict[str, list[MapRow]] = {}
        self._next_at: float | None = None

    async def policy(self) -> ReadPolicy:
        """The read policy with the current translations (re-reading the server's maps when due)."""
        urls = self.settings.terminology.concept_map_urls
        if not urls or (self._next_at is not None and self.clock() < self._next_at):
            return self._policy
        failed = False
        for url in urls:
            rows = await self._read(url)
            if rows is None:
                failed = True
            else:
                self._rows[url] = rows
        ttl = self.settings.poll.context_ttl_seconds
        self._next_at = self.clock() + (min(ttl, FAILURE_TTL_SECONDS) if failed else ttl)
        server_rows = [row for rows in self._rows.values() for row in rows]
        self._policy = replace(
            self.settings.read_policy, terminology=self.settings.terminology.terminology(server_rows)
        )
        return self._policy

    async def _read(self, url: str) -> list[MapRow] | None:
        """The translating rows of the ConceptMaps with this canonical url, None when they could not
        be read (logged with the url and the reason's class, nothing else)."""
        try:
            found = await self.client.search_all("ConceptMap", [("url", url)])
            maps = [r for r in found if r.get("resourceType") == "ConceptMap"]
            if not maps:
                log.warning("concept map not found on the server", url=url)
                return None
            return [row for resource in maps for row in concept_map_rows(resource)]
        except (FhirError, TerminologyError) as err:
            log.warning("concept map not read", url=url, error_type=type(err).__name__)
            return None
