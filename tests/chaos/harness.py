"""Generic helpers of the fault campaign: the real service process (start, kill -9, SIGTERM,
probes), a supervisor that restarts it like an orchestrator would, a read-only look at its state
store (cursor, pending outbox), an exclusive lock on a SQLite state file, and staging data on the
engine with the times it became visible."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from service.fhir.fhirtime import to_epoch_us

ROOT = Path(__file__).resolve().parents[2]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$")
Resource = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """`python -m service run --config FILE` with JSON logs appended to one file across restarts."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        port: int,
        *,
        level: str = "info",
        env: dict[str, str] | None = None,
    ):
        self.config, self.log_path, self.port = config, log_path, port
        self.env = {
            **os.environ,
            "NEUTROWATCH_WEB__PORT": str(port),
            "NEUTROWATCH_LOGGING__FORMAT": "json",
            "NEUTROWATCH_LOGGING__LEVEL": level,
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> None:
        assert not self.alive, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "run", "--config", str(self.config)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill9(self) -> bool:
        """SIGKILL now (no wait: safe to call from the proxy's handler). False when not running."""
        if not self.alive:
            return False
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.kills += 1
        return True

    async def wait_exit(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.returncode

    async def terminate(self, timeout: float = 10.0) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after `timeout`, seconds taken). A process
        still running after the timeout is killed."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = await self.wait_exit(timeout)
        taken = time.monotonic() - started
        if code is None:
            self.proc.kill()
            await self.wait_exit(5)
        return code, taken

    async def _get(self, path: str) -> tuple[int | None, str]:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{self.port}{path}", timeout=aiohttp.ClientTimeout(total=2)) as r,
            ):
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return None, ""

    async def readyz(self) -> tuple[int | None, str]:
        return await self._get("/readyz")

    async def healthz(self) -> int | None:
        return (await self._get("/healthz"))[0]

    async def metrics(self) -> dict[str, float]:
        """Prometheus samples by name+labels; {} while the process is not answering."""
        status, text = await self._get("/metrics")
        out: dict[str, float] = {}
        if status != 200:
            return out
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def log_records(self) -> list[dict[str, Any]]:
        return list(read_log(self.log_path))

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def read_log(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON log records of a log file (other lines, e.g. a traceback, are skipped)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return
    for line in lines:
        if line.startswith(b"{"):
            try:
                yield json.loads(line)
            except ValueError:
                continue


def log_time(record: dict[str, Any]) -> float:
    return to_epoch_us(record["timestamp"]) / 1_000_000 if record.get("timestamp") else 0.0


class Supervisor:
    """Restarts the service whenever it is not running (a kill -9, a crash), unless paused; like
    a Deployment's restart policy, with a short delay."""

    def __init__(self, service: ServiceProcess, *, delay: float = 0.2):
        self.service, self.delay = service, delay
        self.paused = False
        self.restarts = 0
        self.exit_codes: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            if self.paused or self.service.alive:
                continue
            if self.service.returncode is not None:
                self.exit_codes.append(self.service.returncode)
            await asyncio.sleep(self.delay)
            if not self.paused and not self.service.alive:
                self.service.start()
                self.restarts += 1

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """No restarts inside (the caller manages the process)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@dataclass
class StoreProbe:
    """Read-only look at the service's state: the cursor and the pending outbox."""

    sqlite_path: Path | None = None
    pg_dsn: str | None = None
    pg_schema: str | None = None

    async def cursor_us(self) -> int | None:
        value = await self._scalar("SELECT value FROM {meta} WHERE key = 'cursor'")
        return to_epoch_us(value) if value else None

    async def pending(self) -> int:
        return int(await self._scalar("SELECT COUNT(*) FROM {outbox} WHERE status = 'pending'") or 0)

    async def _scalar(self, sql: str) -> Any:
        if self.sqlite_path is not None:
            if not self.sqlite_path.exists():
                return None
            db = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=0.2)
            try:
                row = db.execute(sql.format(meta="meta", outbox="outbox")).fetchone()
            except sqlite3.OperationalError:  # not created yet
                return None
            finally:
                db.close()
            return row[0] if row else None
        import asyncpg

        conn = await asyncpg.connect(self.pg_dsn, timeout=5)
        try:
            return await conn.fetchval(
                sql.format(meta=f'"{self.pg_schema}".meta', outbox=f'"{self.pg_schema}".outbox')
            )
        except asyncpg.UndefinedTableError:
            return None
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def sqlite_exclusive(path: Path, *, attempts: int = 100) -> AsyncIterator[float]:
    """Hold `BEGIN EXCLUSIVE` on a SQLite database from another connection; yields the time it
    was taken."""
    db = sqlite3.connect(str(path), timeout=0, isolation_level=None)
    try:
        for _ in range(attempts):
            try:
                db.execute("BEGIN EXCLUSIVE")
                break
            except sqlite3.OperationalError:  # the service is inside a write transaction
                await asyncio.sleep(0.01)
        else:
            raise RuntimeError(f"could not lock {path}")
        yield time.time()
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.close()


# -- staging data on the engine --------------------------------------------------------------------


@dataclass
class Staged:
    """When each resource version became visible on the server (wall clock after the PUT returned),
    and the newest meta.lastUpdated each PUT produced per resource type."""

    visible: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def record(self, resources: Iterable[Resource], at: float) -> None:
        for r in resources:
            self.visible.setdefault((r["resourceType"], r["id"]), []).append(at)

    def last_before(self, key: tuple[str, str], moment: float) -> float | None:
        times = [t for t in self.visible.get(key, ()) if t <= moment]
        return max(times) if times else None


def put_batch(base_url: str, resources: list[Resource], *, keep_meta: bool = False) -> list[Resource]:
    """PUT the resources by id in ONE batch (the engine applies a batch without letting a search in
    between, so a reader never sees half a stage); returns the stored resources. Sync (urllib)."""
    assert len({(r["resourceType"], r["id"]) for r in resources}) == len(resources), (
        "two versions in one batch"
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources
        ],
    }
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if keep_meta:
        headers["X-Engine-Keep-Meta"] = "true"
    request = urllib.request.Request(
        base_url, data=json.dumps(bundle).encode(), method="POST", headers=headers
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    entries = answer.get("entry", [])
    failed = [e["response"]["status"] for e in entries if not str(e["response"]["status"]).startswith("2")]
    if failed or len(entries) != len(resources):
        raise RuntimeError(f"engine refused {len(failed)} of {len(resources)} resources: {failed[:3]}")
    return [e["resource"] for e in entries]
