"""Secrets never leave through the side doors: the bearer token and the database password appear in
no log line (debug level, JSON), no metric, no error and no `check-config` output — on the good path
and on the failure paths (server unreachable, database unreachable)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from tests.fhir_server.load import put_all
from tests.integration.live import population, postgres_store, settings_for

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-5ecret-b3arer-9f1c2a"
PASSWORD = "pw-5ecret-db-77aa"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_password(dsn: str) -> str:
    """The test server trusts loopback, so a password is accepted and ignored: it still travels
    through every layer of the service."""
    scheme, rest = dsn.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{PASSWORD}@{host}"


def _config(tmp_path: Path, base_url: str, dsn: str, schema: str) -> Path:
    settings = settings_for(base_url, postgres_store("postgresql://placeholder@127.0.0.1/x", schema, failover_check_seconds=0.5),
                            interval_seconds=0.5)
    data = settings.model_dump(mode="json", exclude_none=True)
    data["store"].pop("dsn")  # the DSN and the token come from the environment, as in a deployment
    data["fhir"]["auth"] = {"method": "bearer"}
    data["logging"] = {"level": "debug", "format": "json"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env(dsn: str, port: int) -> dict[str, str]:
    return {**os.environ, "NEUTROWATCH_FHIR__AUTH__BEARER_TOKEN": TOKEN, "NEUTROWATCH_STORE__DSN": dsn,
            "NEUTROWATCH_WEB__PORT": str(port)}


def _assert_clean(text: str, where: str) -> None:
    for secret in (TOKEN, PASSWORD, TOKEN[4:14], PASSWORD[3:13]):
        assert secret not in text, f"a secret appeared in {where}"


async def _get(url: str) -> tuple[int | None, str]:
    try:
        async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
            return r.status, await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return None, ""


async def test_token_and_database_password_never_appear_in_logs_metrics_or_output(fhir_base_url, pg_dsn, pg_schema, tmp_path):
    put_all(fhir_base_url, population(patients=4, days=28, seed=8))
    dsn = _with_password(pg_dsn)
    config = _config(tmp_path, fhir_base_url, dsn, pg_schema)
    outputs: dict[str, str] = {}

    # check-config and the probe (they describe the store: host, port, database, schema only)
    for args in (["check-config"], ["check-config", "--probe"]):
        proc = subprocess.run([sys.executable, "-m", "service", *args, "--config", str(config)], cwd=ROOT,
                              env=_env(dsn, 0), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs[" ".join(args)] = proc.stdout + proc.stderr
    assert "postgres 127.0.0.1:5432/test schema" in outputs["check-config"]

    # the service running: debug logs, /metrics, /readyz while it polls, alerts and all
    port = _free_port()
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "run", "--config", str(config)], cwd=ROOT,
                                env=_env(dsn, port), stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "last successful poll" not in (await _get(f"http://127.0.0.1:{port}/readyz"))[1]:
                await asyncio.sleep(0.2)
            status, metrics = await _get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200 and 'neutrowatch_fhir_writes_total{resource="Flag",result="ok"}' in metrics
            outputs["metrics"] = metrics
            outputs["readyz"] = (await _get(f"http://127.0.0.1:{port}/readyz"))[1]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
    outputs["run log"] = log.read_text()
    assert '"level": "debug"' in outputs["run log"] or '"level":"debug"' in outputs["run log"]

    # failure paths: the FHIR server unreachable (errors carry the URL, not the header), and the
    # database unreachable (errors carry host:port/db, not the password)
    unreachable = _config(tmp_path, "http://127.0.0.1:9/fhir", dsn, pg_schema)
    proc = subprocess.run([sys.executable, "-m", "service", "once", "--config", str(unreachable)], cwd=ROOT,
                          env=_env(dsn, 0), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    outputs["once, server down"] = proc.stdout + proc.stderr
    no_db = dsn.replace("127.0.0.1:5432", "127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-m", "service", "once", "--config", str(config)], cwd=ROOT,
                          env=_env(no_db, 0), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    outputs["once, database down"] = proc.stdout + proc.stderr
    assert "127.0.0.1:9/test" in outputs["once, database down"]  # the operator still learns where

    for where, text in outputs.items():
        _assert_clean(text, where)
