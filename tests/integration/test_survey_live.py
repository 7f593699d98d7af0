"""`survey --server` against the real FHIR engine: a bounded, read-only, paged sample of the
server's Observations; and the live loop's count of results that reached no assessment
(`neutrowatch_unassessed_results_total{reason}`), the same reasons as replay's summary."""

from __future__ import annotations

import gzip
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import metrics
from service.__main__ import main
from tests.builders import observation
from tests.fhir_server.load import export, put_all
from tests.integration.live import cycle, settings_for

MIMIC = Path(__file__).resolve().parents[1] / "data" / "mimic-iv-demo-cbc" / "Observation.ndjson.gz"


def _mimic(n: int) -> list[dict[str, Any]]:
    with gzip.open(MIMIC, "rb") as fh:
        return [orjson.loads(line) for line in islice(fh, n)]


def _config(tmp_path: Path, base_url: str, page_size: int = 50) -> Path:
    path = tmp_path / "survey.yaml"
    path.write_text(f"fhir:\n  base_url: {base_url}\n  allow_insecure_http: true\n  page_size: {page_size}\n")
    return path


def _survey(tmp_path: Path, config: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "survey.json"
    assert main(["survey", "--server", "--config", str(config), "--json", str(out), *args]) == 0
    return orjson.loads(out.read_bytes())


def test_server_survey_reads_a_bounded_sample_and_changes_nothing(fhir_base_url, tmp_path, capsys):
    """--max N reads at most N Observations (over several pages); without a tighter bound every one
    is read and counted by code as in the files; --since bounds by meta.lastUpdated; the server holds
    the same resources afterwards (searches only)."""
    resources = _mimic(300)
    put_all(fhir_base_url, resources)
    config = _config(tmp_path, fhir_base_url)
    sample = _survey(tmp_path, config, "--max", "120")
    assert sample["source"] == {
        "kind": "server",
        "resources": 120,
        "observations": 120,
        "undecodable": 0,
        "other_types": {},
    }
    whole = _survey(tmp_path, config, "--max", "1000", "--since", "1d")
    counted = {entry["code"]: entry["count"] for entry in whole["observations"]}
    assert counted == Counter(r["code"]["coding"][0]["code"] for r in resources)
    wbc = next(u for u in whole["unmonitored"] if u["code"] == "51301")
    assert wbc["candidate"]["loinc"] == "6690-2"  # reference §1.1
    assert "candidate: LOINC 6690-2" in capsys.readouterr().out
    assert len(export(fhir_base_url, "Observation")) == 300
    assert export(fhir_base_url, "ConceptMap") == []


def test_server_survey_without_base_url_is_refused(tmp_path, capsys, monkeypatch):
    """No fhir.base_url: one line naming it, exit 2."""
    monkeypatch.delenv("NEUTROWATCH_FHIR__BASE_URL", raising=False)
    assert main(["survey", "--server"]) == 2
    assert "fhir.base_url" in capsys.readouterr().err


def _unassessed(reason: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("neutrowatch_unassessed_results_total", {"reason": reason}) or 0.0
    )


@pytest.mark.parametrize(
    ("resources", "reason", "count"),
    [
        # The ANC needs a neutrophil result of the same draw (reference §2)
        (
            [
                observation("6690-2", 3.0, id="u-wbc", specimen="Specimen/u1"),
                observation("718-7", 9.0, "g/dL", id="u-hb", specimen="Specimen/u1"),
            ],
            "panel without an ANC: WBC without a differential",
            2,
        ),
        # A contained subject names no patient on the server (FHIR R4 references.html#literal)
        ([observation("6690-2", 3.0, id="u-contained", patient="#p1")], "unresolvable reference", 1),
    ],
)
async def test_live_loop_counts_results_without_an_assessment(
    fhir_base_url, tmp_path, resources, reason, count
):
    """A cycle that reads results which reach no assessment counts them by reason in /metrics."""
    before = _unassessed(reason)
    put_all(fhir_base_url, resources)
    report = await cycle(settings_for(fhir_base_url, tmp_path / "s.sqlite3"))
    assert report.written == 0
    assert _unassessed(reason) - before == count
