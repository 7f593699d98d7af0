"""The transaction Bundles of an alert write and the reading of their answers: pure, no I/O. The
live loop's writer (service/live/writer.py) sends them; what they say is FHIR's
(http.html#transaction, http.html#cond-update, http.html#concurrency).

A write (`outbox_writes`, stored in the outbox) is the Flag of an episode, perhaps a Communication,
and the Provenance of both. The Flag is conditionally created on its identifier, or, once the
server holds it, replaced with a versioned PUT (If-Match) when its content changed; the
Communication is conditionally created on its identifier; the Provenance is conditionally created
on its tag, alone and last, its targets the server ids confirmed for the Flag and the Communication.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from service.output.alerts import AlertWrites, outbox_fields, provenance_entry

Entry = dict[str, Any]  # a Bundle.entry as FHIR JSON
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True, slots=True)
class KnownFlag:
    """An episode's Flag as the server holds it after this process's last write or read of it."""

    id: str
    version: str
    flag: dict[str, Any]


def outbox_writes(writes: AlertWrites, event: str) -> dict[str, Any]:
    """A write as the outbox keeps it (plain JSON): what the Bundles below are built from."""
    return {
        "event": event,
        "flag": writes.flag,
        "communication": writes.communication,
        "flag_identifier": list(writes.flag_identifier),
        "communication_identifier": list(writes.communication_identifier)
        if writes.communication_identifier
        else None,
        **outbox_fields(writes),
    }


def flag_key(writes: dict[str, Any]) -> str:
    """The episode's Flag identifier (system|value): the key of the writer's known Flags."""
    return "|".join(writes["flag_identifier"])


def transaction(entries: list[Entry]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def conditional_create(resource: dict[str, Any], if_none_exist: str, full_url: str | None = None) -> Entry:
    entry: Entry = {"fullUrl": full_url} if full_url else {}
    return {
        **entry,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": if_none_exist},
    }


def flag_create(writes: dict[str, Any]) -> Entry:
    """The Flag's conditional create on its identifier."""
    return conditional_create(writes["flag"], "identifier=" + flag_key(writes), writes.get("flag_full_url"))


def flag_update(writes: dict[str, Any], known: KnownFlag, base_url: str) -> Entry | None:
    """The versioned PUT of the Flag the server holds (`known`), or None when it already says what
    the write says."""
    flag = writes["flag"]
    if same(known.flag, flag):
        return None
    return {
        "fullUrl": f"{base_url}/Flag/{known.id}",
        "resource": {**flag, "id": known.id},
        "request": {"method": "PUT", "url": f"Flag/{known.id}", "ifMatch": f'W/"{known.version}"'},
    }


def communication_create(writes: dict[str, Any]) -> Entry | None:
    """The Communication's conditional create on its identifier (None: the write updates the Flag only)."""
    communication = writes["communication"]
    if communication is None:
        return None
    return conditional_create(
        communication,
        "identifier=" + "|".join(writes["communication_identifier"]),
        writes.get("communication_full_url"),
    )


def provenance_transaction(
    writes: dict[str, Any], flag_id: str | None, communication_id: str | None
) -> dict[str, Any] | None:
    """The Provenance alone, its targets the confirmed server ids (None: a write stored before
    Provenance existed)."""
    entry = provenance_entry(writes, flag_id, communication_id)
    return None if entry is None else transaction([entry])


def same(existing: dict[str, Any], desired: dict[str, Any]) -> bool:
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


def answered_version(result: dict[str, Any], resource: Any) -> str | None:
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


def remembered(
    sent: Entry, flag_id: str, status: str, result: dict[str, Any], answered: Any
) -> KnownFlag | None:
    """The Flag as the server now holds it after `sent` was answered: the resource it answered, else
    what was sent when the server wrote it (a PUT, or a create answered 201; a conditional create
    answered 200 found a Flag whose content we do not know), with the version from the answer.
    None when either is unknown."""
    if (
        isinstance(answered, dict)
        and answered.get("resourceType") == "Flag"
        and answered.get("id") == flag_id
    ):
        content: dict[str, Any] | None = answered
    elif sent["request"]["method"] == "PUT" or status.startswith("201"):
        content = sent["resource"]
    else:
        content = None
    version = answered_version(result, answered)
    return None if content is None or version is None else KnownFlag(flag_id, version, content)
