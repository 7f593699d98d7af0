"""The service's web endpoints and `check-config --probe`, against the real engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from aiohttp.test_utils import TestClient, TestServer

from service.live.app import Service
from service.live.web import make_app
from tests.fhir_server.load import put_all
from tests.integration.live import population, settings_for

ROOT = Path(__file__).resolve().parents[2]


async def test_health_readiness_and_metrics(fhir_base_url, tmp_path):
    put_all(fhir_base_url, population(patients=6, days=35, seed=2))
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    async with Service(settings) as service:
        assert await service.open_store() and await service.lead()
        async with TestClient(TestServer(make_app(service.ready))) as http:
            assert (await http.get("/healthz")).status == 200
            not_yet = await http.get("/readyz")
            assert not_yet.status == 503 and "no successful poll yet" in await not_yet.text()
            report = await service.cycle()
            assert report is not None and report.delivered_all and report.written > 0
            ready = await http.get("/readyz")
            assert ready.status == 200, await ready.text()
            text = await (await http.get("/metrics")).text()
    assert 'neutrowatch_polls_total{outcome="ok"}' in text
    assert "neutrowatch_alerts_total{" in text and 'event="new"' in text
    assert "neutrowatch_fhir_requests_total{" in text
    assert "neutrowatch_poll_lag_seconds" in text
    assert "Patient/" not in text  # labels carry codes and reasons, never patients


async def test_readiness_fails_when_the_server_is_unreachable(tmp_path):
    settings = settings_for("http://127.0.0.1:9", tmp_path / "s.sqlite3")  # port 9: nothing listens
    async with Service(settings) as service:
        assert await service.open_store() and await service.lead()
        assert await service.cycle() is None
        ok, why = service.ready()
        assert not ok and "gave up" in why


async def test_a_second_replica_on_the_same_state_is_a_ready_standby_that_does_nothing(
    fhir_base_url, tmp_path
):
    put_all(fhir_base_url, population(patients=3, days=21, seed=4))
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    async with Service(settings) as leader, Service(settings) as standby:
        assert await leader.open_store() and await standby.open_store()
        assert await leader.lead()
        assert not await standby.lead()
        assert standby.ready() == (True, "standby: another replica holds the leader lock")
        assert await standby.cycle() is None  # its scheduled cycles do nothing
        assert await leader.cycle() is not None


async def test_not_ready_before_the_first_leader_check(tmp_path, state):
    """Between opening the store and the first leader check (on PostgreSQL a round trip) a replica is
    neither the leader nor a known standby: not ready. It answered 200 "standby" there, so a single
    replica started with the FHIR server down was briefly ready (found by tests/chaos)."""
    settings = settings_for("http://127.0.0.1:9", state)  # port 9: nothing listens
    async with Service(settings) as service:
        assert await service.open_store()
        assert service.ready() == (False, "starting: the leader lock not checked yet")
        assert await service.lead()
        assert service.ready() == (False, "no successful poll yet")


def _config(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            settings_for(base_url, tmp_path / "s.sqlite3").model_dump(mode="json", exclude_none=True)
        )
    )
    return path


def test_probe_says_what_works(fhir_base_url, tmp_path):
    put_all(fhir_base_url, population(patients=2, days=14, seed=1))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "check-config",
            "--probe",
            "--config",
            str(_config(tmp_path, fhir_base_url)),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   /metadata: FHIR 4.0.1" in proc.stdout
    assert "ok   Observation search: 1 on the first page, more pages" in proc.stdout


def test_probe_reports_an_unreachable_server(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "check-config",
            "--probe",
            "--config",
            str(_config(tmp_path, "http://127.0.0.1:9")),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "FAIL /metadata" in proc.stdout
