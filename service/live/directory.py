"""Patient context and recipients for the live loop, read from the FHIR server and cached.

A failed look-up never holds back an alert: the patient is graded with the scheme's own bands and
the Communication goes to the configured pool, and the failure is logged (ids only), counted, and
remembered for a few minutes like a successful answer (a negative TTL), so a refused look-up is not
repeated for every panel.

Only what is on this server is read: the patient key is the canonical reference (intake), and a
patient or order on an accepted foreign server (an absolute key) is never looked up here — its local
namesake of the same id is another patient. Replay uses no facts for it either (read_document)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import msgspec
import structlog

from service import metrics
from service.config import Settings
from service.core.context import (
    CHRONIC_BENIGN_NEUTROPENIA,
    PatientContext,
    care_team_members,
    patient_context,
    requester,
)
from service.core.observations import canonical_reference
from service.core.recipients import Recipients, choose
from service.errors import NeutrowatchError
from service.fhir import model
from service.fhir.client import FhirClient
from service.fhir.errors import FhirHttpError
from service.fhir.model import FhirJson
from service.fhir.references import Resolved

log = structlog.get_logger("neutrowatch.directory")
T = TypeVar("T")
_CACHE_LIMIT = 20_000
FAILURE_TTL_SECONDS = 300.0  # a failed look-up is asked again after this (or context_ttl_seconds, if shorter)


def _resource(obj: FhirJson | None) -> model.Resource | None:
    if obj is None:
        return None
    try:
        return msgspec.convert(obj, model.Resource)
    except msgspec.ValidationError:
        return None


async def read_existing(client: FhirClient, resource_type: str, id: str) -> FhirJson | None:
    """The resource, or None when the server says it does not exist (a definite answer)."""
    try:
        return (await client.read(resource_type, id))[0]
    except FhirHttpError as err:
        if err.status in (404, 410):
            return None
        raise


def subject_search(base_url: str | None, patient: str) -> str:
    """The search value for resources about a local patient: its relative and its absolute
    spelling (a comma is OR, FHIR search.html#combining). A server that indexes references as
    written finds a Condition whose subject is absolute under the base only by the second;
    replay keys such a Condition by the canonical subject too. (A versioned subject cannot be
    searched for that way; a server that resolves references finds it by the first.)"""
    return f"{patient},{base_url}/{patient}" if base_url else patient


async def chronic_benign_conditions(client: FhirClient, subject: str) -> list[FhirJson]:
    """The patient's chronic benign neutropenia Conditions (`subject`: a `subject_search` value)."""
    code = f"http://snomed.info/sct|{CHRONIC_BENIGN_NEUTROPENIA}"
    return await client.search_all("Condition", [("subject", subject), ("code", code)])


async def active_care_teams(client: FhirClient, subject: str) -> list[FhirJson]:
    """The patient's active CareTeams (`subject`: a `subject_search` value)."""
    return await client.search_all("CareTeam", [("subject", subject), ("status", "active")])


class LiveDirectory:
    def __init__(
        self, settings: Settings, client: FhirClient, *, clock: Callable[[], float] = time.monotonic
    ):
        self.settings = settings
        self.client = client
        self.clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, Any, bool]] = (
            OrderedDict()
        )  # (when, value, failed)
        self.policy = settings.read_policy

    async def _guard(
        self, what: str, ref: str, key: tuple[str, str], load: Callable[[], Awaitable[T]], fallback: T
    ) -> T:
        """The loaded value, cached for poll.context_ttl_seconds; when the look-up fails, the fallback,
        cached too, for FAILURE_TTL_SECONDS at most (a negative TTL). A refused look-up (403: a scope
        the token lacks) would otherwise be asked again for every panel of the patient in every cycle;
        a transient one is asked again a few minutes later. Each failure is counted and logged once."""
        hit = self._cache.get(key)
        now = self.clock()
        if hit is not None:
            at, value, failed = hit
            ttl = self.settings.poll.context_ttl_seconds
            if now - at < (min(ttl, FAILURE_TTL_SECONDS) if failed else ttl):
                self._cache.move_to_end(key)
                return cast(T, value)  # the cache holds what this key's loader (or fallback) gave
        try:
            value = await load()
        except NeutrowatchError as err:
            metrics.CONTEXT_FAILURES.labels(what).inc()
            log.warning(
                "context look-up failed; using the fallback",
                lookup=what,
                reference=ref,
                error=str(err)[:200],
                retry_after_seconds=min(self.settings.poll.context_ttl_seconds, FAILURE_TTL_SECONDS),
            )
            self._remember(key, now, fallback, failed=True)
            return fallback
        self._remember(key, now, value, failed=False)
        return value

    def _remember(self, key: tuple[str, str], now: float, value: Any, *, failed: bool) -> None:
        self._cache[key] = (now, value, failed)
        self._cache.move_to_end(key)
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.popitem(last=False)

    async def _read(self, resource_type: str, id: str) -> model.Resource | None:
        """The resource, or None when the server says it does not exist (a definite answer)."""
        return _resource(await read_existing(self.client, resource_type, id))

    def _local(self, ref: str, resource_type: str) -> str | None:
        found = canonical_reference(ref, resource_type, self.policy)
        return found.local_id if isinstance(found, Resolved) else None

    def _subject(self, patient: str) -> str:
        return subject_search(self.settings.fhir.base_url, patient)

    async def context(self, patient: str) -> PatientContext:
        rules = self.settings.rules
        pid = self._local(patient, "Patient")
        if not self.settings.poll.patient_context or pid is None:
            # nothing to read here: context off, or a patient on an accepted foreign server
            return patient_context(patient, None, (), replace(rules, chronic_benign_threshold=None))

        async def load() -> PatientContext:
            record = await self._read("Patient", pid)
            conditions: list[model.Resource] = []
            if rules.chronic_benign_threshold is not None:
                found = await chronic_benign_conditions(self.client, self._subject(patient))
                conditions = [r for r in map(_resource, found) if r is not None]
            return patient_context(patient, record, conditions, rules)

        fallback = patient_context(patient, None, (), replace(rules, chronic_benign_threshold=None))
        return await self._guard("patient", patient, ("context", patient), load, fallback)

    async def recipients(self, patient: str, based_on: Sequence[str]) -> Recipients:
        pool = self.settings.alerts.recipients
        if not self.settings.poll.patient_context or self._local(patient, "Patient") is None:
            # context off, or a patient on an accepted foreign server: nothing of it is read here
            # (not even a local order it names: replay has no facts for it either)
            return choose((), {}, (), pool)
        requesters: dict[str, str | None] = {}
        for ref in based_on:
            sid = self._local(ref, "ServiceRequest")
            if sid is None:
                continue

            async def load_order(sid: str = sid) -> str | None:
                return requester(await self._read("ServiceRequest", sid))

            requesters[ref] = await self._guard("order", ref, ("order", ref), load_order, None)
        if any(requesters.values()):
            return choose(based_on, requesters, (), pool)

        async def load_team() -> list[str]:
            found = await active_care_teams(self.client, self._subject(patient))
            return care_team_members(r for r in map(_resource, found) if r is not None)

        no_team: list[str] = []
        team = await self._guard("care team", patient, ("team", patient), load_team, no_team)
        return choose(based_on, requesters, team, pool)
