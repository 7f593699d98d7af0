"""No silent drops: replay's summary counts every result that reached no assessment, by reason (both
engines alike), ends with a human-readable table, and shows progress only on a terminal."""

from __future__ import annotations

import io
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.__main__ import main
from service.config import Settings
from service.core.episodes import PatientState
from service.core.panels import PanelDecision
from service.core.undecided import panel_unassessed
from service.replay.engine import Replay
from service.replay.progress import Progress
from tests.builders import observation, result

# (name, resources, expected counts by reason). Reasons: service/core/undecided.py. The ANC needs a
# WBC and a neutrophil result of one draw (reference §2); only final, amended and corrected results
# are assessed (reference §1.5); codes by system and code only (reference §1.1).
CASES: list[tuple[str, list[dict[str, Any]], dict[str, int]]] = [
    (
        "WBC without a differential",
        [
            observation("6690-2", 3.0, id="w", specimen="Specimen/a"),
            observation("718-7", 9.0, "g/dL", id="h", specimen="Specimen/a"),
        ],
        {"panel without an ANC: WBC without a differential": 2},
    ),
    (
        "bands without a WBC",
        [observation("764-1", 5.0, "%", id="b", specimen="Specimen/a")],
        {"panel without an ANC: differential without a WBC": 1},
    ),
    (
        "neutrophil % without a WBC (also a rejection)",
        [observation("770-8", 40.0, "%", id="n", specimen="Specimen/a")],
        {"panel without an ANC: differential without a WBC": 1},
    ),
    (
        "preliminary differential",
        [
            observation("6690-2", 3.0, id="w", specimen="Specimen/a"),
            observation("770-8", 40.0, "%", id="n", specimen="Specimen/a", status="preliminary"),
        ],
        {"status not assessed": 1, "panel without an ANC: WBC without a differential": 1},
    ),
    ("code not monitored", [observation("2345-7", 5.0, "mmol/L", id="g")], {"code not monitored": 1}),
    ("granulocytes", [observation("30394-1", 2.0, id="gr")], {"granulocyte count is not an ANC": 1}),
    ("contained subject", [observation("6690-2", 3.0, id="w", patient="#p1")], {"unresolvable reference": 1}),
    ("not a lab result", [{"resourceType": "Encounter", "id": "e1"}], {"not a lab result": 1}),
    (
        "assessed panel",
        [
            observation("6690-2", 3.0, id="w", specimen="Specimen/a"),
            observation("770-8", 40.0, "%", id="n", specimen="Specimen/a"),
        ],
        {},
    ),
]


def _write(tmp_path: Path, resources: list[dict[str, Any]]) -> Path:
    path = tmp_path / "in.ndjson"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    return path


@pytest.mark.parametrize("engine_name", ["partitioned", "sqlite"])
@pytest.mark.parametrize(("name", "resources", "expected"), CASES, ids=[c[0] for c in CASES])
def test_every_result_without_an_assessment_is_counted_by_reason(
    tmp_path, engine_name, name, resources, expected
):
    """Each input that reaches no graded assessment shows in `not_decided` under its reason."""
    settings = Settings()
    with Replay(settings.rules, settings.alerts, engine=engine_name, workers=1) as replay:
        stats = replay.run([_write(tmp_path, resources)], io.BytesIO())
    assert stats.not_decided() == expected


def test_a_panel_that_alerts_counts_nothing():
    """A decided panel (an event, an assessment) has nothing unassessed, whatever its members."""
    members = [result(observation("6690-2", 3.0, id="w")), result(observation("770-8", 10.0, "%", id="n"))]
    assert panel_unassessed(PanelDecision(PatientState(), assessed=True), members) == Counter()


def test_cli_logs_the_counts_and_on_a_terminal_ends_with_a_table(tmp_path, capsys, monkeypatch):
    """The summary log line carries `not_decided`. Off a terminal stderr holds JSON log lines only;
    on a terminal a table for people follows the log line."""
    path = _write(tmp_path, CASES[0][1] + CASES[4][1])
    assert main(["replay", str(path), "--events", str(tmp_path / "e.jsonl")]) == 0
    err = capsys.readouterr().err
    (log_line,) = err.splitlines()
    assert orjson.loads(log_line)["not_decided"] == {
        "code not monitored": 1,
        "panel without an ANC: WBC without a differential": 2,
    }
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["replay", str(path), "--events", str(tmp_path / "e.jsonl")]) == 0
    table = capsys.readouterr().err.split("results that reached no assessment")[1]
    rows = {line.rsplit(None, 1)[0].strip(): line.split()[-1] for line in table.splitlines() if line.strip()}
    assert rows == {"code not monitored": "1", "panel without an ANC: WBC without a differential": "2"}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_only():
    """On a terminal the line is rewritten in place (throttled, the last step always shown) and
    cleared at the end; elsewhere nothing is written."""
    ticks = iter([0.0, 0.1, 0.2, 0.3, 1.0])
    terminal = _Terminal()
    progress = Progress(terminal, interval=0.5, clock=lambda: next(ticks))
    progress("reading input", 1, 3)  # shown (first)
    progress("reading input", 2, 3)  # throttled
    progress("reading input", 3, 3)  # shown (last)
    progress.close()
    shown = terminal.getvalue()
    assert "reading input 1/3" in shown and "2/3" not in shown and "reading input 3/3" in shown
    assert shown.endswith("\r")
    quiet = io.StringIO()
    off = Progress(quiet)
    off("deciding", 1, 1)
    off.close()
    assert quiet.getvalue() == ""


def test_replay_reports_each_stage_to_progress(tmp_path):
    """The partitioned engine tells its progress (stage, done, total) for reading, ordering and deciding."""
    seen: list[tuple[str, int, int]] = []
    settings = Settings()
    with Replay(settings.rules, settings.alerts, workers=1) as replay:
        replay.progress = lambda stage, done, total: seen.append((stage, done, total))
        replay.run([_write(tmp_path, CASES[-1][1])], io.BytesIO())
    assert {stage for stage, _, _ in seen} == {"reading input", "ordering versions", "deciding"}
    assert all(done == total for _, done, total in seen)  # one task per stage here
