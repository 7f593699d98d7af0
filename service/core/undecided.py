"""Why a result reached no assessment: every result read is either assessed (graded) or counted
here by reason, so nothing is dropped silently (replay's summary, the live loop's
`neutrowatch_unassessed_results_total{reason}`). Pure: decisions in, counts out.

A panel that has no ANC reaches no assessment (reference §2: the ANC needs a WBC and a neutrophil
result of one collection); a result whose status is not final, amended or corrected is not assessed
(reference §1.5); a subject that names no patient on the server is refused (FHIR R4
references.html#literal).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from service.core.codes import Kind
from service.core.observations import GRANULOCYTES, NOT_MONITORED, LabResult
from service.core.panels import PanelDecision

CODE_NOT_MONITORED = NOT_MONITORED.reason
GRANULOCYTE_COUNT = GRANULOCYTES.reason
STATUS_NOT_ASSESSED = "status not assessed"
WBC_WITHOUT_DIFFERENTIAL = "panel without an ANC: WBC without a differential"
DIFFERENTIAL_WITHOUT_WBC = "panel without an ANC: differential without a WBC"
NO_WBC_OR_DIFFERENTIAL = "panel without an ANC: no WBC or differential"
UNRESOLVABLE_REFERENCE = "unresolvable reference"
NOT_A_LAB_RESULT = "not a lab result"

REASONS = (
    CODE_NOT_MONITORED,
    GRANULOCYTE_COUNT,
    STATUS_NOT_ASSESSED,
    WBC_WITHOUT_DIFFERENTIAL,
    DIFFERENTIAL_WITHOUT_WBC,
    NO_WBC_OR_DIFFERENTIAL,
    UNRESOLVABLE_REFERENCE,
    NOT_A_LAB_RESULT,
)

_DIFFERENTIAL = frozenset(
    {Kind.NEUT_PCT, Kind.SEG_PCT, Kind.BAND_PCT, Kind.NEUT_ABS, Kind.SEG_ABS, Kind.BAND_ABS}
)
_WITHOUT_WBC = "neutrophil percentage without a WBC in the same panel"  # service/core/anc.py


def panel_unassessed(decision: PanelDecision, members: Iterable[LabResult]) -> Counter[str]:
    """The lab results of a panel that reached no assessment and no other decision, by reason
    (empty when the panel was assessed, rejected for another reason or produced an event)."""
    if decision.assessed or decision.not_assessed is not None or decision.events:
        return Counter()
    if decision.rejection is not None and decision.rejection.rejected.reason != _WITHOUT_WBC:
        return Counter()
    labs = [m for m in members if m.kind is not Kind.TEMP]
    counts: Counter[str] = Counter()
    usable = [m for m in labs if m.assessable]
    if len(usable) < len(labs):
        counts[STATUS_NOT_ASSESSED] = len(labs) - len(usable)
    if usable:
        counts[_panel_reason({m.kind for m in usable})] += len(usable)
    return counts


def _panel_reason(kinds: set[Kind]) -> str:
    if Kind.WBC in kinds:
        return WBC_WITHOUT_DIFFERENTIAL
    return DIFFERENTIAL_WITHOUT_WBC if kinds & _DIFFERENTIAL else NO_WBC_OR_DIFFERENTIAL


def rejection_unassessed(reason: str) -> str | None:
    """The reason a rejected result counts as unassessed beyond its rejection: its subject names no
    patient on the server (contained, urn:, another server, not a Patient)."""
    return UNRESOLVABLE_REFERENCE if reason.startswith("subject ") else None


def ignored_unassessed(reason: str) -> str | None:
    """What an ignored resource counts as (`Ignored.reason`, replay's `ignored` keys); None for a
    copy of a version already read (it is that version)."""
    if reason in (CODE_NOT_MONITORED, GRANULOCYTE_COUNT):
        return reason
    if reason.startswith("identical copy"):
        return None
    return NOT_A_LAB_RESULT
