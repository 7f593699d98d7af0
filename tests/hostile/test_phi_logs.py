"""No PHI in logs: the demo population (scripts/demo.py: 40 synthetic patients, seed 1), made
PHI-rich for this test (names and birth dates repeated in free text: Observation.note, valueString,
interpretation text, DiagnosticReport.conclusion, Patient narrative, address and telephone), through
replay and through the live loop against the real FHIR engine, each as its own process logging at
debug level as JSON. Every log line is scanned for each patient's names and birth date and for
every free-text string of the input: none may appear."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.fhir_server.load import export, put_all
from tests.integration.live import settings_for
from tests.synthetic import PopulationSpec, generate

ROOT = Path(__file__).resolve().parents[2]
PHRASES = (
    "mentioned her sister's chemotherapy at St Jude's",
    "lives alone above the bakery on Rue Cler",
    "asked that results go to her partner Tomasz first",
)


def phi_rich_population() -> tuple[list[dict[str, Any]], set[str], set[str]]:
    """The demo population with PHI in every free-text field; (resources, names, other PHI strings)."""
    resources = list(generate(PopulationSpec(patients=40, seed=1, corrections=0.0)))
    people: dict[str, tuple[str, str]] = {}  # Patient/id -> (full name, birth date)
    names: set[str] = set()
    texts: set[str] = set()
    for r in resources:
        if r["resourceType"] == "Patient":
            (name,) = r["name"]
            full = " ".join([*name["given"], name["family"]])
            people[f"Patient/{r['id']}"] = (full, r["birthDate"])
            names.update([*name["given"], name["family"]])
            texts.update([full, r["birthDate"]])
            phone, street = (
                f"+33 1 45 {len(people):02d} 77 {len(people) + 10:02d}",
                f"{len(people) + 3} Rue Cler, Paris",
            )
            r["telecom"] = [{"system": "phone", "value": phone}]
            r["address"] = [{"line": [street], "city": "Paris"}]
            r["text"] = {
                "status": "generated",
                "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{full}, born {r["birthDate"]}</div>',
            }
            texts.update([phone, street])
    for n, r in enumerate(resources):
        subject = (r.get("subject") or {}).get("reference")
        if subject not in people:
            continue
        full, born = people[subject]
        note = f"{full} (born {born}) {PHRASES[n % len(PHRASES)]}"
        if r["resourceType"] == "Observation":
            r["note"] = [{"text": note}]
            r["interpretation"] = [{"text": f"discussed with {full} by phone"}]
            if "valueString" in r:
                r["valueString"] = f"<0.1 — {full} says the sample clotted"
                texts.add(r["valueString"])
            texts.update([note, r["interpretation"][0]["text"]])
        elif r["resourceType"] == "DiagnosticReport":
            r["conclusion"] = f"Reviewed for {full}, born {born}"
            texts.add(r["conclusion"])
    texts.update(PHRASES)
    return resources, names, texts


def assert_no_phi(lines: list[str], names: set[str], texts: set[str]) -> None:
    assert lines, "nothing was logged: the scan would prove nothing"
    name_pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(names))) + r")\b")
    for line in lines:
        json.loads(line)  # one JSON object a line
        found = name_pattern.search(line)
        assert found is None, f"a patient name in the log: {found.group()!r} in {line[:300]}"
        for text in texts:
            assert text not in line, f"PHI in the log: {text!r} in {line[:300]}"


def _env() -> dict[str, str]:
    return {**os.environ, "NEUTROWATCH_LOGGING__FORMAT": "json", "NEUTROWATCH_LOGGING__LEVEL": "debug"}


def test_replay_logs_carry_no_phi(tmp_path):
    resources, names, texts = phi_rich_population()
    data = tmp_path / "population.ndjson"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "replay",
            str(data),
            "--events",
            str(tmp_path / "e.jsonl"),
            "--alerts",
            str(tmp_path / "a.ndjson"),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.ndjson").read_bytes()  # alerts were decided: the population exercised the core
    assert_no_phi(done.stderr.splitlines(), names, texts)


def test_live_loop_logs_carry_no_phi(fhir_base_url, tmp_path):
    resources, names, texts = phi_rich_population()
    put_all(fhir_base_url, resources)
    settings = settings_for(fhir_base_url, tmp_path / "state.sqlite3", page_size=500)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    lines: list[str] = []
    for _ in range(2):  # the second cycle finds nothing new
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "service", "once", "--config", str(config)],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        lines += done.stderr.splitlines()
        print(f"once: {time.perf_counter() - started:.1f} s")
    assert export(fhir_base_url, "Communication"), (
        "no alert written: the population did not exercise the loop"
    )
    assert any(
        '"observation rejected"' in line for line in lines
    )  # the noisy results were logged, by id and reason
    assert any('"fhir_response"' in line for line in lines)  # debug lines are in
    assert_no_phi(lines, names, texts)
    # Patient references are pseudonymised: no line ties a grade or a value to a patient's id
    patients = {f"Patient/{r['id']}" for r in resources if r["resourceType"] == "Patient"}
    decided = [line for line in lines if '"alert decided"' in line]
    assert decided and all('"Patient/~' in line for line in decided)
    for line in lines:
        for ref in re.findall(r"Patient/[A-Za-z0-9\-.]+", line):
            assert ref not in patients, f"a plain patient reference in the log: {line[:300]}"


def test_pseudonyms_are_stable_per_key_and_canonical():
    """One key: one pseudonym per patient whatever the spelling of its reference (versioned,
    absolute); another key: another pseudonym; the id itself never appears."""
    from service.logging import Pseudonyms

    a, b = Pseudonyms(b"k1"), Pseudonyms(b"k2")
    spellings = ["Patient/p-17", "Patient/p-17/_history/3", "https://fhir.example.org/r4/Patient/p-17"]
    assert len({a.text(s) for s in spellings}) == 1
    assert a.text("Patient/p-17") != b.text("Patient/p-17") and "p-17" not in a.text("see Patient/p-17 now")
    assert a.text("Observation/o-1") == "Observation/o-1"
    assert Pseudonyms(None).ephemeral and not a.ephemeral


def test_pseudonym_command_matches_the_logs(tmp_path, monkeypatch, capsys):
    """`neutrowatch pseudonym Patient/x` prints the pseudonym the logs use under the configured key."""
    from service.__main__ import main
    from service.logging import Pseudonyms

    monkeypatch.setenv("NEUTROWATCH_LOGGING__PSEUDONYM_KEY", "deployment-key")
    assert main(["pseudonym", "Patient/p-17"]) == 0
    assert capsys.readouterr().out.strip() == Pseudonyms(b"deployment-key").text("Patient/p-17")
    monkeypatch.delenv("NEUTROWATCH_LOGGING__PSEUDONYM_KEY")
    assert main(["pseudonym", "Patient/p-17"]) == 2  # no key: pseudonyms change with each process


def test_phi_keys_are_redacted_at_any_depth():
    import structlog

    from service import logging as nw_logging
    from tests.hostile.logs import captured_logs

    with captured_logs("debug") as buffer:
        structlog.get_logger("t").warning(
            "resource passed whole",
            observation="Observation/1",
            resource={"id": "1", "note": [{"text": "Jane Doe"}], "subject": {"display": "Jane Doe"}},
            contained=[{"name": [{"family": "Doe"}], "birthDate": "1970-01-01"}],
        )
    line = buffer.getvalue()
    assert "Observation/1" in line and '"id": "1"' in line
    assert "Doe" not in line and "1970" not in line
    assert nw_logging.drop_phi(None, "", {"events": {"new": 1}}) == {"events": {"new": 1}}
