"""Arrival of Observation copies: what a copy read means next to the other copies of its Observation
(and, in the live stores, next to the version already stored), in what order versions become
available, and which panel an Observation belongs to.

One implementation for replay (`replay.rows.settle`, both engines) and the live stores
(`store.base.plan`): they differ only in what they keep of the ruling (replay every version, a
store the newest) and in how they store it. The rule for copies of one version is `copies`'s
(`one_version`, `distinct`, `placed`); this module applies it to every copy of one Observation:

- copies that are a version (`placed`) are grouped by (meta.lastUpdated, numeric versionId) and
  ruled oldest version first; a version older than the stored one changes nothing, and so does the
  stored one read again alike; copies of it that do not read alike make it a conflict;
- copies that are no version are ruled once per content (`distinct`).

Pure: plain data in, rulings out.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.core.copies import Verdict, distinct, one_version, placed, stamped

T = TypeVar("T")
Stamp = tuple[int, int]  # (meta.lastUpdated in µs, numeric versionId); -1: absent


@dataclass(frozen=True, slots=True)
class Copy(Generic[T]):
    """One copy read of an Observation, as the rule sees it; `item` is the caller's (an input row,
    a store's Intake); None: the stored copy."""

    updated_us: int
    version: int
    content: bytes  # `copies.content_key` of the normalised outcome (or a store's digest of it)
    rejected: bool
    item: T

    @property
    def stamp(self) -> Stamp:
        return (self.updated_us, self.version)


@dataclass(frozen=True, slots=True)
class Stored:
    """The version of the Observation a live store holds, as `rule` compares a copy with it."""

    updated_us: int
    version: int
    content: bytes | None  # None: it cannot be compared (no digest, or one of another release)
    conflicted: bool  # its copies conflicted: no content is in force, every further copy conflicts

    @property
    def stamp(self) -> Stamp:
        return (self.updated_us, self.version)


@dataclass(frozen=True, slots=True)
class VersionRuling(Generic[T]):
    """What the copies read of one version come to.

    `kept`: the copy that is the version (all read alike). Otherwise the version is a conflict:
    `conflicting` holds one copy per distinct content, by content key (item None: the stored
    copy, taken before the other was seen), and `new` says whether the conflict is a new version
    (False: further copies of a stored version that conflicted already, held back only)."""

    stamp: Stamp
    copies: tuple[Copy[T], ...]  # the copies read of it, in reading order
    kept: Copy[T] | None
    conflicting: tuple[Copy[T] | Copy[None], ...] = ()
    new: bool = True


@dataclass
class Ruling(Generic[T]):
    """What the copies of one Observation come to (`rule`)."""

    versions: list[VersionRuling[T]] = field(default_factory=list)  # newer than the stored one, oldest first
    unplaced: list[Copy[T]] = field(default_factory=list)  # no version: one copy per distinct content
    unplaced_read: list[Copy[T]] = field(default_factory=list)  # every copy that is no version, as read
    duplicates: int = 0  # copies that are a content already read (of a version, or of no version)


def rule(copies: Sequence[Copy[T]], stored: Stored | None = None) -> Ruling[T]:
    """The copies read of one Observation (`copies`, in reading order), next to the version stored
    (`stored`; None: none, as in replay, which reads every copy at once). The same ruling, up to
    which of two alike copies represents them, for every order of `copies`."""
    if len(copies) == 1 and stamped(*copies[0].stamp) and (stored is None or _other(copies[0].stamp, stored)):
        if stored is not None and stored.stamp > copies[0].stamp:  # the common case, the rule below in short
            return Ruling()
        return Ruling([VersionRuling(copies[0].stamp, (copies[0],), copies[0])])
    stamped_read = (stored is not None and stamped(*stored.stamp)) or any(stamped(*c.stamp) for c in copies)
    groups: dict[Stamp, list[Copy[T]]] = {}
    unplaced: list[Copy[T]] = []
    for copy in copies:
        if placed(copy.updated_us, copy.version, copy.rejected, stamped_read):
            groups.setdefault(copy.stamp, []).append(copy)
        else:
            unplaced.append(copy)
    out: Ruling[T] = Ruling()
    if unplaced:
        firsts, again = distinct([(c.content, c) for c in unplaced])
        out.unplaced = [c for _content, c in firsts]
        out.unplaced_read, out.duplicates = unplaced, again
    for stamp in sorted(groups):
        ruling = _version(stamp, tuple(groups[stamp]), stored, out)
        if ruling is not None:
            out.versions.append(ruling)
    return out


def _other(stamp: Stamp, stored: Stored) -> bool:
    """A stamped stored version of another stamp than the copy's: the two are told apart by stamps alone."""
    return stamped(*stored.stamp) and stamp != stored.stamp


def _version(
    stamp: Stamp, group: tuple[Copy[T], ...], stored: Stored | None, out: Ruling[T]
) -> VersionRuling[T] | None:
    """The copies of one version; None: they change nothing (older than the stored version, or it
    read again alike, or a stored version they cannot be compared with)."""
    if stored is not None and stamp < stored.stamp:
        return None
    if stored is not None and stamp == stored.stamp:
        if stored.content is None:
            return None
        if stored.conflicted:
            firsts, again = distinct([(c.content, c) for c in group])
            out.duplicates += again
            return VersionRuling(stamp, group, None, tuple(c for _content, c in firsts), new=False)
        as_stored: Copy[None] = Copy(*stamp, stored.content, False, None)
        verdict: Verdict[Copy[Any]] = one_version(
            [(as_stored.content, as_stored), *((c.content, c) for c in group)]
        )
    else:
        verdict = one_version([(c.content, c) for c in group])
    out.duplicates += len(verdict.duplicates)
    if verdict.kept is not None:
        kept = verdict.kept[1]
        return None if kept.item is None else VersionRuling(stamp, group, kept)
    return VersionRuling(stamp, group, None, tuple(c for _content, c in verdict.conflicting))


# -- order of availability and panel ----------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # versionIds repeat ("1", "2", ...)
def availability_key(ref: str | None, vu: int, vv: int, seq: int) -> str:
    """The order versions (and rejections) become available in: those with meta.lastUpdated first,
    in that order, ties broken by reference and version (so the order of files does not matter),
    then those without it in input order (`seq`, the input position). Replay's SQLite engine
    computes the same in SQL (`replay.engine._AVAILABILITY`, seq zero-padded less wide: this
    engine numbers resources (chunk << 32) + position)."""
    if vu >= 0:
        return f"{vu:020d}\x1f{ref or ''}\x1f{vv}\x1f{seq:020d}"
    return f"~{seq:020d}"


def newest_order(updated_us: int, version: int, seq: int) -> tuple[int, int, int]:
    """What the newest version of an Observation is told by: lastUpdated, versionId, input position."""
    return (updated_us, version, seq)


def panel_key(specimen_key: str | None, report_key: str | None, collection_key: str) -> str:
    """An Observation's panel, from its newest usable version: its specimen, else the first
    DiagnosticReport naming it, else its collection instant (reference §1.2)."""
    if specimen_key is not None:
        return specimen_key
    return report_key if report_key is not None else collection_key
