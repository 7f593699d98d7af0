"""The JSON bodies of FHIR responses as plain dicts: a resource read, the answer to a write, a Bundle
with its entries and its next link. A body cut short is raised as `Retry` (a transfer problem); a
whole body that only a tolerant parser reads is read so."""

from __future__ import annotations

from typing import Any

import orjson
import structlog

from service.fhir import jsonscan, model, raw, tolerantjson
from service.fhir.errors import FhirError
from service.fhir.model import FhirJson
from service.fhir.transport import RESOURCE_TYPE, Response, Retry

__all__ = ["bundle_object", "entry_resources", "json_object", "next_link", "optional_object"]

log = structlog.get_logger("neutrowatch.fhir")


def next_link(links: Any) -> str | None:
    """The URL of Bundle.link[next] (links as read by `raw`, or as dicts), or None."""
    for link in links or ():
        relation, url = (
            (link.relation, link.url)
            if isinstance(link, model.Link)
            else ((link.get("relation"), link.get("url")) if isinstance(link, dict) else (None, None))
        )
        if relation == "next" and isinstance(url, str) and url:
            return url
    return None


def json_object(response: Response) -> FhirJson:
    """The body of a GET as a dict. Strict JSON first; a whole document that only a tolerant parser
    reads (NaN, bytes that are not UTF-8 — replaced by U+FFFD here, nothing in these bodies is a
    number we assess) is read so; a truncated or broken body is retryable (a transfer cut short)."""
    try:
        doc = orjson.loads(response.body)
    except (orjson.JSONDecodeError, RecursionError):
        doc = _tolerant_object(response)
    if not isinstance(doc, dict):
        raise FhirError(f"HTTP {response.status} body is not a FHIR resource")
    return doc


def _tolerant_object(response: Response) -> Any:
    text = response.body.removeprefix(raw.BOM).decode("utf-8", "replace")
    if not jsonscan.single_document(text):
        raise Retry("invalid_json", ambiguous=False, response=response)
    try:
        return _scrubbed(tolerantjson.loads(text))
    except RecursionError:
        raise FhirError(f"HTTP {response.status} body is nested too deeply to read") from None
    except ValueError:
        raise FhirError(f"HTTP {response.status} body is not JSON") from None


def _scrubbed(value: Any) -> Any:
    """Lone surrogates (unpaired \\ud800 escapes) replaced, so nothing read can fail to encode later."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode() if not value.isascii() else value
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {_scrubbed(k): _scrubbed(v) for k, v in value.items()}
    return value


def optional_object(response: Response) -> FhirJson | None:
    """The body of a write: None when empty (return=minimal) or unreadable (the write happened)."""
    try:
        doc = orjson.loads(response.body) if response.body.strip() else None
    except (orjson.JSONDecodeError, RecursionError):
        log.warning("fhir_unreadable_write_response", status=response.status)
        return None
    return doc if isinstance(doc, dict) else None


def bundle_object(response: Response) -> tuple[FhirJson, str | None]:
    """A Bundle (a search or history page) as a dict, with its next link."""
    doc = json_object(response)
    if doc.get("resourceType") != "Bundle":
        shown = doc.get("resourceType")
        raise FhirError(
            "search answered with "
            f"{shown if isinstance(shown, str) and RESOURCE_TYPE.match(shown) else 'something else'}, "
            "not a Bundle"
        )
    return doc, next_link(doc.get("link"))


def entry_resources(bundle: FhirJson) -> list[FhirJson]:
    """The entry resources of a Bundle (match and include entries; search.mode=outcome left out)."""
    found = []
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        search = entry.get("search") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and not (isinstance(search, dict) and search.get("mode") == "outcome"):
            found.append(resource)
    return found
