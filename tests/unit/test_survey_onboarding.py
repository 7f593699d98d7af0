"""Onboarding end to end on real hospital data (tests/data/mimic-iv-demo-cbc, local codes only):
`survey` proposes a draft ConceptMap; a reviewer accepts each proposal that is right and marks the
rest unmatched; with the reviewed map configured, replay decides exactly as it does with the
project's own reviewed map (tests/data/mimic-iv-demo-cbc/conceptmap.json), which decides exactly as
the same data with LOINC codings (tests/unit/test_mimic_terminology.py). The survey then reports the
mapped items as mapped."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import orjson

from service.__main__ import main
from service.config import Settings
from service.replay.engine import Replay
from tests import mimic

# The items a reviewer accepts, with the LOINC term each one is (loinc.org): the survey must have
# proposed exactly that term. 51300 "WBC Count" (16 results) is accepted as the table says whatever
# the draft proposed, as a reviewer would correct a target.
MAIN_ITEMS = ["51301", "51256", "51144", "52075", "51222", "51265", "223761", "223762"]


def review(draft: dict[str, Any]) -> dict[str, Any]:
    """What the engineer does with the draft: `equivalent` where the table agrees, else `unmatched`."""
    reviewed = copy.deepcopy(draft)
    reviewed.update(status="active", url="https://example.org/fhir/ConceptMap/reviewed-draft")
    for group in reviewed["group"]:
        for element in group["element"]:
            term = mimic.LOINC_OF_ITEM.get((group["source"], element["code"]))
            loinc = term[0] if term else None
            if loinc is None:
                element["target"] = [{"equivalence": "unmatched"}]
                continue
            target = element["target"][0]
            if element["code"] in MAIN_ITEMS:
                assert target["code"] == loinc, f"survey proposed {target['code']} for {element['code']}"
            target.update(code=loinc, equivalence="equivalent")
            target.pop("comment", None)
    return reviewed


def replay(tmp_path: Path, concept_map: Path) -> tuple[list[dict[str, Any]], bytes]:
    settings = Settings(terminology={"concept_maps": [concept_map], "units": mimic.units_config()})
    events, alerts = io.BytesIO(), io.BytesIO()
    with Replay(settings.rules, settings.alerts, read_policy=settings.read_policy) as run:
        run.run([str(mimic.OBSERVATIONS), str(mimic.PATIENTS)], events, alerts)
    return [orjson.loads(line) for line in events.getvalue().splitlines()], alerts.getvalue()


def test_a_reviewed_survey_draft_decides_as_the_projects_map(tmp_path, capsys):
    """survey -> draft -> review -> replay: the same decisions and alerts as the project's map."""
    draft_path = tmp_path / "draft.json"
    main(["survey", str(mimic.OBSERVATIONS), str(mimic.PATIENTS), "--draft-conceptmap", str(draft_path)])
    capsys.readouterr()
    reviewed_path = tmp_path / "reviewed.json"
    reviewed_path.write_text(json.dumps(review(json.loads(draft_path.read_text()))))

    mine, mine_alerts = replay(tmp_path, reviewed_path)
    theirs, their_alerts = replay(tmp_path, mimic.CONCEPT_MAP)

    def without_map(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "mapped_codes"} for e in events]

    assert without_map(mine) == without_map(theirs)
    assert mine_alerts == their_alerts
    assert sum(e["event"] == "new" for e in mine) > 10  # real episodes are found


def test_the_survey_reports_mapped_items_once_the_map_is_configured(tmp_path, capsys):
    """With the project's map configured, the monitored items are `mapped`, no longer candidates."""
    config = tmp_path / "site.yaml"
    config.write_text(
        json.dumps({"terminology": {"concept_maps": [str(mimic.CONCEPT_MAP)], "units": mimic.units_config()}})
    )
    out = tmp_path / "survey.json"
    main(
        ["survey", str(mimic.OBSERVATIONS), str(mimic.PATIENTS), "--config", str(config), "--json", str(out)]
    )
    capsys.readouterr()
    report = json.loads(out.read_text())
    unmonitored = {u["code"] for u in report["unmonitored"]}
    assert not unmonitored & set(MAIN_ITEMS)
    standing = {o["code"]: (o["standing"], o["loinc"]) for o in report["observations"]}
    for code in MAIN_ITEMS:
        system = mimic.CHARTEVENTS if code.startswith("22") else mimic.LABITEMS
        assert standing[code] == ("mapped", mimic.LOINC_OF_ITEM[(system, code)][0])
