"""Reading one patient's data from the live server, as replay would read it: the monitored
Observations (every version, through `_history`), and the patient context the live loop reads
(its directory's own queries: service/live/directory.py). The resources are then explained exactly
as files are (`explain_inputs`). A request that fails is named in the error, never only its status."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import orjson

from service.config import Settings
from service.core.codes import cbc_codes, temperature_codes
from service.core.panels import local_reference
from service.explain.model import ExplainError, Trail, patient_reference
from service.explain.trail import explain_inputs
from service.fhir.client import FhirClient
from service.fhir.errors import FhirError, FhirHttpError
from service.fhir.model import FhirJson
from service.fhir.query import code_values
from service.live.directory import active_care_teams, chronic_benign_conditions, read_existing, subject_search

Resources = list[FhirJson]


async def fetch_patient(
    settings: Settings, patient: str, *, history: bool = True
) -> tuple[Resources, list[str]]:
    """What replay would read of one patient, from the server named by fhir.base_url: the monitored
    Observations (CBC terms and body temperatures; every version through `_history` unless
    `history` is False), the Patient, its chronic benign neutropenia Conditions, DiagnosticReports
    (panel membership), the orders its results are based on and its active CareTeams. Returns the
    resources and notes on what could not be read. A request that fails is named in the error
    (which interaction, on which resource type, e.g. "Condition search: HTTP 403: forbidden")."""
    doing: list[str] = ["connection"]
    try:
        async with FhirClient(settings.fhir) as client:
            return await _PatientReader(settings, client, patient, doing).read(history)
    except FhirError as err:
        raise ExplainError(f"explain: {doing[-1]} failed: {err}") from None


class _PatientReader:
    def __init__(self, settings: Settings, client: FhirClient, patient: str, doing: list[str]) -> None:
        self.client = client
        self.patient = patient
        self.base_url = settings.fhir.base_url
        self.page = str(settings.fhir.page_size)
        self.terminology = settings.read_policy.terminology
        self.doing = doing  # the interaction under way, for the error
        self.notes: list[str] = []
        local = local_reference(patient, "Patient")
        self.pid = local.split("/")[-1] if local else ""
        self.subject = subject_search(self.base_url, local or patient)

    async def read(self, history: bool) -> tuple[Resources, list[str]]:
        observations = await self.observations(history)
        resources = list(observations)
        resources += await self.patient_record()
        self.doing.append("Condition search")
        resources += await chronic_benign_conditions(self.client, self.subject)
        self.doing.append("DiagnosticReport search")
        resources += await self.client.search_all(
            "DiagnosticReport", [("subject", self.patient), ("_count", self.page)]
        )
        resources += await self.orders(observations)
        self.doing.append("CareTeam search")
        resources += await active_care_teams(self.client, self.subject)
        return resources, self.notes

    async def observations(self, history: bool) -> Resources:
        self.doing.append("Observation search")
        codes = ",".join(code_values(cbc_codes() + temperature_codes(), self.terminology.local_codes()))
        found = await self.client.search_all(
            "Observation", [("subject", self.patient), ("code", codes), ("_count", self.page)]
        )
        if not history:
            self.notes.append("current versions only (--no-history)")
            return found
        return found + await self.earlier_versions(found)

    async def earlier_versions(self, current: Resources) -> Resources:
        """The versions before the current one of each Observation that has any."""
        older = [o for o in current if str(_meta(o).get("versionId", "")) != "1" and o.get("id")]
        self.doing.append("Observation _history read")
        try:
            versions = await asyncio.gather(*(self.versions_of(o["id"]) for o in older))
        except FhirHttpError as err:  # the server does not offer _history (e.g. 400, 405, 501)
            self.notes.append(f"_history not available (HTTP {err.status}): current versions only")
            return []
        return [
            v
            for o, found in zip(older, versions, strict=True)
            for v in found
            if _meta(v).get("versionId") != _meta(o).get("versionId")
        ]

    async def versions_of(self, id: str) -> Resources:
        try:
            return await self.client.history("Observation", id)
        except FhirHttpError as err:
            if err.status in (404, 410):  # deleted meanwhile: its current version is all there is
                return []
            raise

    async def patient_record(self) -> Resources:
        if not self.pid:
            return []
        self.doing.append("Patient read")
        record = await read_existing(self.client, "Patient", self.pid)
        if record is None:
            self.notes.append(f"{self.patient} not found on the server: no birth date")
            return []
        return [record]

    async def orders(self, observations: Resources) -> Resources:
        refs = sorted(
            {
                r["reference"]
                for o in observations
                for r in o.get("basedOn") or ()
                if isinstance(r, dict) and str(r.get("reference", "")).startswith("ServiceRequest/")
            }
        )
        self.doing.append("ServiceRequest read")
        found: Resources = []
        for ref in refs:
            try:
                order = await read_existing(self.client, "ServiceRequest", ref.split("/", 1)[1])
            except (FhirHttpError, ValueError):
                order = None
            if order is None:
                self.notes.append(f"{ref} could not be read")
            else:
                found.append(order)
        return found


def _meta(resource: FhirJson) -> FhirJson:
    meta = resource.get("meta")
    return meta if isinstance(meta, dict) else {}


def explain_server(settings: Settings, patient: str, *, history: bool = True) -> Trail:
    """The trail of `patient` from the live server: fetched, then read exactly as `--input` reads files."""
    if not settings.fhir.base_url:
        raise ExplainError("no --input and no fhir.base_url in the configuration: nothing to read")
    patient = patient_reference(patient)
    resources, notes = asyncio.run(fetch_patient(settings, patient, history=history))
    with tempfile.TemporaryDirectory(prefix="neutrowatch-explain-") as tmp:
        path = Path(tmp) / "patient.ndjson"
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
        source = f"{settings.fhir.base_url} ({len(resources)} resources)"
        trail = explain_inputs([path], patient, settings, source=source)
    trail.notes.extend(notes)
    return trail
