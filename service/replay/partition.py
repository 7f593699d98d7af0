"""One patient partition of the partitioned replay engine (service/replay/parallel.py, step 3): the
rows handed to it (`PatientPart`) and what `decisions.decide` reads from them, in order of
availability (`arrivals`, then `stream`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from operator import attrgetter
from typing import NamedTuple

import msgspec

from service.replay.rows import Available, ContextRow, PanelVersion, decode_rejected, decode_result


class PatientRow(NamedTuple):
    """One version of an Observation, handed to its patient's partition (step 2)."""

    patient: str
    panel: str  # the panel key of its Observation's newest usable version
    akey: str  # availability key
    data: bytes | None  # the LabResult (msgpack); None: a rejected version
    ref: str


class RejectionRow(NamedTuple):
    """A rejection, handed to any partition (steps 1 and 2): it needs no more than sorting."""

    akey: str
    data: bytes  # the Rejected (msgpack)


class PatientPart(NamedTuple):
    """What one spilled segment holds for a patient partition."""

    results: list[PatientRow]
    rejected: list[RejectionRow]
    context: list[ContextRow]  # Patient, Condition, ServiceRequest, CareTeam of its patients


decode_part = msgspec.msgpack.Decoder(PatientPart).decode


class _Version(NamedTuple):
    akey: str
    ref: str
    data: bytes | None  # the LabResult (msgpack); None: a rejected version


class Arrival(NamedTuple):
    """A panel (its versions in order of availability) or a rejection (patient and panel ""), not
    yet decoded: `Available` once `stream` reads it."""

    akey: str
    patient: str
    panel: str
    payload: list[_Version] | bytes  # bytes: the Rejected (msgpack)


def arrivals(parts: Iterable[PatientPart]) -> tuple[list[Arrival], list[ContextRow]]:
    """The partition's panels and rejections in order of availability, and its context rows."""
    results: list[PatientRow] = []
    rejections: list[RejectionRow] = []
    context: list[ContextRow] = []
    for part in parts:
        results += part.results
        rejections += part.rejected
        context += part.context
    results.sort(key=attrgetter("akey"))
    # A panel is available when its first version is: dicts keep insertion order, and each panel's
    # versions come in order of availability.
    panels: dict[tuple[str, str], tuple[str, list[_Version]]] = {}
    for patient, panel, key, data, ref in results:
        seen = panels.get((patient, panel))
        if seen is None:
            panels[(patient, panel)] = (key, [_Version(key, ref, data)])
        else:
            seen[1].append(_Version(key, ref, data))
    del results
    items = [
        Arrival(first, patient, panel, versions) for (patient, panel), (first, versions) in panels.items()
    ]
    del panels
    items += [Arrival(key, "", "", data) for key, data in rejections]
    items.sort(key=attrgetter("akey"))  # all keys differ
    return items, context


def stream(items: Iterable[Arrival]) -> Iterator[Available]:
    """What `decisions.decide` reads, decoded as it goes."""
    for key, patient, panel, payload in items:
        if isinstance(payload, list):
            yield Available(
                key,
                patient,
                panel,
                [PanelVersion(k, ref, decode_result(d) if d is not None else None) for k, ref, d in payload],
            )
        else:
            yield Available(key, patient, panel, decode_rejected(payload))
