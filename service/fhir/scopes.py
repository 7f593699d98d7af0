"""The SMART scopes the service needs, derived from what it does: one source for the default of
`fhir.auth.smart.scope`, for config/default.yaml (a test holds them equal) and for the probe, which
compares them with what the token endpoint granted.

Syntax: SMART App Launch v2 (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html):
`system/<Type>.<cruds>`, the letters a subset of c(reate) r(ead) u(pdate) d(elete) s(earch), in that
order. A conditional create needs `s` as well as `c` (the server searches on If-None-Exist). The v1
syntax is accepted in what a site configures or a server grants: `.read` = `rs`, `.write` = `cud`,
`.*` = `cruds`; `*` as the type grants every type.

Only the system/ context counts: a backend service acts as itself, and patient/ or user/ scopes do
not grant it anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LETTERS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": LETTERS}


@dataclass(frozen=True, slots=True)
class Interaction:
    """One kind of request the service sends: `label` as the probe prints it, and the scope letters
    it needs on `resource`."""

    label: str
    resource: str
    letters: str

    @property
    def scope(self) -> str:
        return f"system/{self.resource}.{self.letters}"


def interactions(
    *, patient_context: bool = True, conditions: bool = True, claim_profiles: bool = True
) -> list[Interaction]:
    """Every interaction of the live loop, given what the configuration makes it read:
    `patient_context` (poll.patient_context: Patient, ServiceRequest, CareTeam), `conditions` (a
    chronic benign neutropenia threshold is set: the Condition search) and `claim_profiles` (the
    written resources claim profiles, which a validating server reads with the caller's rights)."""
    found = [
        Interaction("Observation search", "Observation", "s"),
        # the search includes the DiagnosticReports of its results (_revinclude): panel membership
        Interaction("DiagnosticReport search (with the Observation search)", "DiagnosticReport", "s"),
    ]
    if patient_context:
        found.append(Interaction("Patient read", "Patient", "r"))
        if conditions:
            found.append(Interaction("Condition search", "Condition", "s"))
        found += [
            Interaction("ServiceRequest read", "ServiceRequest", "r"),
            Interaction("CareTeam search", "CareTeam", "s"),
        ]
    found += [
        Interaction("Flag identifier search", "Flag", "s"),
        Interaction("Flag conditional create", "Flag", "cs"),
        Interaction("Flag update", "Flag", "u"),
        Interaction("Communication conditional create", "Communication", "cs"),
        Interaction("Provenance conditional create", "Provenance", "cs"),
    ]
    if claim_profiles:
        found.append(Interaction("StructureDefinition read (claimed profiles)", "StructureDefinition", "rs"))
    return found


def required(items: Iterable[Interaction]) -> dict[str, str]:
    """Letters needed per resource type, in first-use order, letters in cruds order."""
    need: dict[str, set[str]] = {}
    for item in items:
        need.setdefault(item.resource, set()).update(item.letters)
    return {resource: _ordered(letters) for resource, letters in need.items()}


def scope_string(need: Mapping[str, str]) -> str:
    return " ".join(f"system/{resource}.{letters}" for resource, letters in need.items())


def default_scope(
    *, patient_context: bool = True, conditions: bool = True, claim_profiles: bool = True
) -> str:
    """The scope to request for a configuration (the defaults: the built-in configuration's)."""
    return scope_string(
        required(
            interactions(
                patient_context=patient_context, conditions=conditions, claim_profiles=claim_profiles
            )
        )
    )


def granted(scope: str) -> dict[str, set[str]]:
    """What a space-separated scope string grants, by resource type (`*` for every type), in either
    syntax. A v2 scope with a query (`system/Observation.rs?category=...`) counts as granted: the
    server applies the restriction; the probe's searches show its effect."""
    out: dict[str, set[str]] = {}
    for token in scope.split():
        context, _, rest = token.partition("/")
        if context != "system" or "." not in rest:
            continue
        resource, _, perms = rest.partition(".")
        perms = perms.split("?", 1)[0]
        letters = _V1.get(perms, perms)
        if not letters or any(ch not in LETTERS for ch in letters):
            continue
        out.setdefault(resource, set()).update(letters)
    return out


def missing(need: Mapping[str, str], scope: str) -> list[str]:
    """The needed scopes `scope` does not grant, each as v2 `system/<Type>.<letters>` (only the
    letters that are missing)."""
    have = granted(scope)
    out = []
    for resource, letters in need.items():
        lacking = set(letters) - have.get(resource, set()) - have.get("*", set())
        if lacking:
            out.append(f"system/{resource}.{_ordered(lacking)}")
    return out


def _ordered(letters: Iterable[str]) -> str:
    chosen = set(letters)
    return "".join(ch for ch in LETTERS if ch in chosen)
