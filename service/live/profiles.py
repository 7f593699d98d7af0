"""Installing the service's profiles, extensions and terminology (fhir_profiles/generated/) on a FHIR
server: `python -m service profiles install`. The canonical URLs and codes themselves are
service/output/profiles.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import NeutrowatchError
from service.fhir.model import FhirJson
from service.output.profiles import DEFAULT_BASE

if TYPE_CHECKING:
    from service.fhir.client import FhirClient


GENERATED = Path(__file__).resolve().parents[2] / "fhir_profiles" / "generated"  # in a source tree
INSTALL_ORDER = ("CodeSystem", "ValueSet", "StructureDefinition")  # what a later one binds to goes first
_SERVER_OWNED = ("id", "meta", "text")  # set or rewritten by the server: not compared


def definitions(directory: Path, base: str) -> list[FhirJson]:
    """The StructureDefinitions, CodeSystems and ValueSets of fhir_profiles/generated/, rebased from
    DEFAULT_BASE onto `base` (alerts.canonical_base) exactly as validate.mjs --canonical-base does, in
    INSTALL_ORDER."""
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not files:
        raise NeutrowatchError(
            f"no profile definitions in {directory} (build them with fhir_profiles/build.sh, or pass --from)"
        )
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        if base != DEFAULT_BASE:
            text = text.replace(DEFAULT_BASE + "/", base + "/")
        doc = json.loads(text)
        if doc.get("resourceType") in INSTALL_ORDER and doc.get("url") and doc.get("version"):
            found.append(doc)
    return sorted(found, key=lambda d: (INSTALL_ORDER.index(d["resourceType"]), d["url"]))


def _content(resource: FhirJson) -> FhirJson:
    return {k: v for k, v in resource.items() if k not in _SERVER_OWNED}


async def install(client: FhirClient, resources: list[FhirJson]) -> list[tuple[str, FhirJson]]:
    """Each definition on the server, keyed on its canonical `url` + `version`: created when absent
    (a conditional create on both, so a concurrent or repeated run creates none twice), updated when
    the server's copy differs, left alone when it says the same. Returns (what was done, resource)
    for each: "created", "updated" or "unchanged". A second run reports every one unchanged."""
    from service.fhir.errors import PreconditionFailed

    done = []
    for resource in resources:
        kind, url, ver = resource["resourceType"], resource["url"], resource["version"]
        existing = await client.search_all(kind, [("url", url), ("version", ver)])
        existing = [
            r
            for r in existing
            if r.get("resourceType") == kind and r.get("url") == url and r.get("version") == ver
        ]
        body = {k: v for k, v in resource.items() if k != "id"}
        if len(existing) > 1:
            raise NeutrowatchError(
                f"{kind} {url}|{ver}: {len(existing)} copies on the server; remove all but one by hand"
            )
        if not existing:
            await client.create(body, if_none_exist=f"url={url}&version={ver}")
            done.append(("created", resource))
        elif _content(existing[0]) == _content(resource):
            done.append(("unchanged", resource))
        else:
            current = existing[0]
            try:
                await client.update(
                    {**body, "id": current["id"]}, if_match=(current.get("meta") or {}).get("versionId")
                )
            except PreconditionFailed:
                raise NeutrowatchError(
                    f"{kind} {url}|{ver} changed on the server while it was updated; run again"
                ) from None
            done.append(("updated", resource))
    return done
