"""`alerts.claim_profiles`: whether what the service writes claims the project's profiles
(meta.profile). A server that validates claims resolves each claimed StructureDefinition
(https://hl7.org/fhir/R4/profiling.html: "claims of conformance"), so a deployment whose server
cannot must be able to write without them. Replay follows the same setting as the live loop (both
build through service/output/alerts.py)."""

from __future__ import annotations

import orjson
import pytest

from service.__main__ import main
from tests.unit.test_replay import cbc, write_ndjson


@pytest.mark.parametrize("claim", [True, False])
def test_replay_claims_profiles_only_when_configured(tmp_path, claim):
    """With claim_profiles false no Flag, Communication or Provenance carries meta.profile, the
    Provenance keeps its idempotency tag, and the extensions stay (valid without the profile)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"alerts:\n  claim_profiles: {str(claim).lower()}\n")
    inp = write_ndjson(tmp_path / "in.ndjson", cbc("Patient/p1", 2, 3.2) + cbc("Patient/p1", 6, 0.8))
    alerts = tmp_path / "alerts.ndjson"
    assert (
        main(
            [
                "replay",
                str(inp),
                "--events",
                str(tmp_path / "events.jsonl"),
                "--alerts",
                str(alerts),
                "--provenance",
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    written = [orjson.loads(line) for line in alerts.read_bytes().splitlines()]
    assert [r["resourceType"] for r in written] == ["Flag", "Communication", "Provenance"]
    for r in written:
        claimed = (r.get("meta") or {}).get("profile")
        if claim:
            assert claimed == [
                f"https://neutrowatch.example.org/fhir/StructureDefinition/neutrowatch-{r['resourceType'].lower()}"
            ]
        else:
            assert claimed is None
        assert r.get("extension"), "the extensions stay"
    assert written[2]["meta"]["tag"][0]["system"] == "https://neutrowatch.example.org/fhir/provenance"
