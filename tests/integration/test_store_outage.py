"""The PostgreSQL store unavailable, at start-up and while running (through a TCP relay the test cuts):
the process stays alive, /readyz says why it is not ready, nothing half-written is left, and it
recovers by itself; the server ends with exactly replay's alerts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import yaml

from tests.fhir_server.load import put_all
from tests.integration.live import compare_with_oracle, population, postgres_store, settings_for, stages
from tests.integration.tcp_relay import TcpRelay
from tests.integration.test_secrets import _free_port

ROOT = Path(__file__).resolve().parents[2]


async def _get(url: str) -> tuple[int | None, str]:
    try:
        async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
            return r.status, await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return None, ""


async def _until(check, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-3000:]}")


async def test_database_down_at_start_and_while_running(fhir_base_url, pg_dsn, pg_schema, tmp_path):
    target = urlsplit(pg_dsn)
    relay = TcpRelay(target.hostname or "127.0.0.1", target.port or 5432)
    await relay.up()
    await relay.down()  # the port is known, nothing listens: the database is "down" at start-up
    dsn = pg_dsn.replace(f"{target.hostname}:{target.port}", f"127.0.0.1:{relay.port}")
    port = _free_port()
    settings = settings_for(
        fhir_base_url, postgres_store(dsn, pg_schema, failover_check_seconds=0.5), interval_seconds=1.0
    )
    config = tmp_path / "config.yaml"
    data = settings.model_dump(mode="json", exclude_none=True) | {"web": {"host": "127.0.0.1", "port": port}}
    data["store"].pop("dsn")  # from the environment, as deployed (a dump would mask it)
    config.write_text(yaml.safe_dump(data))
    batches = stages(population(patients=10, days=35, seed=21), 2)
    log = tmp_path / "service.log"
    readyz = f"http://127.0.0.1:{port}/readyz"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--config", str(config)],
            cwd=ROOT,
            env={**os.environ, "NEUTROWATCH_LOGGING__FORMAT": "json", "NEUTROWATCH_STORE__DSN": dsn},
            stdout=out,
            stderr=out,
        )
        try:
            await _until(
                lambda: _status_is(readyz, 503, "state store unavailable"),
                30,
                "not ready: store unavailable",
                log,
            )
            assert (await _get(f"http://127.0.0.1:{port}/healthz"))[0] == 200  # alive: no crash loop
            put_all(fhir_base_url, batches[0])
            await relay.up()  # the database comes back: the service opens, migrates, leads, polls
            await _until(
                lambda: _status_is(readyz, 200, "last successful poll"),
                60,
                "ready after the database returned",
                log,
            )

            # While running: the next stage arrives and the database goes away for a while.
            put_all(fhir_base_url, batches[1])
            await asyncio.sleep(0.3)
            await relay.down()
            await asyncio.sleep(4.0)  # > 3 poll intervals: readiness must say so
            status, text = await _get(readyz)
            assert status == 503, text
            assert proc.poll() is None  # still alive
            await relay.up()
            await _until(lambda: _status_is(readyz, 200, "last successful poll"), 60, "ready again", log)
            await asyncio.sleep(2.5)  # two more cycles with everything in
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 20)  # the relay must keep pumping meanwhile
            await relay.down()
    assert code == 0
    text = log.read_text()
    assert "state store unavailable" in text and "leader lock lost" in text
    conn = await asyncpg.connect(pg_dsn)
    try:
        epoch = await conn.fetchval(f'SELECT epoch FROM "{pg_schema}".leader')
        pending = await conn.fetchval(f"SELECT count(*) FROM \"{pg_schema}\".outbox WHERE status = 'pending'")
    finally:
        await conn.close()
    assert epoch >= 2 and pending == 0  # leadership was lost and retaken; nothing left undelivered
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")


async def _status_is(url: str, status: int, words: str) -> bool:
    got, text = await _get(url)
    return got == status and words in text
