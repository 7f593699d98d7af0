"""`python -m service profiles install` against the real engine: every StructureDefinition,
CodeSystem and ValueSet of fhir_profiles/generated/ on the server, rebased on alerts.canonical_base,
keyed on canonical url + version; a second run changes nothing, a changed copy is put back."""

from __future__ import annotations

import asyncio
import json

from service.__main__ import main
from service.config import load_settings
from service.live.probe import probe
from service.live.profiles import GENERATED
from tests.fhir_server.load import export

KINDS = ("StructureDefinition", "CodeSystem", "ValueSet")
BASE = "https://alerts.hospital.example/fhir"


def config(tmp_path, base_url: str):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"fhir:\n  base_url: {base_url}\n  allow_insecure_http: true\nalerts:\n  canonical_base: {BASE}\n"
        f"logging:\n  level: warning\nstore:\n  path: {tmp_path / 's.sqlite3'}\n"
    )
    return path


def on_server(base_url: str) -> dict[str, dict]:
    return {f"{r['url']}|{r['version']}": r for kind in KINDS for r in export(base_url, kind)}


async def test_install_is_idempotent_and_rebased(fhir_base_url, tmp_path, capsys):
    """First run: one created line per definition, each on the server once under the configured
    base. Second run: all unchanged, nothing new on the server (same versionIds). A copy edited on the
    server is updated back; nothing else is touched."""
    cfg = config(tmp_path, fhir_base_url)
    files = sorted(GENERATED.glob("*.json"))
    assert len(files) == 16
    assert await asyncio.to_thread(main, ["profiles", "install", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"profiles install: 16 created, 0 updated, 0 unchanged on {fhir_base_url}"
    assert [line.split()[1] for line in out[:-1]] == ["CodeSystem"] * 3 + ["ValueSet"] * 5 + [
        "StructureDefinition"
    ] * 8
    first = on_server(fhir_base_url)
    assert len(first) == 16 and all(key.startswith(BASE + "/") and key.endswith("|0.1.0") for key in first)
    flag = first[f"{BASE}/StructureDefinition/neutrowatch-flag|0.1.0"]
    assert "neutrowatch.example.org" not in json.dumps(flag)  # every canonical rebased, not only the url

    assert await asyncio.to_thread(main, ["profiles", "install", "--config", str(cfg)]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == f"profiles install: 0 created, 0 updated, 16 unchanged on {fhir_base_url}"
    )
    second = on_server(fhir_base_url)
    assert {k: r["meta"]["versionId"] for k, r in second.items()} == {
        k: r["meta"]["versionId"] for k, r in first.items()
    }

    # someone edits one on the server: it is put back, the others stay as they were
    from tests.fhir_server.load import put_all

    put_all(fhir_base_url, [{**flag, "description": "edited by hand"}])
    assert await asyncio.to_thread(main, ["profiles", "install", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"profiles install: 0 created, 1 updated, 15 unchanged on {fhir_base_url}"
    assert f"updated   StructureDefinition {BASE}/StructureDefinition/neutrowatch-flag|0.1.0" in out
    third = on_server(fhir_base_url)
    assert len(third) == 16 and third[f"{BASE}/StructureDefinition/neutrowatch-flag|0.1.0"].get(
        "description"
    ) == flag.get("description")

    # the probe now finds the claimed profiles under the configured base
    assert await probe(load_settings(cfg)) == 0
    assert (
        "ok   StructureDefinition read (claimed profiles): the claimed profiles are on the server"
        in capsys.readouterr().out
    )


def test_install_without_definitions_says_where_it_looked(tmp_path, capsys):
    """An empty --from directory (e.g. an image without the source tree): exit 2 naming the directory."""
    cfg = config(tmp_path, "http://127.0.0.1:9/fhir")
    assert main(["profiles", "install", "--config", str(cfg), "--from", str(tmp_path)]) == 2
    assert f"no profile definitions in {tmp_path}" in capsys.readouterr().err
