"""One canonical spelling of a literal reference: the identity of what it names.

FHIR lets one resource be referenced several ways (https://hl7.org/fhir/R4/references.html#literal):
relative ("Patient/123", relative to the service base URL), absolute ("https://server/fhir/Patient/123"),
either with "/_history/2" (a version-specific reference to the same resource). Keyed as written, one
patient became several: several episodes and several Flags, of which only one learned of recovery.

Here a reference on the server the service reads (relative, or absolute under its base URL) becomes
"Type/id", with any version dropped. An absolute reference on another server names a resource
there, about which the local server knows nothing: its local namesake ("Patient/x" for
"https://elsewhere/Patient/x") is another patient, whose age and conditions must never grade this
one. Such a reference is refused, unless the site lists that server's base as an accepted foreign
base (a federated setup): then the absolute reference, without its version and with its base
normalised, is the identity, and nothing is looked up locally for it. A contained reference ("#p1")
names a resource inside the one that refers to it and "urn:uuid:"/"urn:oid:" one inside a Bundle
being processed (https://hl7.org/fhir/R4/bundle.html#references): neither names a resource the
service can find, so neither is an identity.

Bases match after normalising what URLs do not distinguish (RFC 3986 §6.2.2.1 and §6.2.3: the case
of scheme and host, the scheme's default port) and a trailing slash; http and https stay two bases.
Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

MAX_REFERENCE = 512  # longer is not a reference (it is logged and stored as a key)
# The literal reference grammar of the FHIR specification (references.html#literal, Reference.reference
# regex), with the base's characters bounded: [base/]Type/id[/_history/version].
_LITERAL = re.compile(
    r"(?:(?P<base>(?i:https?)://[!-~]{1,400}?)/)?(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?"
)
_BASE = re.compile(r"(?i:(https?))://([^/?#\s]+)(/[^?#\s]*)?")
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


@dataclass(frozen=True, slots=True)
class Resolved:
    """A reference the service may use, in its canonical spelling."""

    key: str  # "Type/id" on the service's server; "<normalised base>/Type/id" on an accepted foreign one
    resource_type: str
    id: str
    foreign: bool  # on an accepted foreign server: nothing about it may be read from the local one

    @property
    def local_id(self) -> str | None:
        """The id to read on the service's own server; None for a foreign resource."""
        return None if self.foreign else self.id


@functools.lru_cache(maxsize=1024)
def base_key(url: str) -> str | None:
    """A base URL in the form in which two spellings of one base are equal: scheme and host in lower
    case, no default port, no trailing slash (the path keeps its case: RFC 3986 §6.2.2.1). None when
    it is not an http(s) URL without query or fragment."""
    m = _BASE.fullmatch(url.strip())
    if m is None:
        return None
    scheme, authority = m[1].lower(), m[2].lower()
    authority = authority.removesuffix(_DEFAULT_PORTS[scheme])
    if not authority or authority.startswith(":"):
        return None
    return f"{scheme}://{authority}{(m[3] or '').rstrip('/')}"


def parse(ref: str | None) -> tuple[str | None, str, str] | None:
    """(base as written or None, type, id) of a literal reference, its version dropped; None when
    `ref` is not one (free text, too long, contained, urn:)."""
    if not ref or len(ref) > MAX_REFERENCE:
        return None
    m = _LITERAL.fullmatch(ref)
    return (m["base"], m["type"], m["id"]) if m is not None else None


def resolve(
    ref: str | None,
    resource_type: str | None,
    base_url: str | None = None,
    accepted_foreign_bases: tuple[str, ...] = (),
) -> Resolved | str:
    """The canonical reference, or why `ref` names nothing the service may use: a phrase that
    follows the element's name ("subject " + reason) and never repeats the reference's text.
    `resource_type`: the type the element must name (None: any). `base_url`: the base of the server
    the resource was read from (replay: fhir.base_url, when configured; None: every absolute
    reference is foreign). `accepted_foreign_bases`: other servers whose references are identities."""
    if not ref or len(ref) > MAX_REFERENCE:  # (never a megabyte key in the cache)
        return _not_a(resource_type)
    return _resolve(ref, resource_type, base_url, accepted_foreign_bases)


def _not_a(resource_type: str | None) -> str:
    return f"is not a {resource_type} reference" if resource_type else "is not a literal reference"


_UNRESOLVABLE = {
    "#": "is a contained reference, which names no resource on the server",
    "urn:uuid:": "is a urn:uuid: reference, which names no resource on the server",
    "urn:oid:": "is a urn:oid: reference, which names no resource on the server",
}


@functools.lru_cache(maxsize=16384)  # subjects repeat (every result of a patient names it)
def _resolve(
    ref: str, resource_type: str | None, base_url: str | None, accepted: tuple[str, ...]
) -> Resolved | str:
    parsed = parse(ref)
    if parsed is None:
        head = ref[:9].lower()
        return next(
            (why for prefix, why in _UNRESOLVABLE.items() if head.startswith(prefix)), _not_a(resource_type)
        )
    base, rtype, rid = parsed
    if resource_type is not None and rtype != resource_type:
        return _not_a(resource_type)
    if base is None:
        return Resolved(f"{rtype}/{rid}", rtype, rid, False)
    key = base_key(base)
    if key is None:
        return _not_a(resource_type)
    if base_url and key == base_key(base_url):
        return Resolved(f"{rtype}/{rid}", rtype, rid, False)
    if any(key == base_key(b) for b in accepted):
        return Resolved(f"{key}/{rtype}/{rid}", rtype, rid, True)
    return "is on another server"


def patient_reference(ref: str | None) -> str | None:
    """The reference as given when it has the form of a literal reference to a Patient (relative or
    absolute, optionally versioned), else None: never free text, never megabytes. For carrying a
    subject along (an entry the client could not use: `undecodable_rejection` resolves it); the
    patient's identity is the canonical reference (`canonical_reference`, as service/core/observations.py
    resolves a subject)."""
    parsed = parse(ref)
    return ref if parsed is not None and parsed[1] == "Patient" else None
