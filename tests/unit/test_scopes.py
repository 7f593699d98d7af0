"""The SMART scopes the service requests: derived from what it does (service/fhir/scopes.py), one default
for the settings model and config/default.yaml, and both SMART syntaxes understood.
Scope syntax: https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html (v2 `cruds`
letters; v1 `read`/`write`/`*`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.config import Settings, SmartSettings
from service.fhir import scopes

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_scope_is_the_same_in_the_model_the_yaml_and_the_derivation():
    """config/default.yaml, the settings model and the derivation from the built-in settings agree
    (the shipped file once lacked Provenance while the model had it)."""
    shipped = yaml.safe_load((ROOT / "config/default.yaml").read_text())["fhir"]["auth"]["smart"]["scope"]
    s = Settings()
    derived = scopes.default_scope(
        patient_context=s.poll.patient_context,
        conditions=s.clinical.chronic_benign_threshold_per_ul is not None,
        claim_profiles=s.alerts.claim_profiles,
    )
    assert shipped.split() == SmartSettings().scope.split() == derived.split()


def test_the_default_scope_names_every_interaction_of_the_live_loop():
    """The Observation search and the DiagnosticReports it includes, reads and searches of the context
    resources, `cus` on Flag (search, conditional create, update),
    `cs` on Communication and Provenance (a conditional create searches), StructureDefinition read when
    profiles are claimed."""
    assert scopes.default_scope().split() == [
        "system/Observation.s",
        "system/DiagnosticReport.s",
        "system/Patient.r",
        "system/Condition.s",
        "system/ServiceRequest.r",
        "system/CareTeam.s",
        "system/Flag.cus",
        "system/Communication.cs",
        "system/Provenance.cs",
        "system/StructureDefinition.rs",
    ]


@pytest.mark.parametrize(
    ("options", "absent"),
    [
        ({"patient_context": False}, {"Patient", "Condition", "ServiceRequest", "CareTeam"}),
        ({"conditions": False}, {"Condition"}),
        ({"claim_profiles": False}, {"StructureDefinition"}),
    ],
)
def test_what_the_configuration_does_not_read_is_not_requested(options, absent):
    """Context off, no chronic benign threshold, or no profile claims: those scopes are not asked for."""
    requested = {s.split("/")[1].split(".")[0] for s in scopes.default_scope(**options).split()}
    assert requested & absent == set()
    assert {"Observation", "DiagnosticReport", "Flag", "Communication", "Provenance"} <= requested


@pytest.mark.parametrize(
    ("grant", "lacking"),
    [
        (scopes.default_scope(), []),
        # v1 syntax: read = r+s, write = c+u+d
        (
            "system/Observation.read system/DiagnosticReport.read system/Patient.read system/Condition.read "
            "system/ServiceRequest.read system/CareTeam.read system/Flag.read system/Flag.write "
            "system/Communication.read system/Communication.write "
            "system/Provenance.read system/Provenance.write system/StructureDefinition.read",
            [],
        ),
        ("system/*.read system/*.write", []),
        ("system/*.*", []),
        ("system/*.cruds", []),
        # the default before this derivation: no Condition, ServiceRequest, CareTeam, StructureDefinition,
        # no search on writes
        (
            "system/Observation.rs system/Patient.rs system/Flag.cru system/Communication.cr "
            "system/Provenance.cr",
            [
                "system/DiagnosticReport.s",
                "system/Condition.s",
                "system/ServiceRequest.r",
                "system/CareTeam.s",
                "system/Flag.s",
                "system/Communication.s",
                "system/Provenance.s",
                "system/StructureDefinition.rs",
            ],
        ),
        # Provenance forgotten in the writes: only its create is missing (the wildcard read covers search)
        ("system/*.read system/Flag.write system/Communication.write", ["system/Provenance.c"]),
        # write without read: a conditional create also needs search
        (
            "system/Observation.read system/Flag.write system/Communication.write system/Provenance.write",
            [
                "system/DiagnosticReport.s",
                "system/Patient.r",
                "system/Condition.s",
                "system/ServiceRequest.r",
                "system/CareTeam.s",
                "system/Flag.s",
                "system/Communication.s",
                "system/Provenance.s",
                "system/StructureDefinition.rs",
            ],
        ),
        # patient/ and user/ scopes grant a backend service nothing
        ("patient/*.cruds user/*.cruds", [s for s in scopes.default_scope().split()]),
        # a v2 query restriction still counts as granted (the server applies it)
        (
            scopes.default_scope().replace(
                "system/Observation.s", "system/Observation.rs?category=laboratory"
            ),
            [],
        ),
    ],
)
def test_missing_names_exactly_the_scopes_not_granted(grant, lacking):
    """Granted vs required, in v1 or v2 syntax, wildcards included; only the missing letters are named."""
    need = scopes.required(scopes.interactions())
    assert scopes.missing(need, grant) == lacking


def test_check_config_warns_of_a_configured_scope_short_of_the_needs(tmp_path):
    """A site's SMART scope that lacks what the configuration does is a check-config warning (logged
    at start by run and once too), naming the missing scopes; the default scope draws none."""
    from service.config import review_settings

    key = tmp_path / "key.pem"
    key.write_text("not read by the review")
    base = (
        "fhir:\n  base_url: https://fhir.example.org/r4\n  auth:\n    method: smart\n    smart:\n"
        f"      client_id: nw\n      private_key_file: {key}\n"
    )
    short = tmp_path / "short.yaml"
    short.write_text(
        base + "      scope: system/Observation.rs system/Patient.rs system/Flag.cru system/Communication.cr "
        "system/Provenance.cr\n"
    )
    warned = [w for w in review_settings(short).warnings if w.startswith("fhir.auth.smart.scope")]
    assert len(warned) == 1 and warned[0].startswith(
        "fhir.auth.smart.scope lacks system/DiagnosticReport.s system/Condition.s system/ServiceRequest.r "
        "system/CareTeam.s system/Flag.s system/Communication.s system/Provenance.s "
        "system/StructureDefinition.rs: the server will refuse those requests"
    )
    default = tmp_path / "default.yaml"
    default.write_text(base)
    assert not [w for w in review_settings(default).warnings if w.startswith("fhir.auth.smart.scope")]
    # a configuration that reads less needs less: no context, no profile claims
    lean = tmp_path / "lean.yaml"
    lean.write_text(
        base + "      scope: system/Observation.read system/DiagnosticReport.read system/Flag.read "
        "system/Flag.write system/Communication.read "
        "system/Communication.write system/Provenance.read system/Provenance.write\n"
        "poll:\n  patient_context: false\nalerts:\n  claim_profiles: false\n"
    )
    assert not [w for w in review_settings(lean).warnings if w.startswith("fhir.auth.smart.scope")]
