"""Replay's pass 2: the panels of a patient in order of availability, through the core, into decision
records and their alert resources. One loop for both engines: the SQLite engine feeds it from its
tables (`Replay.decide`), the partitioned engine from each patient partition (service/replay/parallel.py).

Each Observation version is an arrival: a panel is assessed when its first member is available,
with each member's first version, and again when a later version of a member arrives (a correction,
a withdrawal) — as the live loop sees it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from service.config import AlertSettings
from service.core.context import PatientContext, patient_context
from service.core.episodes import PatientState
from service.core.observations import LabResult, Rejected
from service.core.panels import PanelDecision
from service.core.recipients import choose
from service.core.rules import Rules
from service.core.undecided import panel_unassessed, rejection_unassessed
from service.fhir.fhirtime import from_epoch_us
from service.fhir.model import FhirJson
from service.output.events import Decision, rejected_record
from service.output.outcomes import concluded, judged
from service.replay.rows import Available, PanelVersion, PatientFacts, ReplayStats


class ReplayRecord(NamedTuple):
    """One decision record as `decide` yields it, in order of availability."""

    akey: str  # availability key of the arrival that produced it
    record: Decision
    alerts: list[FhirJson] | None  # the alert resources to write (None: no alert, or none asked for)


@dataclass(frozen=True, slots=True)
class PanelTrace:
    """One panel as `decide` judged it, for `explain`: what went in (the members as they stood at
    that arrival), the patient's state before, the core's decision, and the event records it
    produced (exactly those `decide` yields for it)."""

    akey: str  # availability key of the arrival that made the panel be judged
    patient: str
    panel: str
    members: tuple[LabResult, ...]
    before: PatientState
    decision: PanelDecision | None  # None: the panel could not be decided (its record says why)
    context: PatientContext
    records: tuple[Decision, ...]


@dataclass(frozen=True, slots=True)
class Judging:
    """What the loop needs besides its input: the rules, the alert settings, whether alert resources
    are built (`with_alerts`) and include each write's Provenance (`provenance`), and the reading
    clock (bounds the collection time of a result without meta.lastUpdated)."""

    rules: Rules
    alert_settings: AlertSettings
    clock_us: int | None
    with_alerts: bool = True
    provenance: bool = False


def snapshots(versions: Sequence[PanelVersion]) -> tuple[list[LabResult], list[tuple[str, list[LabResult]]]]:
    """A panel as it was first available (each member's first version) and as it stood after each
    later version arrived: (availability key, members). `versions` in order of availability."""
    first: dict[str, LabResult | None] = {}
    later: list[PanelVersion] = []
    for version in versions:
        if version[1] in first:
            later.append(version)
        else:
            first[version[1]] = version[2]
    initial = [r for r in first.values() if r is not None]
    current = dict(first)
    out: list[tuple[str, list[LabResult]]] = []
    for akey, ref, result in later:
        current[ref] = result
        out.append((akey, [r for r in current.values() if r is not None]))
    return initial, out


def decide(  # noqa: C901 - the replay loop in arrival order; its closures share the per-run state
    stream: Iterable[Available],
    facts: Mapping[str, PatientFacts],
    how: Judging,
    stats: ReplayStats,
    trace: Callable[[PanelTrace], None] | None = None,
) -> Iterator[ReplayRecord]:
    """Each decision record with its alert resources (`ReplayRecord`) in order of availability, the
    run's counts added to `stats`. Building and validating the alert resources is skipped when
    nobody asked for them (`how.with_alerts`). `stream`: (availability key, patient, panel key, the
    panel's versions or a Rejected) in order of availability; `facts`: what the input says of each
    patient (age, threshold, orders, care team). `trace`: called with each judged panel (`explain`)
    before its records are yielded; it changes nothing of what is yielded."""
    states: dict[str, PatientState] = {}
    rules, alert_settings, clock = how.rules, how.alert_settings, how.clock_us

    def no_facts(patient: str) -> PatientFacts:
        """A patient the input says nothing else of: still its configured threshold, as live."""
        return PatientFacts(patient_context(patient, None, (), rules))

    pool = alert_settings.recipients
    pending: list[_Later] = []  # later versions, re-assessed when they arrive (a heap)

    def judge(akey: str, patient: str, panel: str, members: list[LabResult]) -> Iterator[ReplayRecord]:
        stats.panels += 1
        known = facts.get(patient) or no_facts(patient)
        before = states.get(patient, PatientState())
        step = judged(before, patient, panel, members, rules, known.context, clock)
        if isinstance(step, PanelDecision):
            step = concluded(
                before,
                patient,
                panel,
                members,
                step,
                lambda based_on: choose(based_on, known.requesters, known.care_team, pool),
                rules.scheme,
                alert_settings,
                sent=_available(members),
            )
        states[patient] = step.state
        if step.decision is not None:
            stats.stale_panels += step.decision.stale
            stats.unassessed.update(panel_unassessed(step.decision, members))
        out: list[ReplayRecord] = []
        for record, writes in step.records:
            stats.events[record.event] += 1
            resources = None
            if how.with_alerts and writes is not None:
                resources = [writes.flag] + ([writes.communication] if writes.communication else [])
                if how.provenance:
                    resources.append(writes.provenance)
            out.append(ReplayRecord(akey, record, resources))
        if trace is not None:
            trace(
                PanelTrace(
                    akey=akey,
                    patient=patient,
                    panel=panel,
                    members=tuple(members),
                    before=before,
                    decision=step.decision,
                    context=known.context,
                    records=tuple(r.record for r in out),
                )
            )
        yield from out

    for akey, patient, panel, payload in stream:
        while pending and pending[0].akey < akey:
            yield from judge(*heapq.heappop(pending))
        if isinstance(payload, Rejected):
            stats.events["rejected"] += 1
            if (why := rejection_unassessed(payload.reason)) is not None:
                stats.unassessed[why] += 1
            yield ReplayRecord(akey, rejected_record(payload), None)
            continue
        initial, later = snapshots(payload)
        for later_key, members in later:
            heapq.heappush(pending, _Later(later_key, patient, panel, members))
        if initial:
            yield from judge(akey, patient, panel, initial)
    while pending:
        yield from judge(*heapq.heappop(pending))


class _Later(NamedTuple):
    """A panel as it stands after a later version of a member arrived: judged again at `akey`."""

    akey: str
    patient: str
    panel: str
    members: list[LabResult]


def _available(members: list[LabResult]) -> str | None:
    stamps = [m.updated_us for m in members if m.updated_us is not None]
    return from_epoch_us(min(stamps)) if stamps else None
