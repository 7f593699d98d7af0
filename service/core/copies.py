"""Several copies of one Observation: which one is its version, which are held back (with a reason).

The rule replay (`replay.rows.settle`, both engines) and the live stores (`store.base.plan`) share
through `core.arrival.rule`, so that what is in force never depends on the order the copies were read in:

- Copies with the same (meta.lastUpdated, numeric versionId) are copies of one version. A FHIR
  version is immutable (meta.versionId "changes each time the content of the resource changes",
  https://hl7.org/fhir/R4/resource.html#Meta), so copies that read alike are one version read
  twice, and copies that do not are a server or interface fault: which content is right cannot be
  told, and taking the first one read would make an alert, or its absence, depend on read order.
  So none is used: every distinct content is held back as CONFLICT, the version stands as a
  rejected version (it still supersedes older versions, so what rested on them is withdrawn as on
  any correction to an unusable version), and a newer version supersedes it as usual.
- A copy with neither meta.lastUpdated nor a numeric versionId cannot be ordered among versions that
  have them: once such a version of its Observation is read, it is no version of it (UNPLACED) and
  changes nothing. A rejected copy without them (an undecodable entry) is never a version: nothing
  of it is usable, and it may be a damaged re-send of the very version read.

"Alike" is the normalised content (`content_key` of the msgpack of the LabResult or Rejected): key
order, whitespace, number spelling or narrative make no difference, a value, unit, code, subject,
status, specimen or time does. Pure: plain data in, verdicts out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.core.observations import LabResult, Rejected

UNPLACED = (
    "copy that cannot be ordered among the versions read of this Observation "
    "(no lastUpdated, no numeric versionId): no version of it, changes nothing"
)

T = TypeVar("T")


def content_key(encoded: bytes) -> bytes:
    """What copies are compared (and conflicting ones ordered) by: 16 bytes of SHA-256 of the
    msgpack of the normalised outcome (`store.base.digest` prefixes it with a release tag)."""
    return hashlib.sha256(encoded).digest()[:16]


def stamped(updated_us: int, version: int) -> bool:
    """Whether a copy can be ordered among versions: it has meta.lastUpdated or a numeric versionId
    (-1: absent)."""
    return updated_us >= 0 or version >= 0


def placed(updated_us: int, version: int, rejected: bool, stamped_read: bool) -> bool:
    """Whether a copy can be a version of its Observation. `stamped_read`: a copy of that
    Observation that is `stamped` was read (in the same input, or stored)."""
    return stamped(updated_us, version) or not (rejected or stamped_read)


def unplaced_rejection(outcome: LabResult | Rejected) -> Rejected:
    """What a copy that is no version (not `placed`) is reported as: a rejected one keeps its own
    reason; a readable one is UNPLACED."""
    if isinstance(outcome, Rejected):
        return outcome
    return Rejected(
        UNPLACED,
        outcome.ref,
        outcome.version,
        outcome.patient,
        outcome.code,
        outcome.effective,
        outcome.updated_us,
    )


@dataclass(frozen=True, slots=True)
class Verdict(Generic[T]):
    """What the copies of one version come to (`one_version`), each as (content key, copy)."""

    kept: tuple[bytes, T] | None  # the copy that is the version (all copies read alike); None: they conflict
    conflicting: tuple[
        tuple[bytes, T], ...
    ]  # when they conflict: one copy per distinct content, by content key
    duplicates: tuple[tuple[bytes, T], ...]  # the rest: a content already represented (read again)


def one_version(copies: Sequence[tuple[bytes, T]]) -> Verdict[T]:
    """`copies`: (content key, copy) of one version, the first read first. The same verdict, up to
    which of two alike copies represents them, for every order of `copies`."""
    if len(copies) == 1:
        return Verdict(copies[0], (), ())
    firsts: dict[bytes, tuple[bytes, T]] = {}
    duplicates: list[tuple[bytes, T]] = []
    for pair in copies:
        if pair[0] in firsts:
            duplicates.append(pair)
        else:
            firsts[pair[0]] = pair
    if len(firsts) == 1:
        return Verdict(next(iter(firsts.values())), (), tuple(duplicates))
    return Verdict(None, tuple(firsts[k] for k in sorted(firsts)), tuple(duplicates))


def distinct(copies: Sequence[tuple[bytes, T]]) -> tuple[list[tuple[bytes, T]], int]:
    """(one copy per distinct content, by content key; how many others): how copies that are no
    version are reported, once per content."""
    verdict = one_version(copies)
    firsts = [verdict.kept] if verdict.kept is not None else list(verdict.conflicting)
    return firsts, len(verdict.duplicates)
