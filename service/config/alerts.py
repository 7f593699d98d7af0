"""The alerts section: what the written Flags, Communications and Provenance say about their
author, identifier systems, profiles and fallback recipients (`alerts.*`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from service.config.section import Section


class AlertSettings(Section):
    canonical_base: str = Field(
        "https://neutrowatch.example.org/fhir",
        description="Base URL for identifier systems and profiles of what the service writes. "
        "Set it to a URL your organisation controls.",
        pattern=r"^https?://\S+[^/]$",
    )
    author: str = Field(
        "Device/neutrowatch",
        description="Reference used as Flag.author and Communication.sender (a Device or Organization).",
        pattern=r"^(Device|Organization)/[A-Za-z0-9\-.]{1,64}$",
    )
    claim_profiles: bool = Field(
        True,
        description="Written Flags, Communications and Provenance claim the project's profiles "
        "(meta.profile). A server that validates claims must hold the StructureDefinitions (`profiles "
        "install`) and let the service read them; false: no meta.profile (the extensions stay, they are "
        "valid without the profiles). Replay follows it too.",
    )
    recipients: tuple[str, ...] = Field(
        (),
        description="Fallback Communication recipients (Practitioner, PractitionerRole, CareTeam, "
        "Organization or Group references).",
    )

    @field_validator("recipients")
    @classmethod
    def _references(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        allowed = ("Practitioner/", "PractitionerRole/", "CareTeam/", "Organization/", "Group/")
        for ref in value:
            if not ref.startswith(allowed) or ref.rstrip("/") in {a.rstrip("/") for a in allowed}:
                raise ValueError(
                    f"{ref!r} is not a Practitioner, PractitionerRole, CareTeam, Organization or Group "
                    "reference"
                )
        return value
