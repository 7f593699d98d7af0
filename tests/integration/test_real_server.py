"""The live loop against the engine behaving like a real server all at once: transactions processed
as batches, a request quota answered with 429 and no Retry-After, every few conditional creates
refused with 409 (a serialization failure), single entries of a batch refused, and the fault proxy
in front (5xx, resets, truncated answers, writes applied upstream but answered 502).

What must hold (reference §5): the Flags, Communications and Provenance on the server are what
replay predicts; every Provenance target exists; and no alert waits more than one extra cycle.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from service import metrics
from service.config import Settings
from tests.chaos import proxy as px
from tests.fhir_server.engine import FhirEngine
from tests.fhir_server.load import export, put_all
from tests.hostile.test_live_hostile import counter, delta
from tests.integration.live import compare_with_oracle, cycle, population, settings_for

pytestmark = pytest.mark.integration


def _plan() -> px.FaultPlan:
    """Faults a client must ride out within a cycle (retried), at rates a busy network shows."""
    return px.FaultPlan(
        {
            px.SEARCH: {px.HTTP_500: 0.02, px.HTTP_503: 0.02, px.RESET: 0.02},
            px.READ: {px.HTTP_502: 0.02, px.RESET: 0.02},
            px.WRITE: {px.HTTP_503: 0.04, px.RESET: 0.03, px.APPLIED_502: 0.06},
        }
    )


@pytest.fixture
def real_like_engine(start_engine: Any) -> FhirEngine:
    return start_engine(
        batch_transactions=True, quota_points_per_minute=800, quota_window_seconds=1, conflict_every=4
    )  # type: ignore[no-any-return]  # start_engine returns the engine


async def test_batch_server_with_quota_conflicts_and_faults_matches_replay(
    real_like_engine: FhirEngine, tmp_path
):
    """Batch transactions + quota without Retry-After + 409 on conditional creates + refused batch
    entries + network faults: after the first cycle and at most one more, the server holds exactly
    the alerts replay predicts, one Provenance per write, none pointing at a missing resource."""
    engine = real_like_engine
    put_all(engine.base_url, population(patients=10, days=28, seed=21))
    engine.fault("Communication", times=2)  # two Communication entries of a batch refused for real (409)
    proxy = px.Proxy(engine.base_url, seed=20261204, plan=_plan())
    await proxy.start()
    retries = counter("neutrowatch_fhir_retries_total", "reason")
    nonatomic = metrics.NONATOMIC_TRANSACTIONS._value.get()  # noqa: SLF001 - a counter's current value
    try:
        data = settings_for(proxy.base, tmp_path / "s.sqlite3").model_dump(mode="json", exclude_none=True)
        data["fhir"]["retry"].update(
            max_attempts=6, backoff_base_seconds=0.05, backoff_max_seconds=0.5, quota_window_seconds=1
        )
        settings = Settings(**data)
        first = await cycle(settings)
        reports = [first] if first.delivered_all else [first, await cycle(settings)]
        assert reports[-1].delivered_all, "an alert waited more than one extra cycle"
        again = await cycle(settings)
        assert again.delivered_all and again.written == 0
    finally:
        await proxy.stop()
    stats = engine.stats()
    assert stats["throttled"] > 0 and stats["conflicts"] > 0, stats  # the quota and the 409s were met
    assert sum(proxy.counts.values()) > 0, "no network fault was injected"
    retried = delta(counter("neutrowatch_fhir_retries_total", "reason"), retries)
    assert retried["429"] > 0 and (retried["409"] + retried["40001"]) > 0, retried
    assert metrics.NONATOMIC_TRANSACTIONS._value.get() > nonatomic  # noqa: SLF001 - a mixed batch answer was repaired

    counts = compare_with_oracle(engine.base_url, tmp_path / "oracle")
    assert counts["communications"] > 0
    flags = {f"Flag/{f['id']}" for f in export(engine.base_url, "Flag")}
    comms = {f"Communication/{c['id']}" for c in export(engine.base_url, "Communication")}
    provenances = export(engine.base_url, "Provenance")
    targets = [t["reference"] for p in provenances for t in p["target"]]
    dangling = [t for t in targets if t not in flags | comms]
    assert not dangling, f"Provenance targets that do not exist: {dangling[:5]}"
    per_comm = Counter(t for t in targets if t.startswith("Communication/"))
    assert set(per_comm) == comms and set(per_comm.values()) == {1}  # one Provenance per Communication
