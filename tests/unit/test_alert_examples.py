"""docs/examples/ holds a Flag, a Communication and a Provenance generated from a replay
(scripts/alert_examples.py): they must be up to date, and be the rich example they claim to be."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "alert_examples.py"
EXAMPLES = ROOT / "docs" / "examples"


def _check(output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_the_committed_examples_are_up_to_date():
    done = _check(EXAMPLES)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\nrun: python scripts/alert_examples.py"


def test_check_fails_on_a_stale_or_missing_example(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "Communication.json"
    path.write_text(path.read_text().replace('"stat"', '"asap"'))
    (tmp_path / "Provenance.json").unlink()
    done = _check(tmp_path)
    assert done.returncode == 1 and "2 example(s) out of date" in done.stderr
    assert '-  "priority": "asap",' in done.stdout and '+  "priority": "stat",' in done.stdout


def test_the_examples_are_one_febrile_write():
    flag, comm, prov = (
        json.loads((EXAMPLES / f"{t}.json").read_text()) for t in ("Flag", "Communication", "Provenance")
    )
    assert (flag["resourceType"], comm["resourceType"], prov["resourceType"]) == (
        "Flag",
        "Communication",
        "Provenance",
    )
    assert flag["code"]["coding"][0]["code"] == "409089005" and comm["priority"] == "stat"
    # The Provenance targets this Flag and this Communication, is tagged with the announcement's key,
    # and names the results the Communication is about (versioned), then the temperature.
    assert [t["identifier"] for t in prov["target"]] == [flag["identifier"][0], comm["identifier"][0]]
    assert [t["reference"][:9] for t in prov["target"]] == ["urn:uuid:", "urn:uuid:"]
    assert prov["meta"]["tag"][0]["code"] == comm["identifier"][0]["value"]
    entities = [e["what"]["reference"] for e in prov["entity"]]
    about = [a["reference"] for a in comm["about"][1:]]
    assert [e.split("/_history/")[0] for e in entities[:-1]] == about and all(
        "/_history/" in e for e in entities[:-1]
    )
    assert entities[-1] not in about
    assert prov["recorded"] == comm["sent"]
    assert all(
        json.dumps(r, indent=2, ensure_ascii=False) + "\n"
        == (EXAMPLES / f"{r['resourceType']}.json").read_text()
        for r in (flag, comm, prov)
    ), "pretty-printed, as the script writes them"
