"""The running service: state store, FHIR client, worker, scheduler and web endpoints, wired at the
edge and shut down cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .config import Settings
from .errors import ConfigError, NeutrowatchError
from .fhir.client import FhirClient
from .store.sqlite import SqliteStore
from .web import make_app
from .worker import CycleReport, Worker

log = structlog.get_logger("neutrowatch")


class Service:
    def __init__(self, settings: Settings):
        if not settings.fhir.base_url:
            raise ConfigError("config error: fhir.base_url: required to poll a server")
        self.settings = settings
        self.store = SqliteStore(settings.store.path)
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.started = time.time()
        self._stack = AsyncExitStack()
        self._busy = asyncio.Lock()
        self.worker: Worker | None = None

    async def __aenter__(self) -> Service:
        await self.store.open()
        self._stack.push_async_callback(self.store.close)
        client = await self._stack.enter_async_context(FhirClient(self.settings.fhir))
        self.worker = Worker(self.settings, client, self.store)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def cycle(self) -> CycleReport | None:
        assert self.worker is not None
        try:
            async with self._busy:
                report = await self.worker.run_cycle()
        except NeutrowatchError as err:
            self.last_error = str(err)
            log.error("poll cycle failed", error=str(err))
            return None
        if report.delivered_all:
            self.last_ok, self.last_error = time.time(), None
        else:
            self.last_error = "alert writes pending"
        return report

    async def drain(self, timeout: float = 10.0) -> None:
        """Let a running cycle finish (cutting it is safe, finishing avoids re-work)."""
        try:
            async with asyncio.timeout(timeout), self._busy:
                pass
        except TimeoutError:
            log.warning("cycle still running at shutdown; it will be redone after restart")

    def ready(self) -> tuple[bool, str]:
        window = 3 * self.settings.poll.interval_seconds
        if self.store._db is None:  # noqa: SLF001 - a cheap liveness view of our own store
            return False, "state store closed"
        if self.last_ok is None:
            return False, self.last_error or "no successful poll yet"
        age = time.time() - self.last_ok
        if age > window:
            return False, f"last successful poll {age:.0f} s ago (> {window:.0f} s)"
        return True, f"last successful poll {age:.0f} s ago"


async def run(settings: Settings) -> None:
    """Poll on an interval until SIGTERM/SIGINT; health endpoints answer throughout."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Service(settings) as service:
        runner = web.AppRunner(make_app(service.ready), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.web.host, settings.web.port)
        await site.start()
        log.info("service started", port=settings.web.port, interval=settings.poll.interval_seconds)
        scheduler = AsyncIOScheduler()
        scheduler.add_job(service.cycle, "interval", seconds=settings.poll.interval_seconds, max_instances=1,
                          coalesce=True, next_run_time=_now())
        scheduler.start()
        try:
            await stop.wait()
        finally:
            log.info("stopping")
            scheduler.shutdown(wait=False)
            await service.drain()
            await runner.cleanup()
    log.info("stopped")


async def once(settings: Settings) -> CycleReport | None:
    async with Service(settings) as service:
        return await service.cycle()


def _now() -> datetime:
    return datetime.now(UTC)
