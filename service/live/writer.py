"""One alert write posted to the server until it confirms it: the Flag and the Communication in
one transaction, re-read and re-posted on a 412 or on a batch server's mixed answer, then the
Provenance alone with its targets the confirmed server ids. The Bundles are built by
service/output/transaction.py; the requests are FhirClient's."""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import structlog

from service import metrics
from service.errors import NeutrowatchError
from service.fhir.backoff import transient_status
from service.fhir.client import FhirClient
from service.fhir.errors import PreconditionFailed
from service.fhir.model import FhirJson
from service.output.transaction import (
    Delivery,
    Entry,
    KnownFlag,
    OutboxWrites,
    answered_id,
    communication_create,
    flag_create,
    flag_key,
    flag_update,
    provenance_transaction,
    remembered,
    status_of,
)

log = structlog.get_logger("neutrowatch.worker")
TARGET_ATTEMPTS = 3  # Flag+Communication requests per write: 412 re-reads, re-posts after a mixed answer
ENTRY_BACKOFF_SECONDS = (
    0.5  # first backoff (full jitter, doubling) before re-posting entries refused transiently
)
KNOWN_FLAGS = 5000  # episodes' Flags (id, version, content) the writer remembers between writes


class WriteRejected(NeutrowatchError):
    """The server refused an alert write; it stays in the outbox and is retried."""


@dataclass
class _Targets:
    """What one write's Flag and Communication came to so far (`AlertWriter._post_targets`)."""

    ids: dict[str, str] = field(default_factory=dict)  # type -> server id, once confirmed
    written: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # type -> (status, location)
    failed: list[str] = field(default_factory=list)  # statuses of the entries the last answer refused


class AlertWriter:
    """Posts alert writes (output.transaction.OutboxWrites, as the outbox keeps them) through `client`.

    The episodes' Flags as this writer last wrote or read them (id, version, content) are kept, so an
    update needs no identifier search first. Bounded; a stale entry costs one 412 and a re-read."""

    def __init__(self, client: FhirClient, base_url: str) -> None:
        self.client = client
        self.base_url = base_url
        self._flags: OrderedDict[str, KnownFlag] = OrderedDict()

    async def post(self, w: OutboxWrites) -> Delivery:
        """One write: the Flag (conditional create, versioned PUT, or nothing when the server's Flag
        already says the same) and the Communication (conditional create on identifier) in one
        Bundle; then, once the server has confirmed both, the Provenance on its own (conditional
        create on _tag), its targets the server ids it answered.

        Not one Bundle of three: many servers process a `transaction` as a batch (Medplum without
        transaction bundles: 200, one status per entry, the successful entries kept). The server
        reserves an id for each create and rewrites the urn:uuid references to it before any entry
        runs, so a Provenance in the same Bundle as a Flag or Communication entry that fails is kept,
        pointing at an id that never exists; the retry writes the target under another id. Posted
        after its targets, the Provenance can only name what the server holds. It goes even when
        nothing else does: a write whose answer was lost, re-posted, finds it there and writes
        nothing, so it exists once per write. Two requests a write (three when the Flag is searched)."""
        targets = await self._post_targets(w)
        order = [k for k in ("Flag", "Communication") if k in targets.written]
        statuses = [targets.written[k][0] for k in order]
        locations = [targets.written[k][1] for k in order]
        bundle = provenance_transaction(w, targets.ids.get("Flag"), targets.ids.get("Communication"))
        if bundle is not None:
            answers = await self.client.transaction_answers(bundle["entry"])
            status = status_of(answers[0])
            if not status.startswith("2"):
                raise WriteRejected(f"server answered {status or 'nothing'} to an alert's Provenance")
            metrics.WRITES.labels("Provenance", "ok").inc()
            statuses.append(status)
            locations.append((answers[0].get("response") or {}).get("location"))
        return Delivery(statuses, locations, targets.ids)

    async def _post_targets(self, w: OutboxWrites) -> _Targets:
        """Write the Flag and the Communication until the server confirms both.

        An atomic server answers all or nothing (an error status raises, except 412: re-read). A
        batch server may answer mixed statuses: that is counted, and only the entries that failed
        are posted again (conditional creates and If-Match PUTs are safe to repeat), up to
        TARGET_ATTEMPTS requests. A Flag entry that failed is rebuilt from a fresh read (a 412 means
        it changed under us). Unconfirmed after that: WriteRejected, so no Provenance is posted and
        the write stays in the outbox for the next cycle."""
        comm_entry = communication_create(w)
        targets = _Targets()
        for attempt in range(TARGET_ATTEMPTS):
            entries, put_id = await self._pending_entries(w, comm_entry, targets.ids)
            if not entries:
                break
            try:
                answers = await self.client.transaction_answers(entries)
            except PreconditionFailed:
                # The Flag changed since we read it, or our own PUT, retried after a lost answer, was
                # applied: read it again.
                targets.failed = ["412"]
                self._flags.pop(flag_key(w), None)
                continue
            reasons = await self._take_answers(w, entries, answers, put_id, targets)
            if not await self._again(reasons, answers, entries, attempt):
                break
        if "Flag" not in targets.ids or (comm_entry is not None and "Communication" not in targets.ids):
            if targets.failed and all(s.startswith("412") for s in targets.failed):
                raise WriteRejected(f"Flag kept changing under us (412 {TARGET_ATTEMPTS} times)")
            raise WriteRejected(
                f"server answered {targets.failed} to an alert's Flag/Communication: no Provenance posted"
            )
        return targets

    async def _pending_entries(
        self, w: OutboxWrites, comm_entry: Entry | None, ids: dict[str, str]
    ) -> tuple[list[Entry], str | None]:
        """The entries still to write and the id of the Flag a PUT among them replaces."""
        entries: list[Entry] = []
        put_id: str | None = None
        if "Flag" not in ids:
            flag_entry, flag_id = await self._flag_entry(w)
            if flag_entry is None:
                assert flag_id is not None
                ids["Flag"] = flag_id  # unchanged: nothing to write
            else:
                entries.append(flag_entry)
                put_id = flag_id
        if comm_entry is not None and "Communication" not in ids:
            entries.append(comm_entry)
        return entries, put_id

    async def _take_answers(
        self,
        w: OutboxWrites,
        entries: list[Entry],
        answers: list[FhirJson],
        put_id: str | None,
        targets: _Targets,
    ) -> list[str | None]:
        """Record what the server confirmed; returns why each refused entry is transient (None: a
        refusal to keep)."""
        targets.failed = []
        reasons: list[str | None] = []
        for sent, answer in zip(entries, answers, strict=True):
            kind = sent["resource"]["resourceType"]
            result = answer.get("response") or {}
            status = status_of(answer)
            if not status.startswith("2"):
                targets.failed.append(status)
                reasons.append(transient_status(status, result.get("outcome")))
                metrics.WRITES.labels(kind, "failed").inc()
                if kind == "Flag":
                    self._flags.pop(flag_key(w), None)  # read it again before the next attempt
                continue
            identifier = w.flag_identifier if kind == "Flag" else w.communication_identifier
            assert identifier is not None  # (a Communication entry is sent only with its identifier)
            targets.ids[kind] = (
                put_id
                if kind == "Flag" and put_id is not None
                else answered_id(kind, result.get("location"), answer.get("resource"))
                or await self._find(kind, identifier)
            )
            targets.written[kind] = (status, result.get("location"))
            metrics.WRITES.labels(kind, "ok").inc()
            if kind == "Flag":
                self._remember(w, remembered(sent, targets.ids[kind], status, result, answer.get("resource")))
        return reasons

    @staticmethod
    async def _again(
        reasons: list[str | None], answers: list[FhirJson], entries: list[Entry], attempt: int
    ) -> bool:
        """Whether to post what failed again (after a backoff when the refusals are transient)."""
        if reasons and len(reasons) < len(entries):
            metrics.NONATOMIC_TRANSACTIONS.inc()
            log.warning(
                "transaction answered entry by entry (the server processes it as a batch): "
                "re-posting what failed",
                statuses=[status_of(a) for a in answers],
            )
        if reasons and all(reasons):
            # A refusal the server lifts once a concurrent write has committed (409, a
            # serialization failure) or an overload: back off before re-posting what failed,
            # within this cycle, rather than waiting a whole poll interval.
            for reason in reasons:
                metrics.FHIR_RETRIES.labels(reason).inc()
            await asyncio.sleep(random.uniform(0, ENTRY_BACKOFF_SECONDS * 2**attempt))
            return True
        return not reasons  # a refusal to keep: re-posting would only repeat it

    async def _find(self, kind: str, identifier: tuple[str, str]) -> str:
        """The server id of the one resource with `identifier`: for a 2xx answer without a usable
        location (a conditional create that found the resource may give none)."""
        found = await self.client.identified(kind, identifier)
        if len(found) != 1 or not isinstance(found[0].get("id"), str):
            raise WriteRejected(f"{kind} confirmed, but its identifier search found {len(found)}")
        return str(found[0]["id"])

    async def _flag_entry(self, w: OutboxWrites) -> tuple[Entry | None, str | None]:
        """The Flag's transaction entry and, when it is not conditionally created (a PUT, or none
        because it is unchanged), the server id of the existing Flag. The existing Flag is the one
        this writer last wrote or read when it remembers it (no request), else it is searched."""
        if w.event == "new":
            return flag_create(w), None
        known = self._flags.get(flag_key(w))
        if known is None:
            existing = await self.client.identified("Flag", w.flag_identifier)
            if not existing:
                return flag_create(w), None
            current = existing[0]
            known = KnownFlag(current["id"], str(current.get("meta", {}).get("versionId", "")), current)
            self._remember(w, known)
        return flag_update(w, known, self.base_url), known.id

    def _remember(self, w: OutboxWrites, known: KnownFlag | None) -> None:
        """Keep the episode's Flag as the server now holds it (None: unknown, forget it)."""
        key = flag_key(w)
        if known is None:
            self._flags.pop(key, None)
            return
        self._flags[key] = known
        self._flags.move_to_end(key)
        while len(self._flags) > KNOWN_FLAGS:
            self._flags.popitem(last=False)
