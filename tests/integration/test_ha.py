"""Two real service processes on one PostgreSQL store and the real FHIR engine: exactly one polls
and posts; kill -9 of the active one mid-cycle hands over to the other within 2 x the poll interval;
the server ends up with exactly what replay predicts — none missing, none doubled."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import yaml

from tests.fhir_server.load import put_all
from tests.integration.live import compare_with_oracle, population, postgres_store, settings_for, stages

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = 2.0  # poll interval of the replicas (s); the takeover bound is 2 x this
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """One `python -m service run` process with its own web port."""

    def __init__(self, name: str, config: Path, workdir: Path):
        self.name, self.port = name, _free_port()
        self.log = (workdir / f"{name}.log").open("ab")
        env = {
            **os.environ,
            "NEUTROWATCH_WEB__PORT": str(self.port),
            "NEUTROWATCH_LOGGING__FORMAT": "json",
            "NEUTROWATCH_LOGGING__LEVEL": "info",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=self.log,
        )

    async def metrics(self) -> dict[str, float]:
        """Prometheus samples summed by name+labels; {} while the process is not answering."""
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{self.port}/metrics", timeout=aiohttp.ClientTimeout(total=1)) as r,
            ):
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    async def value(self, name: str) -> float:
        return sum(v for k, v in (await self.metrics()).items() if k == name or k.startswith(name + "{"))

    async def readiness(self) -> tuple[int | None, str]:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{self.port}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as r,
            ):
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return None, ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout=20)
        return self.proc.returncode


async def _until(predicate, timeout: float, what: str, logs: Path) -> float:
    """Wait for an async predicate; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tails}")


async def _epoch(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f'SELECT epoch FROM "{schema}".leader'))
    finally:
        await conn.close()


async def test_kill_9_of_the_active_replica_hands_over_within_two_intervals(
    fhir_base_url, pg_dsn, pg_schema, tmp_path
):
    settings = settings_for(
        fhir_base_url,
        postgres_store(pg_dsn, pg_schema, failover_check_seconds=0.5),
        page_size=20,
        interval_seconds=INTERVAL,
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            settings.model_dump(mode="json", exclude_none=True)
            | {"store": postgres_store(pg_dsn, pg_schema, failover_check_seconds=0.5)}
        )
    )
    batches = stages(population(patients=24, days=42, seed=17), 3)
    replicas = {"a": Replica("a", config, tmp_path)}
    takeovers: list[float] = []
    try:
        a = replicas["a"]
        await _until(lambda: _leads(a), 30, "replica a to lead", tmp_path)
        replicas["b"] = b = Replica("b", config, tmp_path)
        await _until(lambda: _ready_standby(b), 30, "replica b to be a ready standby", tmp_path)
        assert await a.value("neutrowatch_leader") == 1

        # Stage 1: kill the leader while it is writing alerts to the server.
        put_all(fhir_base_url, batches[0])
        await _until(lambda: _writing(a), 60, "replica a to write alerts", tmp_path)
        a.kill9()
        takeovers.append(await _until(lambda: _leads(b), 2 * INTERVAL, "replica b to take over", tmp_path))
        assert await b.value("neutrowatch_polls_total") >= 0  # b answers as the leader now
        replicas["a2"] = a2 = Replica("a2", config, tmp_path)  # the killed pod comes back as a standby
        await _until(lambda: _ready_standby(a2), 30, "replica a2 to be a ready standby", tmp_path)

        # Stage 2: kill the new leader while it is reading pages.
        pages_before = await b.value("neutrowatch_pages_total")
        put_all(fhir_base_url, batches[1])
        await _until(
            lambda: _more(b, "neutrowatch_pages_total", pages_before), 60, "replica b to read pages", tmp_path
        )
        b.kill9()
        takeovers.append(await _until(lambda: _leads(a2), 2 * INTERVAL, "replica a2 to take over", tmp_path))

        # Stage 3 arrives with one leader; it settles: two clean polls after the data is in.
        put_all(fhir_base_url, batches[2])
        ok = await a2.value('neutrowatch_polls_total{outcome="ok"}')
        await _until(
            lambda: _more(a2, 'neutrowatch_polls_total{outcome="ok"}', ok + 1),
            90,
            "two clean polls",
            tmp_path,
        )
        assert await a2.value("neutrowatch_outbox_pending") == 0
    finally:
        codes = {name: r.stop() for name, r in replicas.items()}
    assert codes["a2"] == 0  # SIGTERM drains and exits cleanly (a and b were killed)
    print(f"takeover seconds after kill -9: {[round(t, 2) for t in takeovers]}")
    assert all(t <= 2 * INTERVAL for t in takeovers) and len(takeovers) == 2, takeovers
    assert await _epoch(pg_dsn, pg_schema) == 3  # a, then b, then a2: each took the lock once
    counts = compare_with_oracle(fhir_base_url, tmp_path / "oracle")
    assert counts["communications"] > 10


async def _leads(r: Replica) -> bool:
    return await r.value("neutrowatch_leader") == 1


async def _ready_standby(r: Replica) -> bool:
    status, text = await r.readiness()
    return status == 200 and "standby" in text


async def _writing(r: Replica) -> bool:
    return await r.value("neutrowatch_fhir_writes_total") > 0


async def _more(r: Replica, name: str, than: float) -> bool:
    return await r.value(name) > than
