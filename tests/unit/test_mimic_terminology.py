"""Real hospital data with local codes only (tests/data/mimic-iv-demo-cbc, MIMIC-IV demo): read through
the project's ConceptMap (tests/data/mimic-iv-demo-cbc/conceptmap.json) and terminology.units, replay
decides EXACTLY as it does on the same data with LOINC codings added beside the local ones
(tests/mimic.py, LOINC codes from loinc.org) — every event, every alert — the events
differing only by the field naming the local code and the map. Without the map nothing is monitored."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.config import Settings
from service.replay.engine import Replay
from tests import mimic


def replay(
    tmp_path: Path, observations: list[dict[str, Any]], settings: Settings
) -> tuple[list[dict], bytes]:
    data = tmp_path / f"in-{id(observations)}.ndjson"
    data.write_bytes(b"".join(orjson.dumps(o) + b"\n" for o in observations))
    events, alerts = io.BytesIO(), io.BytesIO()
    with Replay(settings.rules, settings.alerts, read_policy=settings.read_policy) as run:
        run.run([str(data), str(mimic.PATIENTS)], events, alerts)
    return [orjson.loads(line) for line in events.getvalue().splitlines()], alerts.getvalue()


@pytest.fixture(scope="module")
def observations() -> list[dict[str, Any]]:
    return mimic.read_observations()


def settings(*, mapped: bool, segmented: bool = False) -> Settings:
    differential = {"differential": {"neutrophil_percent_with_bands_is_segmented": segmented}}
    terminology = {"concept_maps": [mimic.CONCEPT_MAP], "units": mimic.units_config()} if mapped else {}
    return Settings(terminology=terminology, clinical=differential)


@pytest.mark.parametrize("segmented", [False, True], ids=["default", "neutrophil-pct-with-bands-is-segs"])
def test_local_codes_through_the_map_decide_as_loinc_codings(tmp_path, observations, segmented):
    """Same events (but for `mapped_codes`), same alerts byte for byte, under both differential rules."""
    local, local_alerts = replay(tmp_path, observations, settings(mapped=True, segmented=segmented))
    loinc, loinc_alerts = replay(
        tmp_path,
        [mimic.with_loinc(o, display=False, ucum=False) for o in observations],
        settings(mapped=False, segmented=segmented),
    )
    assert [{k: v for k, v in e.items() if k != "mapped_codes"} for e in local] == loinc
    assert local_alerts == loinc_alerts
    alerted = [e for e in local if e["event"] in ("new", "worsening", "resolved", "recurrence", "febrile")]
    assert len(alerted) > 30  # real neutropenia episodes found (34 Communications: docs/clinical-quality.md)
    assert all(
        e["mapped_codes"]
        and all(
            m["concept_map"] == "https://neutrowatch.example.org/fhir/ConceptMap/mimic-iv-to-loinc"
            for m in e["mapped_codes"]
        )
        for e in alerted
    )


def test_without_the_map_nothing_is_monitored(tmp_path, observations):
    """Replayed as it is today: every result is "code not monitored", no event at all."""
    events, alerts = replay(tmp_path, observations, settings(mapped=False))
    assert (events, alerts) == ([], b"")


def test_the_differential_site_rule_on_a_real_manual_differential(tmp_path, observations):
    """Patient/10035631, 2112-09-19 06:15: WBC 3.3 K/uL, 51256 Neutrophils 30 %, 51144 Bands 6 %
    (a manual differential: bands reported). Default (reference §2, bands never added to 770-8): ANC
    3300 x 30 % = 990, a worsening to moderate; with the site rule the 30 % is segs: 3300 x 36 % =
    1188, mild, no worsening (the episode is already mild since 2112-09-18: 4700 x 26 % = 1222)."""
    mine = [o for o in observations if o["subject"]["reference"] == "Patient/10035631"]
    at = "2112-09-19T06:15:00-05:00"
    default, _ = replay(tmp_path, mine, settings(mapped=True))
    segs, _ = replay(tmp_path, mine, settings(mapped=True, segmented=True))
    assert [(e["event"], e["grade"], e["anc"], e["method"]) for e in default if e["effective"] == at] == [
        ("worsening", "moderate", 990, "wbc-x-neutrophil-pct")
    ]
    assert [e for e in segs if e["effective"] == at] == []
    first = next(e for e in segs if e["effective"] == "2112-09-18T03:15:00-05:00")
    assert (first["event"], first["grade"], first["anc"], first["method"]) == (
        "new",
        "mild",
        1222,
        "wbc-x-neutrophil-pct-as-segs+bands-pct",
    )


def test_explain_names_the_local_code_the_map_and_the_differential_rule(tmp_path, observations):
    """`explain` of a local-coded patient shows, beside each LOINC code, the local code and the map that
    translated it, and the site rule by the ANC method it names (reference §2, §11)."""
    from service.explain import explain_inputs, render_text

    mine = [
        o
        for o in observations
        if o["subject"]["reference"] == "Patient/10035631" and o["effectiveDateTime"].startswith("2112-09-1")
    ]
    data = tmp_path / "mine.ndjson"
    data.write_bytes(b"".join(orjson.dumps(o) + b"\n" for o in mine))
    text = render_text(
        explain_inputs([data, mimic.PATIENTS], "Patient/10035631", settings(mapped=True, segmented=True))
    )
    assert (
        f"770-8 (from {mimic.LABITEMS}|51256 by ConceptMap "
        "https://neutrowatch.example.org/fhir/ConceptMap/mimic-iv-to-loinc)"
    ) in text
    assert "by wbc-x-neutrophil-pct-as-segs+bands-pct" in text
