"""Who is told: the ordering clinician when the order can be found (Observation.basedOn ->
ServiceRequest.requester), else the patient's care team, else the configured pool (reference §4)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

ORDERING = "ordering clinician"
CARE_TEAM = "care team"
POOL = "configured pool"
NOBODY = "none"

_PEOPLE = ("Practitioner/", "PractitionerRole/", "CareTeam/", "Organization/", "Group/")


@dataclass(frozen=True, slots=True)
class Recipients:
    refs: tuple[str, ...]
    rule: str


def _people(refs: Iterable[str | None]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for ref in refs:
        if ref and ref.startswith(_PEOPLE):
            seen.setdefault(ref)
    return tuple(seen)


def choose(
    based_on: Iterable[str],
    requesters: Mapping[str, str | None],
    care_team: Sequence[str],
    pool: Sequence[str],
) -> Recipients:
    """`requesters`: ServiceRequest reference -> its requester reference, for the orders found;
    `care_team`: participant member references of the patient's active CareTeams."""
    ordering = _people(requesters.get(ref) for ref in based_on if ref.startswith("ServiceRequest/"))
    if ordering:
        return Recipients(ordering, ORDERING)
    team = _people(care_team)
    if team:
        return Recipients(team, CARE_TEAM)
    if pool:
        return Recipients(tuple(pool), POOL)
    return Recipients((), NOBODY)
