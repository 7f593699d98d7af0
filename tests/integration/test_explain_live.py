"""`explain` from the live FHIR server equals `explain --input` over the same resources:
the patient's Observations (every version, through _history), Patient, Conditions, DiagnosticReports,
orders and care teams fetched with FhirClient are read by replay's reader exactly as an export of the
server is. The export is made independently (tests/fhir_server/load.py), as the replay oracle of the
live-loop tests makes it."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from service.__main__ import main
from service.explain import explain_inputs, explain_server, trail_json
from tests.builders import observation
from tests.fhir_server.load import export, export_history, put_all
from tests.integration.live import population, settings_for

KINDS = ("Patient", "Condition", "ServiceRequest", "CareTeam", "DiagnosticReport")


def server_export(base_url: str, path: Path) -> Path:
    resources = [r for t in KINDS for r in export(base_url, t)] + export_history(base_url, "Observation")
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    return path


def comparable(trail) -> dict:
    doc = trail_json(trail)
    doc.pop("source")
    doc.pop("notes")
    return doc


def correction_case() -> list[dict]:
    """A severe panel corrected to normal (two versions on the server) and a fever, for Patient/live."""
    common = dict(patient="Patient/live", effective="2026-01-20T08:00:00Z", specimen="Specimen/live-1")
    wbc = observation("6690-2", 3.0, id="live-wbc", **common)
    anc = observation("751-8", 0.3, id="live-anc", **common)
    fever = observation(
        "8310-5",
        38.7,
        "Cel",
        id="live-t1",
        patient="Patient/live",
        effective="2026-01-20T14:00:00Z",
        specimen=None,
    )
    return [{"resourceType": "Patient", "id": "live", "birthDate": "1970-01-01"}, wbc, anc, fever]


def test_explain_from_the_server_equals_explain_over_its_export(fhir_base_url, tmp_path):
    resources = population(patients=6, days=56, seed=3, temperatures=True, corrections=0.05)
    put_all(fhir_base_url, resources)
    put_all(fhir_base_url, correction_case())
    # the correction must carry a later meta.lastUpdated than the original: two versions stamped in
    # the same millisecond tie, and a tie is ordered by (random) versionId, not by history
    time.sleep(0.01)
    fixed = dict(
        correction_case()[2],
        status="corrected",
        valueQuantity={
            "value": 2.1,
            "unit": "10*3/uL",
            "system": "http://unitsofmeasure.org",
            "code": "10*3/uL",
        },
    )
    put_all(fhir_base_url, [fixed])  # version 2 on the server
    settings = settings_for(fhir_base_url, tmp_path / "unused.sqlite3")
    exported = server_export(fhir_base_url, tmp_path / "server.ndjson")

    patients = ["Patient/live"] + [f"Patient/{r['id']}" for r in resources if r["resourceType"] == "Patient"][
        :3
    ]
    for patient in patients:
        live = explain_server(settings, patient)
        files = explain_inputs([exported], patient, settings)
        assert comparable(live) == comparable(files), patient
        assert live.records, patient

    live = explain_server(settings, "Patient/live")
    assert [e.rule for e in live.events] == [
        "new: neutropenic with no open episode",
        "febrile: fever >= 38.3 within 24 h of ANC < 500",
        "retracted: corrected result",
        "retracted: corrected result",
    ]
    again = next(s for s in live.steps if s.revision_of)
    first = live.steps[again.revision_of - 1]
    (before,) = [i for i in first.inputs if i.code == "751-8"]
    (after,) = [i for i in again.inputs if i.code == "751-8"]
    assert (before.status, after.status) == ("final", "corrected")  # both versions, read through _history
    assert before.version != after.version
    # without _history the corrected value is all the server shows: no alert, nothing to retract
    current = explain_server(settings, "Patient/live", history=False)
    assert current.events == [] and "current versions only (--no-history)" in current.notes


def test_explain_cli_against_the_server(fhir_base_url, tmp_path, capsys):
    put_all(fhir_base_url, correction_case())
    config = tmp_path / "c.yaml"
    config.write_text(
        f"fhir:\n  base_url: {fhir_base_url}\n  allow_insecure_http: true\nlogging:\n  level: warning\n"
    )
    png = tmp_path / "live.png"
    assert main(["explain", "live", "--config", str(config), "--png", str(png)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Decision trail of Patient/live - scheme default")
    assert f"source:  {fhir_base_url}" in out
    assert "rule: febrile: fever >= 38.3 within 24 h of ANC < 500" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "Patient/live" not in err  # nothing of the patient in the log


async def test_explain_names_the_request_the_server_refused(fhir_base_url, tmp_path, capsys):
    """A refused request (403 on the Condition search, through a proxy in front of the engine) is named
    in explain's error, with its status, and the patient is not (the terminal may be shared)."""
    import asyncio

    from aiohttp import web

    from tests.chaos.proxy import Fault, Proxy, outcome

    put_all(fhir_base_url, correction_case())
    proxy = Proxy(upstream=fhir_base_url)
    await proxy.start()
    try:
        proxy.add(
            Fault(
                lambda r: r.method == "GET" and r.path == "/fhir/Condition",
                times=float("inf"),
                respond=lambda _r: web.Response(
                    status=403,
                    body=orjson.dumps(outcome("forbidden", "no")),
                    headers={"Content-Type": "application/fhir+json"},
                ),
            )
        )
        config = tmp_path / "c.yaml"
        config.write_text(
            f"fhir:\n  base_url: {proxy.base}\n  allow_insecure_http: true\n"
            "  retry:\n    max_attempts: 1\nlogging:\n  level: warning\n"
        )
        code = await asyncio.to_thread(main, ["explain", "live", "--config", str(config)])
    finally:
        await proxy.stop()
    _out, err = capsys.readouterr()
    assert code == 2
    assert "explain: Condition search failed: HTTP 403" in err
    assert "Patient/live" not in err
