"""`explain`: the decision trail of one patient. Table-driven over hand-built inputs: the
rule named for each event, the steps' outcomes, and — for every case and for a synthetic population —
the events equal what replay writes for that patient (replay is the oracle; explain must agree).

Expected values come from the rules table of the README (sources there): bands from grading.py's
schemes (reference §3), fever >= 38.3 once or >= 38.0 over 1 h within 24 h of ANC < 500 (IDSA 2010,
ASCO/IDSA 2018), the falling proxy (default), chronic after 91 days (a local default), infant/neonate
and individual thresholds (reference §3), corrections (reference §1.5)."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from service.__main__ import main
from service.config import Settings, load_settings
from service.core.reasons import FeverConsidered, FeverRule, NotFebrile
from service.explain import Trail, explain_inputs, render_text, trail_json, write_png
from service.explain.prose import fever_note
from tests.builders import observation
from tests.synthetic import PopulationSpec, generate

UCUM = "http://unitsofmeasure.org"


def at(day: int, minutes: int = 0) -> str:
    """08:00 UTC on `day` of March 2026, plus `minutes`."""
    t = datetime(2026, 3, 1, 8, tzinfo=UTC) + timedelta(days=day - 1, minutes=minutes)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp(day: int, minutes: int = 0) -> str:
    return at(day, minutes).replace("Z", ".000Z")


def cbc(
    pid: str,
    day: int,
    anc: float | None,
    *,
    wbc: float = 4.0,
    unit: str = "10*3/uL",
    minutes: int = 0,
    arrives: int = 120,
    version: str = "1",
    status: str = "final",
    anc_kw: dict[str, Any] | None = None,
) -> list[dict]:
    """WBC + 751-8 collected on `day`, available `arrives` minutes later."""
    common = dict(
        patient=f"Patient/{pid}", effective=at(day, minutes), specimen=f"Specimen/{pid}-{day}-{minutes}"
    )
    upd = stamp(day, minutes + arrives)
    return [
        observation("6690-2", wbc, "10*3/uL", id=f"{pid}-{day}-{minutes}-wbc", updated=upd, **common),
        observation(
            "751-8",
            anc,
            unit,
            id=f"{pid}-{day}-{minutes}-anc",
            updated=upd,
            version=version,
            status=status,
            **common,
            **(anc_kw or {}),
        ),
    ]


def temp(pid: str, day: int, minutes: int, celsius: float) -> dict:
    return observation(
        "8310-5",
        celsius,
        "Cel",
        id=f"{pid}-t-{day}-{minutes}",
        patient=f"Patient/{pid}",
        effective=at(day, minutes),
        updated=stamp(day, minutes + 5),
        specimen=None,
    )


def corrected(obs: dict, day: int, minutes: int, **changes: Any) -> dict:
    """A later version of `obs`, available at day/minutes."""
    return {**obs, "meta": {"versionId": "2", "lastUpdated": stamp(day, minutes)}, **changes}


# -- the cases -----------------------------------------------------------------------------------------

NEW = "new: neutropenic with no open episode"
WORSE = "worsening: worse than the worst alerted"
RESOLVED = "resolved: back in the normal band"
RECOVERING = "recovering: normal, not yet confirmed"
INTERRUPTED = "recovering: neutropenic again"
RECURRENCE = "recurrence: neutropenic soon after the announced resolution"
LEGACY_RESOLUTION = {"confirmations": 1, "min_hours": 0, "reopen_days": 0, "memory_days": 0}


def _episode() -> list[dict]:
    first = cbc(
        "a",
        2,
        1.2,
        unit="K/uL",
        anc_kw={"valueQuantity": {"value": 1.2, "unit": "K/uL", "system": "http://example.org/units"}},
    )
    return first + cbc("a", 4, 0.3) + cbc("a", 6, 0.4) + cbc("a", 8, 2.0) + cbc("a", 10, 0.8)


def _corrected() -> list[dict]:
    panel = cbc("f", 3, 0.4)
    fix = corrected(
        panel[1],
        3,
        300,
        status="corrected",
        valueQuantity={"value": 1.8, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"},
    )
    return panel + [fix]


def _entered_in_error() -> list[dict]:
    panel = cbc("g", 3, 0.4)
    wrong = corrected(panel[1], 3, 300, status="entered-in-error")
    del wrong["valueQuantity"]
    return panel + [wrong]


def _rejections() -> list[dict]:
    return [
        *cbc("h", 2, 0.3, unit="bananas/uL"),  # the ANC is rejected as an input; its WBC alone has no ANC
        *cbc("h", 4, 3.0, wbc=1.0),  # ANC 3000 > WBC 1000: the panel is rejected
        *cbc(
            "h",
            6,
            0.1,
            anc_kw={
                "valueQuantity": {
                    "value": 0.1,
                    "comparator": "<",
                    "unit": "10*3/uL",
                    "system": UCUM,
                    "code": "10*3/uL",
                }
            },
        ),
    ]


@dataclass
class Case:
    name: str
    patient: str
    resources: list[dict]
    rules: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    outcomes: list[str] | None = None  # the steps' outcomes, in order
    check: Any = None  # more assertions on the Trail


def _check_episode(t: Trail) -> None:
    first = t.steps[0]
    anc = next(i for i in first.inputs if i.code == "751-8")
    assert anc.given is not None and anc.given.describe() == "1.2 K/uL [not UCUM]"
    assert (anc.value, anc.unit, anc.role) == (1200.0, "/uL", "ANC source")
    assert first.before["open"] is False and first.after["open"] is True
    assert first.grade == {
        "scheme": "default",
        "label": "mild",
        "severity": "mild",
        "rank": 1,
        "range": "1000-<1500",
        "threshold_rule": "scheme",
    }
    assert "not worse than the worst alerted (severe)" in t.steps[2].note
    assert t.steps[3].grade["range"] == ">= 1500"


def _check_recovering(t: Trail) -> None:
    assert "recovering (1 of 3 confirmations)" in t.steps[1].events[0].detail
    assert "recovery interrupted" in t.steps[2].events[0].detail


def _check_stale(t: Trail) -> None:
    assert "collected before the newest assessed panel" in t.steps[1].note


def _check_corrected(t: Trail) -> None:
    again = t.steps[1]
    assert again.revision_of == 1 and "version 2 arrived (corrected)" in again.trigger
    assert "withdraws new severe (ANC 400/uL" in again.events[0].detail
    assert [i.version for i in again.inputs if i.code == "751-8"] == ["2"]


def _check_rejections(t: Trail) -> None:
    (bad,) = t.rejected_inputs
    assert bad.reason == "unit 'bananas/uL' is not a cell count unit for LOINC 751-8"
    assert bad.inputs[0].given.describe() == "0.3 bananas/uL"
    rejected = next(s for s in t.steps if s.outcome == "rejected")
    assert rejected.reason == "ANC 3000/uL exceeds WBC 1000/uL" and not rejected.events
    at_most = t.steps[-1]
    assert at_most.anc["at_most"] is True and at_most.anc["value"] == 100
    assert next(i for i in at_most.inputs if i.code == "751-8").given.describe() == "<0.1 10*3/uL"


def _check_threshold(t: Trail) -> None:
    assert t.steps[0].grade["scheme"] == "default, threshold 1000"
    assert t.steps[0].grade["threshold_rule"] == "individual threshold 1000 (config)"
    assert t.steps[0].note == "no event: not neutropenic and no open episode"


def _unused_temperatures() -> list[dict]:
    """A reading collected after it was recorded (a panel of its own, rejected for its time) and
    one entered in error: the core uses neither."""
    future = observation(
        "8310-5",
        38.9,
        "Cel",
        id="z-t-future",
        patient="Patient/z",
        effective=at(3, 600),
        updated=stamp(3, 100),
        specimen=None,
    )
    entered = observation(
        "8310-5",
        39.2,
        "Cel",
        id="z-t-eie",
        patient="Patient/z",
        effective=at(3, 200),
        updated=stamp(3, 210),
        specimen=None,
        status="entered-in-error",
    )
    return cbc("z", 3, 0.3) + [future, entered]


def _check_unused_temperatures(t: Trail) -> None:
    assert t.steps[0].note == (
        "panel rejected: collection time later than the result was recorded; a rejected panel never alerts"
    )
    assert t.steps[2].note == "no fever"


def _check_v6(t: Trail) -> None:
    assert t.steps[0].grade["label"] == "grade 4" and t.steps[0].grade["range"] == "< 100"
    assert t.steps[1].grade["label"] == "grade 3" and t.steps[1].grade["range"] == "100-<500"


CASES = [
    # one normal panel resolving (the former rule, set explicitly: reference §3 "Resolution and recurrence")
    Case(
        "episode",
        "a",
        _episode(),
        [NEW, WORSE, RESOLVED, NEW],
        outcomes=["assessed"] * 5,
        check=_check_episode,
        config={"clinical": {"resolution": LEGACY_RESOLUTION}},
    ),
    # the defaults (3 normal panels over 48 h, CIBMTR ANC recovery): recovering, then interrupted
    Case(
        "recovering",
        "r",
        cbc("r", 2, 0.3) + cbc("r", 4, 2.0) + cbc("r", 6, 0.8),
        [NEW, RECOVERING, INTERRUPTED],
        check=_check_recovering,
    ),
    # a drop within 7 days of the confirmed resolution re-opens the episode
    Case(
        "recurrence",
        "q",
        cbc("q", 2, 0.8) + cbc("q", 4, 2.0) + cbc("q", 5, 2.1) + cbc("q", 6, 2.2) + cbc("q", 8, 1.2),
        [NEW, RECOVERING, RECOVERING, RESOLVED, RECURRENCE],
    ),
    Case("no repeated alert", "b", cbc("b", 2, 0.8) + cbc("b", 4, 0.9) + cbc("b", 6, 0.7), [NEW]),
    Case(
        "stale panel",
        "s",
        cbc("s", 5, 0.8) + cbc("s", 3, 0.3, arrives=4 * 24 * 60),
        [NEW],
        outcomes=["assessed", "stale"],
        check=_check_stale,
    ),
    Case(
        "febrile, single reading",
        "c",
        cbc("c", 3, 0.3) + [temp("c", 3, 240, 38.6)],
        [NEW, "febrile: fever >= 38.3 within 24 h of ANC < 500"],
        outcomes=["assessed", "temperature"],
    ),
    Case(
        "febrile, sustained",
        "d",
        cbc("d", 3, 0.3) + [temp("d", 3, 240, 38.1), temp("d", 3, 310, 38.2)],
        [NEW, "febrile: fever >= 38.0 for 1 h within 24 h of ANC < 500"],
        check=lambda t: t.steps[-1].note == "fever (>= 38.0 Cel for 1 h)",
    ),
    Case(
        "febrile, falling",
        "e",
        cbc("e", 2, 1.9) + cbc("e", 3, 0.8) + [temp("e", 3, 60, 38.5)],
        [NEW, "febrile: fever >= 38.3 within 24 h of ANC < 1000 falling >= 50 % within 48 h"],
    ),
    Case(
        "fever without neutropenia",
        "n",
        cbc("n", 3, 2.5) + [temp("n", 3, 60, 39.0)],
        [],
        outcomes=[
            "temperature",
            "assessed",
        ],  # the reading is available (+65 min) before the panel (+120 min)
        check=lambda t: t.steps[0].note == "fever (>= 38.3 Cel); not febrile neutropenia: no open episode",
    ),
    Case(
        "corrected",
        "f",
        _corrected(),
        [NEW, "retracted: corrected result"],
        outcomes=["assessed", "assessed"],
        check=_check_corrected,
    ),
    Case(
        "entered in error",
        "g",
        _entered_in_error(),
        [NEW, "retracted: result entered in error"],
        outcomes=["assessed", "no-anc"],
    ),
    # the rejected ANC ties with its WBC on lastUpdated and comes first by reference
    Case(
        "rejections",
        "h",
        _rejections(),
        [NEW],
        outcomes=["rejected-input", "no-anc", "rejected", "assessed"],
        check=_check_rejections,
    ),
    Case(
        "neonate",
        "i",
        [{"resourceType": "Patient", "id": "i", "birthDate": "2026-03-01"}, *cbc("i", 3, 0.3)],
        [],
        outcomes=["not-assessed"],
        check=lambda t: "first 7 days" in t.steps[0].reason,
    ),
    # (replay applies a configured threshold only to a patient the input holds context for: see the report)
    Case(
        "individual threshold",
        "j",
        [{"resourceType": "Patient", "id": "j"}, *cbc("j", 2, 1.2), *cbc("j", 4, 0.8)],
        [NEW],
        config={"clinical": {"patient_thresholds": {"Patient/j": 1000}}},
        check=_check_threshold,
    ),
    Case(
        "chronic",
        "k",
        cbc("k", 1, 1.2) + cbc("k", 50, 1.3) + cbc("k", 95, 1.1),
        [NEW, "chronic: episode open more than 91 days"],
    ),
    Case(
        "ctcae-v6",
        "v",
        cbc("v", 2, 0.05) + cbc("v", 4, 0.3),
        [NEW],
        config={"grading": {"scheme": "ctcae-v6"}},
        check=_check_v6,
    ),
    Case(
        "temperatures the core does not use",
        "z",
        _unused_temperatures(),
        [NEW],
        outcomes=["rejected", "assessed", "temperature"],
        check=_check_unused_temperatures,
    ),
]


def write_ndjson(path: Path, resources: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    return path


def config_file(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def replay_events(tmp_path: Path, inputs: list[Path], config: Path, patient: str) -> list[dict]:
    """What replay (the default, partitioned engine, through the CLI) writes for the patient."""
    events = tmp_path / "events.jsonl"
    assert main(["replay", *map(str, inputs), "--events", str(events), "--config", str(config)]) == 0
    return [e for e in map(orjson.loads, events.read_bytes().splitlines()) if e["patient"] == patient]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_trail_names_the_rules_and_agrees_with_replay(tmp_path, case):
    data = write_ndjson(tmp_path / "in.ndjson", case.resources)
    config = config_file(tmp_path, case.config)
    trail = explain_inputs([data], case.patient, load_settings(config))
    assert trail.patient == f"Patient/{case.patient}"
    assert [e.rule for e in trail.events] == case.rules
    if case.outcomes is not None:
        assert [s.outcome for s in trail.steps] == case.outcomes
    if case.check is not None:
        assert case.check(trail) is not False
    # explain agrees with replay: the same records, in the same order
    records = msgspec.to_builtins(trail.records)
    assert records == replay_events(tmp_path, [data], config, f"Patient/{case.patient}")
    assert msgspec.to_builtins([e.record for e in trail.events]) == [
        r for r in records if r["event"] not in ("rejected", "not-assessed", "stale", "quarantined")
    ]
    text = render_text(trail)
    for rule in case.rules:
        assert f"rule: {rule}" in text


def test_a_synthetic_population_agrees_with_replay_patient_by_patient(tmp_path):
    resources = list(
        generate(PopulationSpec(patients=10, seed=3, days=70, corrections=0.05, temperatures=True))
    )
    data = write_ndjson(tmp_path / "pop.ndjson", resources)
    config = config_file(tmp_path, {"alerts": {"recipients": ["CareTeam/oncology"]}})
    events = tmp_path / "events.jsonl"
    assert main(["replay", str(data), "--events", str(events), "--config", str(config)]) == 0
    by_patient: dict[str, list[dict]] = {}
    for e in map(orjson.loads, events.read_bytes().splitlines()):
        by_patient.setdefault(e["patient"], []).append(e)
    settings = load_settings(config)
    kinds: set[str] = set()
    outcomes: set[str] = set()
    for r in resources:
        if r["resourceType"] != "Patient":
            continue
        trail = explain_inputs([data], r["id"], settings)
        assert msgspec.to_builtins(trail.records) == by_patient.get(f"Patient/{r['id']}", []), r["id"]
        kinds |= {e.kind for e in trail.events}
        outcomes |= {s.outcome for s in trail.steps}
        for e in trail.events:
            assert e.rule.startswith(f"{e.kind}: "), e.rule
    # the population exercises the interesting paths (corrections, fevers, rejections)
    assert {"new", "worsening", "resolved", "febrile"} <= kinds
    assert {"assessed", "temperature", "rejected-input"} <= outcomes


# -- the command line ----------------------------------------------------------------------------------------


@pytest.fixture
def episode_file(tmp_path) -> Path:
    return write_ndjson(
        tmp_path / "a.ndjson", _episode() + _corrected() + cbc("c", 3, 0.3) + [temp("c", 3, 240, 38.6)]
    )


def test_cli_text_and_json(episode_file, capsys):
    assert main(["explain", "Patient/a", "--input", str(episode_file)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Decision trail of Patient/a - scheme default\n")
    assert "rule: worsening: worse than the worst alerted" in out and "1.2 K/uL [not UCUM]" in out
    assert "recovering (1 of 3 confirmations)" in out  # the recovery shown in the trail
    assert "Patient/a" not in err  # nothing about the patient goes to the log
    assert main(["explain", "a", "--input", str(episode_file), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["patient"] == "Patient/a" and doc["scheme"] == "default"
    assert [e["event"] for e in doc["events"]] == ["new", "worsening", "recovering", "recovering"]
    assert [e["rule"] for s in doc["steps"] for e in s["events"]] == [NEW, WORSE, RECOVERING, INTERRUPTED]
    step = doc["steps"][0]
    assert {"inputs", "anc", "grade", "episode_before", "episode_after", "events", "note"} <= step.keys()
    anc = next(i for i in step["inputs"] if i["code"] == "751-8")
    assert anc["given"] == {"value": 1.2, "unit": "K/uL", "system": "http://example.org/units"}
    assert (anc["value"], anc["unit"], anc["role"]) == (1200.0, "/uL", "ANC source")


def test_cli_unknown_patient_is_a_one_line_error(episode_file, capsys):
    assert main(["explain", "Patient/nobody", "--input", str(episode_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neutrowatch: no monitored Observations of Patient/nobody") and "\n" not in err


def test_cli_without_input_needs_a_server(episode_file, tmp_path, capsys):
    assert main(["explain", "a", "--config", str(config_file(tmp_path, {}))]) == 2
    assert "fhir.base_url" in capsys.readouterr().err


# -- the PNG ----------------------------------------------------------------------------------------------


def _png(path: Path) -> Any:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(data) < 2_000_000, len(data)
    return mpimg.imread(path)


def test_png_timelines_are_drawn_and_differ_between_patients(tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np

    resources = list(generate(PopulationSpec(patients=6, seed=3, days=60, corrections=0.05)))
    data = write_ndjson(tmp_path / "pop.ndjson", resources)
    settings = Settings()
    images = []
    for pid in ("nw3-p00001", "nw3-p00002"):
        out = tmp_path / f"{pid}.png"
        write_png(explain_inputs([data], pid, settings), out)
        image = _png(out)
        assert image.shape[0] >= 600 and image.shape[1] >= 1000
        colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
        assert len(colours) > 50, "a timeline is not a single colour"
        images.append(image)
    assert images[0].shape != images[1].shape or not np.array_equal(images[0], images[1])


def test_png_from_the_cli_with_corrections_and_withdrawals(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = write_ndjson(
        tmp_path / "x.ndjson",
        cbc("x", 2, 1.2)
        + cbc("x", 4, 0.3)
        + [temp("x", 4, 300, 38.9)]
        + _corrected_for("x", 6)
        + _withdrawn_for("x", 8)
        + cbc("x", 10, 2.2),
    )
    out = tmp_path / "x.png"
    assert main(["explain", "x", "--input", str(data), "--png", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    _png(out)


def _corrected_for(pid: str, day: int) -> list[dict]:
    panel = cbc(pid, day, 0.9)
    return panel + [
        corrected(
            panel[1],
            day,
            400,
            status="corrected",
            valueQuantity={"value": 0.45, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"},
        )
    ]


def _withdrawn_for(pid: str, day: int) -> list[dict]:
    panel = cbc(pid, day, 0.2)
    wrong = corrected(panel[1], day, 400, status="entered-in-error")
    del wrong["valueQuantity"]
    return panel + [wrong]


def test_png_without_matplotlib_is_a_one_line_message(episode_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["explain", "a", "--input", str(episode_file), "--png", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "neutrowatch[explain]" in err
    assert not (tmp_path / "a.png").exists()


def test_json_is_the_trail(episode_file):
    trail = explain_inputs([episode_file], "a", Settings())
    doc = trail_json(trail)
    assert json.loads(json.dumps(doc)) == doc  # plain JSON
    assert doc["bands"][0] == {"label": "severe", "severity": "severe", "range": "< 500"}
    assert io.StringIO(render_text(trail)).readline().startswith("Decision trail of Patient/a")


def test_explain_finds_a_patient_under_every_spelling_of_its_reference(tmp_path):
    """`explain Patient/x` shows the results written with `Patient/x/_history/3` or with the
    absolute URL under the configured base too (reference §9): the same key replay uses."""
    base = "https://fhir.example.org/r4"
    first = cbc("sp", 1, 1.2)
    second = cbc("sp", 3, 0.3)
    for o in first:
        o["subject"]["reference"] = "Patient/sp/_history/3"
    for o in second:
        o["subject"]["reference"] = f"{base}/Patient/sp"
    data = tmp_path / "in.ndjson"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in first + second))
    settings = Settings(fhir={"base_url": base})
    for asked in ("sp", "Patient/sp", f"{base}/Patient/sp"):
        trail = explain_inputs([data], asked, settings)
        assert [e.kind for e in trail.events] == ["new", "worsening"], asked
        assert all(i.given is not None for s in trail.steps for i in s.inputs), asked


# -- the core's reasons in words ----------------------------------------------------------------------------

RULES = Settings().rules


@pytest.mark.parametrize(
    ("considered", "note"),
    [
        # thresholds: IDSA 2010 / ASCO-IDSA 2018 (reference §3), the defaults of rules.py
        (FeverConsidered(None), "no fever"),
        (
            FeverConsidered(None, high=True),
            "no fever yet: >= 38.0 Cel but below 38.3 and not sustained for 1 h",
        ),
        (FeverConsidered(FeverRule.SINGLE, febrile=True), "fever (>= 38.3 Cel)"),
        (FeverConsidered(FeverRule.SUSTAINED, febrile=True), "fever (>= 38.0 Cel for 1 h)"),
        (
            FeverConsidered(FeverRule.SINGLE, not_febrile=NotFebrile.NO_EPISODE),
            "fever (>= 38.3 Cel); not febrile neutropenia: no open episode",
        ),
        (
            FeverConsidered(FeverRule.SINGLE, not_febrile=NotFebrile.ALREADY_FEBRILE),
            "fever (>= 38.3 Cel); not febrile neutropenia: the episode is already febrile (once per episode)",
        ),
        (
            FeverConsidered(FeverRule.SUSTAINED, not_febrile=NotFebrile.ANC_NOT_LOW, newest_anc=1200.0),
            "fever (>= 38.0 Cel for 1 h); not febrile neutropenia: the newest ANC (1200/uL) is neither "
            "< 500 nor falling",
        ),
        (
            FeverConsidered(FeverRule.SINGLE, not_febrile=NotFebrile.TOO_FAR),
            "fever (>= 38.3 Cel); not febrile neutropenia: more than 24 h from the newest ANC",
        ),
    ],
)
def test_each_fever_judgement_is_put_in_words(considered, note):
    """explain renders the fever judgement the core returned, one sentence per reason."""
    assert fever_note(considered, RULES) == note
