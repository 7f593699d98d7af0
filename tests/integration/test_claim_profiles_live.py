"""`alerts.claim_profiles: false` in the live loop against the real engine: the Flags,
Communications and Provenance on the server claim no profile (a server that validates claims then
needs no StructureDefinitions), and they are still exactly what replay predicts."""

from __future__ import annotations

from tests.fhir_server.load import export, put_all
from tests.integration.live import compare_with_oracle, cycle, population, settings_for


async def test_the_live_loop_writes_without_profile_claims_when_told(fhir_base_url, tmp_path):
    """No meta.profile on anything written; the Provenance keeps its tag; replay's prediction holds."""
    put_all(fhir_base_url, population(patients=4, days=28, seed=5))
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    settings = settings.model_copy(
        update={"alerts": settings.alerts.model_copy(update={"claim_profiles": False})}
    )
    report = await cycle(settings)
    assert report.delivered_all and report.written > 0
    written = {kind: export(fhir_base_url, kind) for kind in ("Flag", "Communication", "Provenance")}
    assert all(written.values())
    assert [r for rs in written.values() for r in rs if (r.get("meta") or {}).get("profile")] == []
    assert all(p["meta"]["tag"][0]["system"].endswith("/provenance") for p in written["Provenance"])
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")
