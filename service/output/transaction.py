"""The transaction Bundles of an alert write and the reading of their answers: pure, no I/O. The
live loop's writer (service/live/writer.py) sends them; what they say is FHIR's
(http.html#transaction, http.html#cond-update, http.html#concurrency).

A write (`OutboxWrites`, stored in the outbox) is the Flag of an episode, perhaps a Communication,
and the Provenance of both. The Flag is conditionally created on its identifier, or, once the
server holds it, replaced with a versioned PUT (If-Match) when its content changed; the
Communication is conditionally created on its identifier; the Provenance is conditionally created
on its tag, alone and last, its targets the server ids confirmed for the Flag and the Communication.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from service.fhir.model import FhirJson
from service.output.alerts import AlertWrites
from service.output.events import Decision

Entry = FhirJson  # a Bundle.entry
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True, slots=True)
class KnownFlag:
    """An episode's Flag as the server holds it after this process's last write or read of it."""

    id: str
    version: str
    flag: FhirJson


class OutboxWrites(msgspec.Struct, frozen=True, kw_only=True):
    """A write as the outbox keeps it (the store's `writes` column, JSON in this field order): what
    the Bundles below are built from. The fullUrls and the Provenance are None in a write stored
    before Provenance existed: it posts its Flag and Communication without one."""

    event: str  # the decision's event kind (`new` creates the Flag, any other updates it)
    flag: FhirJson
    communication: FhirJson | None  # None: the event updates the Flag only
    flag_identifier: tuple[str, str]  # (system, value): the conditional-create key
    communication_identifier: tuple[str, str] | None
    flag_full_url: str | None = None
    communication_full_url: str | None = None
    provenance: FhirJson | None = None  # targets the Flag and Communication by their fullUrls
    provenance_tag: tuple[str, str] | None = None  # (system, code): its conditional-create key (_tag)
    provenance_full_url: str | None = None


class Delivery(msgspec.Struct, frozen=True):
    """What the server answered to a write, kept with the outbox row once it is confirmed: each
    entry's status and location (the Flag, the Communication, the Provenance, those written), and
    the server id of each confirmed target by resource type."""

    statuses: list[str]
    locations: list[str | None]
    ids: dict[str, str]


decode_outbox_writes = msgspec.json.Decoder(OutboxWrites).decode  # a stored write read back whole


StoredRecord = tuple[Decision, OutboxWrites | None]  # a decision record, with its outbox write if an alert


def outbox_writes(writes: AlertWrites, event: str) -> OutboxWrites:
    """A write as the outbox keeps it."""
    return OutboxWrites(
        event=event,
        flag=writes.flag,
        communication=writes.communication,
        flag_identifier=writes.flag_identifier,
        communication_identifier=writes.communication_identifier,
        flag_full_url=writes.flag_full_url,
        communication_full_url=writes.communication_full_url,
        provenance=writes.provenance,
        provenance_tag=writes.provenance_tag,
        provenance_full_url=writes.provenance_full_url,
    )


def flag_key(writes: OutboxWrites) -> str:
    """The episode's Flag identifier (system|value): the key of the writer's known Flags."""
    return "|".join(writes.flag_identifier)


def transaction(entries: list[Entry]) -> FhirJson:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def conditional_create(resource: FhirJson, if_none_exist: str, full_url: str | None = None) -> Entry:
    entry: Entry = {"fullUrl": full_url} if full_url else {}
    return {
        **entry,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": if_none_exist},
    }


def flag_create(writes: OutboxWrites) -> Entry:
    """The Flag's conditional create on its identifier."""
    return conditional_create(writes.flag, "identifier=" + flag_key(writes), writes.flag_full_url)


def flag_update(writes: OutboxWrites, known: KnownFlag, base_url: str) -> Entry | None:
    """The versioned PUT of the Flag the server holds (`known`), or None when it already says what
    the write says."""
    flag = writes.flag
    if same(known.flag, flag):
        return None
    return {
        "fullUrl": f"{base_url}/Flag/{known.id}",
        "resource": {**flag, "id": known.id},
        "request": {"method": "PUT", "url": f"Flag/{known.id}", "ifMatch": f'W/"{known.version}"'},
    }


def communication_create(writes: OutboxWrites) -> Entry | None:
    """The Communication's conditional create on its identifier (None: the write updates the Flag only)."""
    communication = writes.communication
    if communication is None or writes.communication_identifier is None:
        return None
    return conditional_create(
        communication,
        "identifier=" + "|".join(writes.communication_identifier),
        writes.communication_full_url,
    )


def provenance_entry(
    writes: OutboxWrites, flag_id: str | None = None, communication_id: str | None = None
) -> Entry | None:
    """The transaction entry of a write's Provenance, or None for a write stored before Provenance
    existed: a conditional create on its tag, so a re-post finds it. `flag_id` / `communication_id`:
    the server ids of the Flag and the Communication; each given target then references `Type/<id>`
    instead of its urn:uuid fullUrl. The live loop posts the Provenance alone, after the server has
    confirmed both targets, and always gives both ids: a server that processes a transaction as a
    batch keeps a Provenance whose target's entry failed, with the id it had reserved for it
    (service/live/writer.py)."""
    provenance = writes.provenance
    if not provenance or writes.provenance_tag is None:
        return None
    ids = {
        writes.flag_full_url: f"Flag/{flag_id}" if flag_id is not None else None,
        writes.communication_full_url: f"Communication/{communication_id}"
        if communication_id is not None
        else None,
    }
    provenance = {
        **provenance,
        "target": [
            {**t, "reference": ids[t.get("reference")]} if ids.get(t.get("reference")) else t
            for t in provenance["target"]
        ],
    }
    system, code = writes.provenance_tag
    return {
        "fullUrl": writes.provenance_full_url,
        "resource": provenance,
        "request": {"method": "POST", "url": "Provenance", "ifNoneExist": f"_tag={system}|{code}"},
    }


def provenance_transaction(
    writes: OutboxWrites, flag_id: str | None, communication_id: str | None
) -> FhirJson | None:
    """The Provenance alone, its targets the confirmed server ids (None: a write stored before
    Provenance existed)."""
    entry = provenance_entry(writes, flag_id, communication_id)
    return None if entry is None else transaction([entry])


def same(existing: FhirJson, desired: FhirJson) -> bool:
    """The server's resource says what `desired` says. `meta` is compared by its profiles only: the
    server adds versionId and lastUpdated."""
    for key, value in desired.items():
        if key == "meta":
            if (existing.get("meta") or {}).get("profile") != (value or {}).get("profile"):
                return False
        elif existing.get(key) != value:
            return False
    return True


def status_of(answer: Any) -> str:
    """A transaction answer entry's response.status ("" when it names none)."""
    response = answer.get("response") if isinstance(answer, dict) else None
    return str((response or {}).get("status", ""))


def answered_version(result: FhirJson, resource: Any) -> str | None:
    """The version a transaction entry wrote: response.etag (W/"v"), the location's `_history/v`,
    or the answered resource's meta.versionId."""
    etag = result.get("etag")
    if isinstance(etag, str) and etag.strip():
        return etag.strip().removeprefix("W/").strip('"') or None
    location = result.get("location")
    if isinstance(location, str) and "/_history/" in location:
        vid = location.split("?", 1)[0].rsplit("/_history/", 1)[1].strip("/")
        if _FHIR_ID.match(vid):
            return vid
    meta = resource.get("meta") if isinstance(resource, dict) else None
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return version if isinstance(version, str) and version else None


def answered_id(kind: str, location: Any, resource: Any) -> str | None:
    """The server id of a `kind` written by a transaction entry: from its response.location
    (`Type/id`, `Type/id/_history/vid`, relative or absolute: FHIR http.html#transaction-response),
    else from the resource returned with it; None when neither names one."""
    if isinstance(location, str):
        segments = location.split("?", 1)[0].split("#", 1)[0].rstrip("/").split("/")
        if "_history" in segments[-2:]:
            segments = segments[: segments.index("_history", max(len(segments) - 2, 0))]
        if len(segments) >= 2 and segments[-2] == kind and _FHIR_ID.match(segments[-1]):
            return segments[-1]
    if (
        isinstance(resource, dict)
        and resource.get("resourceType") == kind
        and isinstance(resource.get("id"), str)
        and _FHIR_ID.match(resource["id"])
    ):
        return str(resource["id"])
    return None


def remembered(sent: Entry, flag_id: str, status: str, result: FhirJson, answered: Any) -> KnownFlag | None:
    """The Flag as the server now holds it after `sent` was answered: the resource it answered, else
    what was sent when the server wrote it (a PUT, or a create answered 201; a conditional create
    answered 200 found a Flag whose content we do not know), with the version from the answer.
    None when either is unknown."""
    if (
        isinstance(answered, dict)
        and answered.get("resourceType") == "Flag"
        and answered.get("id") == flag_id
    ):
        content: FhirJson | None = answered
    elif sent["request"]["method"] == "PUT" or status.startswith("201"):
        content = sent["resource"]
    else:
        content = None
    version = answered_version(result, answered)
    return None if content is None or version is None else KnownFlag(flag_id, version, content)
