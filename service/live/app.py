"""The running service: state store, FHIR client, worker, scheduler and web endpoints, wired at the
edge and shut down cleanly on SIGTERM/SIGINT.

Several replicas may run against one PostgreSQL store: each checks the leader lock every
store.failover_check_seconds; the holder polls and posts, the others are ready standbys. Taking the
lock starts a cycle at once, so a standby takes over within failover_check_seconds of the lock being
freed (a killed leader's connection closes at once; a stalled one loses it after the lease)."""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from service import metrics
from service.config import Settings
from service.errors import ConfigError, NeutrowatchError, StoreError
from service.fhir.client import FhirClient
from service.live.report import CycleReport, Progress
from service.live.store import make_store
from service.live.web import make_app
from service.live.worker import Worker

log = structlog.get_logger("neutrowatch")
CYCLE_JOB = "poll"
DRAIN_SECONDS = 8.0  # SIGTERM: a running cycle may finish within this, so the process exits within 10 s


class Service:
    def __init__(self, settings: Settings):
        if not settings.fhir.base_url:
            raise ConfigError("config error: fhir.base_url: required to poll a server")
        self.settings = settings
        self.store = make_store(settings.store)
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.store_error: str | None = None  # the last leader check could not reach the store
        self.lead_checked = False  # a leader check has completed (until then this is no standby either)
        self.started = time.time()
        self._stack = AsyncExitStack()
        self._busy = asyncio.Lock()
        self.worker: Worker | None = None

    async def __aenter__(self) -> Service:
        self._stack.push_async_callback(self.store.close)
        client = await self._stack.enter_async_context(FhirClient(self.settings.fhir))
        self.worker = Worker(self.settings, client, self.store)
        return self

    async def open_store(self) -> bool:
        """Open the state store (connect, migrate); False, with the reason kept for /readyz, when it
        cannot be opened yet (the database is down or the file locked): `run` retries."""
        try:
            await self.store.open()
        except StoreError as err:
            if self.last_error != str(err):
                log.error("state store unavailable", error=str(err))
            self.last_error = str(err)
            return False
        log.info("state store open", backend=self.settings.store.backend)
        self.last_error = None
        return True

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def cycle(self) -> CycleReport | None:
        """One poll cycle, if this replica is the leader (a standby's scheduled cycles do nothing)."""
        assert self.worker is not None
        if not (self.store.is_open and self.store.is_leader):
            return None
        try:
            async with self._busy:
                report = await self.worker.run_cycle()
        except NeutrowatchError as err:
            self.last_error = str(err)
            return None  # logged and counted by the worker
        except Exception as err:  # noqa: BLE001 - a defect fails this cycle, never the scheduler; its message may quote input
            self.last_error = f"unexpected {type(err).__name__} (see the log)"
            return None
        if report.delivered_all:
            self.last_ok, self.last_error = time.time(), None
        else:
            self.last_error = "alert writes pending"
        return report

    async def lead(self) -> bool:
        """Take or renew the leader lock; True on becoming leader (not on keeping it)."""
        was = self.store.is_leader
        try:
            now = await self.store.lead()
            self.store_error = None
        except StoreError as err:
            if self.store_error != str(err):
                log.warning("leader check failed", error=str(err))
            self.store_error = str(err)
            now = False
        self.lead_checked = True
        metrics.LEADER.set(1 if now else 0)
        if now != was:
            metrics.LEADER_CHANGES.labels("taken" if now else "lost").inc()
            log.info("leader" if now else "standby", backend=self.settings.store.backend)
            if now:
                self.last_ok = None  # readiness now follows this replica's own polls
                if self.worker is not None:
                    self.worker.progress = Progress()
        return now and not was

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Let a running cycle finish its step in progress and stop there (cutting it is safe: the
        cursor covers every committed step; finishing the step avoids re-work)."""
        if self.worker is not None:
            self.worker.request_stop()
        try:
            async with asyncio.timeout(timeout), self._busy:
                pass
        except TimeoutError:
            log.warning("cycle still running at shutdown; it will be redone after restart")

    def ready(self) -> tuple[bool, str]:
        """Readiness of this replica, with the reason. A leader is ready while it makes progress: a
        cycle completed, or a step of a long catch-up committed, within 3 poll intervals. A replica
        that is catching up is working (restarting or isolating it would only lose its step), so it
        is ready and says so with its lag; one whose steps stopped committing is stuck: 503 with why.
        (Readiness gates only traffic to /metrics and rollouts; liveness is /healthz.)"""
        if not self.store.is_open:
            return (
                False,
                f"state store unavailable: {self.last_error}"
                if self.last_error
                else "state store not open yet",
            )
        if not self.store.is_leader:
            if self.store_error is not None:
                return False, f"state store unavailable: {self.store_error}"
            if not self.lead_checked:
                return False, "starting: the leader lock not checked yet"
            return True, "standby: another replica holds the leader lock"
        window = 3 * self.settings.poll.interval_seconds
        progress = self.worker.progress if self.worker is not None else None
        step_at = progress.step_at if progress is not None else None
        last = max((t for t in (self.last_ok, step_at) if t is not None), default=None)
        if last is None:
            return False, self.last_error or "no successful poll yet"
        now = time.time()
        age = now - last
        if age > window:
            why = f"stuck: no progress for {age:.0f} s (> {window:.0f} s)"
            reason = self.last_error or (
                "alert writes pending" if progress is not None and progress.writes_pending else None
            )
            return False, f"{why}: {reason}" if reason else why
        if progress is not None and progress.catching_up and step_at is not None:
            lag = "" if progress.lag_seconds is None else f", lag {progress.lag_seconds:.0f} s"
            return True, f"catching up: {progress.pages} pages read{lag}, last step {now - step_at:.0f} s ago"
        return True, f"last successful poll {age:.0f} s ago"


async def run(settings: Settings) -> None:
    """Poll on an interval while leader, until SIGTERM/SIGINT; health endpoints answer throughout."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Service(settings) as service:
        runner = web.AppRunner(make_app(service.ready), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.web.host, settings.web.port)
        await site.start()
        log.info(
            "service started",
            port=settings.web.port,
            interval=settings.poll.interval_seconds,
            store=settings.store.backend,
        )
        scheduler = AsyncIOScheduler()
        job = scheduler.add_job(
            service.cycle,
            "interval",
            id=CYCLE_JOB,
            seconds=settings.poll.interval_seconds,
            max_instances=1,
            coalesce=True,
        )
        scheduler.start()
        try:
            wait = settings.store.failover_check_seconds
            while not stop.is_set():
                if not service.store.is_open:
                    # Alive (/healthz) but not ready until the store opens; retried with backoff.
                    wait = (
                        settings.store.failover_check_seconds
                        if await service.open_store()
                        else min(2 * wait, 30.0)
                    )
                if service.store.is_open and await service.lead():
                    job.modify(next_run_time=_now())  # a new leader polls at once
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                except TimeoutError:
                    pass
        finally:
            log.info("stopping")
            # Pause first: shutting the scheduler down cancels a running cycle (the asyncio executor
            # cancels its pending tasks), so it comes only after the drain, to cut a cycle that
            # overran it; the second drain lets that cut cycle unwind before the store closes.
            scheduler.pause()
            await service.drain()
            scheduler.shutdown(wait=False)
            await service.drain(1.0)
            await runner.cleanup()
    log.info("stopped")


async def once(settings: Settings) -> CycleReport | None:
    async with Service(settings) as service:
        await service.store.open()  # `once` fails at once with the store's reason
        if not await service.store.lead():
            raise StoreError("another replica holds the leader lock; `once` would race it")
        return await service.cycle()


def _now() -> datetime:
    return datetime.now(UTC)
