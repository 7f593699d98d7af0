"""Reading FHIR JSON text into the model (service/fhir/model.py), damaged or not.

A line that does not fit the model is not dropped: `decode` says why, and a damaged document is
read entry by entry (`read`, below) so the damage stays with the entry that holds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import msgspec
import orjson

from service.fhir import jsonscan, tolerantjson
from service.fhir.model import (
    Entry,
    Link,
    Participant,
    Reference,
    Resource,
    Undecodable,
)

_decoder = msgspec.json.Decoder(Resource)

BOM = b"\xef\xbb\xbf"
NOT_UTF8 = "text is not valid UTF-8 (invalid bytes or an unpaired surrogate)"
TOO_DEEP = "invalid JSON: nested too deeply"
MAX_BUNDLE_NESTING = 2  # Bundles inside Bundles read on the salvage path (each level walks the text again)
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_WANTED = frozenset({"resourceType", "id", "subject", "link"})
_SMALL = 2048  # the longest member value read from a document that cannot be parsed


class Document(NamedTuple):
    """What one JSON document holds, however damaged.

    `items`: its resources (a Bundle's entries, flattened), each read or `Undecodable` with the
    reason; `complete`: the document's framing was intact, so every entry it holds is in `items`
    (False: truncated or broken; `items` holds the entries before the break and `remainder` says
    what was lost); `damage`: why a strict parse of the whole failed (None when it did not)."""

    items: list[Resource | Undecodable]
    resource_type: str | None
    links: list[Link]
    complete: bool = True
    damage: str | None = None
    remainder: Undecodable | None = None


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def clean_text(value: Any, limit: int = 256) -> str | None:
    """A short printable string (ids, references, codes), or None: never megabytes, never text
    that could not be encoded again (lone surrogates), never control characters."""
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
        return None
    return None if tolerantjson.has_surrogates(value) else value


def fhir_id(value: Any) -> str | None:
    """`value` when it is a FHIR id ([A-Za-z0-9-.]{1,64}), else None."""
    return value if isinstance(value, str) and _FHIR_ID.fullmatch(value) else None


def _undecodable(obj: Any, reason: str) -> Undecodable:
    if not isinstance(obj, dict):
        return Undecodable(reason)
    subject = obj.get("subject")
    return Undecodable(
        reason,
        resource_type=clean_text(obj.get("resourceType"), 64),
        id=fhir_id(obj.get("id")),
        subject=clean_text(subject.get("reference")) if isinstance(subject, dict) else None,
    )


def _from_object(obj: Any) -> Iterator[Resource | Undecodable]:
    """Convert one parsed JSON value; a Bundle is converted entry by entry so one bad entry
    does not take its neighbours with it."""
    if not isinstance(obj, dict):
        yield Undecodable(f"not a FHIR resource (a JSON {type(obj).__name__})")
        return
    if obj.get("resourceType") == "Bundle" and isinstance(obj.get("entry"), list):
        targets = _dict_targets(obj["entry"])
        for item in obj["entry"]:
            resource = item.get("resource") if isinstance(item, dict) else None
            if resource is not None:
                yield from _in_bundle(_from_object(resource), targets)
        return
    try:
        yield msgspec.convert(obj, Resource)
    except msgspec.ValidationError as err:
        yield _undecodable(obj, f"malformed: {_first_line(err)}")
    except RecursionError:
        yield _undecodable(obj, "malformed: nested too deeply")


def _in_bundle(
    items: Iterable[Resource | Undecodable], targets: Mapping[str, str]
) -> Iterator[Resource | Undecodable]:
    for item in items:
        yield localised(item, targets) if targets and isinstance(item, Resource) else item


def flatten(resource: Resource, targets: Mapping[str, str] | None = None) -> Iterator[Resource]:
    """A resource, or the resources of a Bundle (nested Bundles included), their references to
    other entries of their Bundle by fullUrl resolved (`localised`)."""
    if resource.resourceType == "Bundle":
        inner = {**(targets or {}), **bundle_targets((e.fullUrl, e.resource) for e in resource.entry or ())}
        for entry in resource.entry or ():
            if entry.resource is not None:
                yield from flatten(entry.resource, inner)
    else:
        yield localised(resource, targets) if targets else resource


# -- references inside a Bundle --------------------------------------------------------------------
#
# A transaction or collection Bundle (Synthea writes them) names its entries by fullUrl
# "urn:uuid:<uuid>" and its resources refer to each other by that fullUrl; such a reference
# resolves within the Bundle and nowhere else (https://hl7.org/fhir/R4/bundle.html#references).
# It is resolved here, while the Bundle is read, to the literal reference of the entry's resource
# ("Patient/<id>"; without an id, the uuid is the id), so a Synthea patient is one patient.

_URN = ("urn:uuid:", "urn:oid:")


def entry_target(full_url: Any, resource_type: Any, id: Any) -> tuple[str, str] | None:
    """(fullUrl, "Type/id") for an entry named by a urn: fullUrl, else None."""
    if not isinstance(full_url, str) or not full_url.startswith(_URN):
        return None
    if clean_text(resource_type, 64) is None:
        return None
    rid = fhir_id(id) or (fhir_id(full_url[len("urn:uuid:") :]) if full_url.startswith("urn:uuid:") else None)
    return (full_url, f"{resource_type}/{rid}") if rid is not None else None


def bundle_targets(entries: Iterable[tuple[str | None, Resource | None]]) -> dict[str, str]:
    found = (entry_target(url, r.resourceType, r.id) for url, r in entries if r is not None)
    return dict(t for t in found if t is not None)


def _dict_targets(entries: list[Any]) -> dict[str, str]:
    found = (
        entry_target(e.get("fullUrl"), e["resource"].get("resourceType"), e["resource"].get("id"))
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    )
    return dict(t for t in found if t is not None)


def _local(ref: Reference | None, targets: Mapping[str, str]) -> Reference | None:
    if ref is None or ref.reference is None or ref.reference not in targets:
        return ref
    return Reference(targets[ref.reference])


def _locals(refs: list[Reference] | None, targets: Mapping[str, str]) -> list[Reference] | None:
    return None if refs is None else [_local(r, targets) or r for r in refs]


def localised(resource: Resource, targets: Mapping[str, str]) -> Resource:
    """`resource` with its references to entries of its Bundle (by urn: fullUrl) made literal."""
    specimen = resource.specimen
    return msgspec.structs.replace(
        resource,
        subject=_local(resource.subject, targets),
        requester=_local(resource.requester, targets),
        specimen=_locals(specimen, targets) if isinstance(specimen, list) else _local(specimen, targets),
        basedOn=_locals(resource.basedOn, targets),
        result=_locals(resource.result, targets),
        hasMember=_locals(resource.hasMember, targets),
        participant=None
        if resource.participant is None
        else [Participant(_local(p.member, targets)) for p in resource.participant],
    )


def decode(data: bytes | str) -> Iterator[Resource | Undecodable]:
    """Decode one JSON document (an NDJSON line, a Bundle or a single resource). Never raises:
    what cannot be read is an `Undecodable` with the reason (and the id, when that much can be read)."""
    doc = read(data)
    yield from doc.items
    if doc.remainder is not None:
        yield doc.remainder


def convert(obj: Any) -> Iterator[Resource | Undecodable]:
    """The same as `decode` for JSON already parsed into Python objects."""
    yield from _from_object(obj)


# -- reading a document, damaged or not ----------------------------------------------------------
#
# 1. strict and typed (msgspec straight into `Resource`): the fast path, nearly always taken;
# 2. strict JSON, entry by entry (`msgspec.convert`): one entry of the wrong shape stays one
#    `Undecodable`;
# 3. tolerant (the salvage path): Python's json (`tolerantjson`), which reads NaN, Infinity and
#    1e999 (as floats that `observations.normalise` then rejects as not finite), with undecodable
#    bytes kept as lone surrogates so that the entry holding them, and only that one, is refused as
#    not UTF-8;
# 4. when even that fails (a syntax error, nesting deeper than a parser's stack): the document's
#    framing is walked (`jsonscan`, iterative) and each Bundle entry is read on its own through
#    1-4, so the damage stays inside the entry that holds it. A document whose framing itself is
#    truncated or broken yields the entries before the break and says so (`complete=False`).


def read(data: bytes | str) -> Document:
    if isinstance(data, str):
        text = data
        try:
            data = text.encode()
        except UnicodeEncodeError:
            return _read_text(text, 0)
    if data[:3] == BOM:  # some servers (and Windows tools) start UTF-8 with one
        data = data[3:]
    if data.isascii() or _is_utf8(data):
        try:
            resource = _decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            pass
        else:
            return Document(list(flatten(resource)), resource.resourceType, list(resource.link or ()))
        try:
            obj = orjson.loads(data)
        except (orjson.JSONDecodeError, RecursionError):
            pass
        else:
            return Document(list(_from_object(obj)), _type_of(obj), _links_of(obj))
    return _read_text(data.decode("utf-8", "surrogateescape"), 0)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _type_of(obj: Any) -> str | None:
    return clean_text(obj.get("resourceType"), 64) if isinstance(obj, dict) else None


def _links_of(obj: Any) -> list[Link]:
    links = obj.get("link") if isinstance(obj, dict) else None
    if not isinstance(links, list):
        return []
    out = []
    for link in links:
        if isinstance(link, dict):
            relation, url = link.get("relation"), link.get("url")
            out.append(Link(clean_text(relation, 64), clean_text(url, 8192)))
    return out


def _tolerant(obj: Any) -> Iterator[Resource | Undecodable]:
    """`_from_object` for what Python's json made of a document: the entry that holds text that
    was not UTF-8 is refused, its neighbours are read."""
    if isinstance(obj, dict) and obj.get("resourceType") == "Bundle" and isinstance(obj.get("entry"), list):
        targets = _dict_targets(obj["entry"])
        for item in obj["entry"]:
            resource = item.get("resource") if isinstance(item, dict) else None
            if resource is not None:
                yield from _in_bundle(_tolerant(resource), targets)
        return
    if tolerantjson.has_surrogates(obj):
        yield _undecodable(obj, NOT_UTF8)
        return
    yield from _from_object(obj)


def _read_text(text: str, nesting: int) -> Document:
    try:
        obj = tolerantjson.loads(text)
    except RecursionError:
        problem = "nested too deeply"
    except ValueError as err:  # json.JSONDecodeError included
        problem = _first_line(err)
    else:
        try:
            items = list(_tolerant(obj))
        except RecursionError:
            items = [_undecodable(obj, TOO_DEEP)]
        return Document(items, _type_of(obj), _links_of(obj), True, "not strict JSON")
    return _scan(text, problem, nesting)


def _small(text: str, span: tuple[int, int] | None) -> Any:
    if span is None or span[1] - span[0] > _SMALL:
        return None
    try:
        return tolerantjson.loads(text[span[0] : span[1]])
    except (ValueError, RecursionError):
        return None


def _scan(text: str, problem: str, nesting: int) -> Document:
    """The salvage of last resort: walk the framing, read each Bundle entry on its own."""
    damage = f"invalid JSON: {problem}"
    start = jsonscan.skip_ws(text, 0)
    if start >= len(text) or text[start] != "{":
        return Document([Undecodable(damage)], None, [], jsonscan.single_document(text), problem)
    scan = jsonscan.scan_object(text, start, _WANTED, "entry")
    resource_type = clean_text(_small(text, scan.spans.get("resourceType")), 64)
    if resource_type != "Bundle" or scan.entries is None:
        subject = _small(text, scan.spans.get("subject"))
        item = Undecodable(
            damage,
            resource_type,
            fhir_id(_small(text, scan.spans.get("id"))),
            clean_text(subject.get("reference")) if isinstance(subject, dict) else None,
        )
        return Document([item], resource_type, [], scan.broken is None, problem)
    items: list[Resource | Undecodable] = []
    for s, e in scan.entries:
        items.extend(_entry(text, s, e, nesting))
    link = scan.spans.get("link")
    links = _links_of({"link": _loads_or_none(text[link[0] : link[1]])}) if link is not None else []
    remainder = None
    if scan.broken is not None:
        remainder = Undecodable(f"invalid JSON: Bundle {scan.broken.what} after {len(scan.entries)} entries")
    return Document(items, "Bundle", links, scan.broken is None, problem, remainder)


def _loads_or_none(text: str) -> Any:
    try:
        return tolerantjson.loads(text)
    except (ValueError, RecursionError):
        return None


def _entry(text: str, start: int, end: int, nesting: int) -> list[Resource | Undecodable]:
    """The resource of one Bundle entry (`text[start:end]`), read on its own."""
    if text[start] != "{":
        return []  # not an entry object: nothing in it (as `_from_object` skips it)
    try:
        spans = jsonscan.object_members(text, start, frozenset({"resource"}))
    except jsonscan.Broken:
        return [Undecodable("invalid JSON: malformed Bundle entry")]
    span = spans.get("resource")
    if span is None:
        return []
    piece = text[span[0] : span[1]]
    try:
        data: bytes | None = piece.encode()
    except UnicodeEncodeError:  # undecodable bytes in it
        data = None
    if data is not None:
        try:
            return list(flatten(_decoder.decode(data)))
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            pass
        try:
            return list(_from_object(orjson.loads(data)))
        except (orjson.JSONDecodeError, RecursionError):
            pass
    if nesting >= MAX_BUNDLE_NESTING:
        return [Undecodable("invalid JSON: Bundles nested too deeply")]
    doc = _read_text(piece, nesting + 1)
    return doc.items + ([doc.remainder] if doc.remainder is not None else [])


# -- a Bundle read entry by entry ----------------------------------------------------------------
#
# `read` of a whole Bundle takes one of four paths (typed, strict, tolerant, framing), and the path
# decides how each entry is read. A Bundle too large to hold is walked twice instead
# (`jsonscan.scan_stream`): the first walk tells, from its parts, which path `read` of the whole
# would take (`Checks`), the second reads each entry as that path reads it (`entry_items`). The
# same items come out, one entry in memory at a time.

TYPED, STRICT, TOLERANT, FRAMING = "typed", "strict", "tolerant", "framing"
_entry_decoder = msgspec.json.Decoder(Entry)


class Checks(msgspec.Struct):
    """What `read` of the whole would find, gathered part by part (every top-level member and
    every entry: the whole is valid exactly when each of its parts is, its framing being sound)."""

    utf8: bool = True  # every byte sequence valid UTF-8
    typed: bool = True  # the typed decoder takes every part
    strict: bool = True  # orjson takes every part
    tolerant: bool = True  # Python's json takes every part

    def add(self, data: bytes, typed: msgspec.json.Decoder[Any], strict: bool = False) -> None:
        if self.utf8 and not (data.isascii() or _is_utf8(data)):
            self.utf8 = False
        if self.typed:
            try:
                typed.decode(data)
            except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
                self.typed = False
        if strict:  # orjson read it already
            return
        try:
            orjson.loads(data)
        except (orjson.JSONDecodeError, RecursionError):
            self.strict = False
            if self.tolerant:
                try:
                    tolerantjson.loads(data.decode("utf-8", "surrogateescape"))
                except (ValueError, RecursionError):
                    self.tolerant = False

    def add_entry(self, data: bytes, strict: bool = False) -> None:
        self.add(data, _entry_decoder, strict)

    def add_members(self, members: list[tuple[bytes, bytes]]) -> None:
        """The Bundle's members but "entry", as one object (keys hold no escapes: the caller checks)."""
        self.add(b"{" + b",".join(b'"' + key + b'":' + value for key, value in members) + b"}", _decoder)

    def path(self, complete: bool) -> str:
        """The path `read` takes for the whole: typed and strict need UTF-8 and (like tolerant)
        a whole document; a document cut short is read by its framing."""
        if not complete:
            return FRAMING
        if self.utf8 and self.typed:
            return TYPED
        if self.utf8 and self.strict:
            return STRICT
        return TOLERANT if self.tolerant else FRAMING


def entry_items(
    data: bytes, path: str, targets: Mapping[str, str] | None = None
) -> list[Resource | Undecodable]:
    """The resources of one Bundle entry (its JSON text), read as `read` of the whole Bundle reads
    each entry on `path`; `targets`: the Bundle's `bundle_targets` (`streamed_target` of each entry)."""
    items = _entry_items(data, path)
    return list(_in_bundle(items, targets)) if targets and path != FRAMING else items


class _EntryHead(msgspec.Struct, gc=False):
    resourceType: Any = None
    id: Any = None


class _Head(msgspec.Struct, gc=False):
    fullUrl: Any = None
    resource: _EntryHead | None = None


_head_decoder = msgspec.json.Decoder(_Head)


def streamed_target(data: bytes) -> tuple[str, str] | None:
    """`entry_target` of one Bundle entry's JSON text (None when it cannot be read)."""
    try:
        head = _head_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    return entry_target(head.fullUrl, head.resource.resourceType, head.resource.id) if head.resource else None


def _entry_items(data: bytes, path: str) -> list[Resource | Undecodable]:
    if path == TYPED:
        entry = _entry_decoder.decode(data)
        return list(flatten(entry.resource)) if entry.resource is not None else []
    if path == FRAMING:
        return _entry(data.decode("utf-8", "surrogateescape"), 0, len(data), 0)
    item = (
        orjson.loads(data) if path == STRICT else tolerantjson.loads(data.decode("utf-8", "surrogateescape"))
    )
    resource = item.get("resource") if isinstance(item, dict) else None
    if resource is None:
        return []
    if path == STRICT:
        return list(_from_object(resource))
    try:
        return list(_tolerant(resource))
    except RecursionError:  # `read` of the whole gives one such item for the document
        return [_undecodable(resource, TOO_DEEP)]


def cut_short(entries: int) -> Undecodable:
    """The remainder of a Bundle whose framing ends early after `entries` entries (as `_scan`)."""
    return Undecodable(f"invalid JSON: Bundle truncated after {entries} entries")
