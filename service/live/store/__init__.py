"""State stores: cursor, latest Observation versions, pending panels, episodes, outbox, quarantine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.live.store.base import Decided, Intake, LeadershipLost, OutboxEntry, PanelWork, Store

if TYPE_CHECKING:
    from service.config import StoreSettings

__all__ = ["Decided", "Intake", "LeadershipLost", "OutboxEntry", "PanelWork", "Store", "make_store"]


def make_store(settings: StoreSettings) -> Store:
    """The configured store, not yet opened."""
    if settings.backend == "postgres":
        from service.live.store.postgres import PostgresStore

        return PostgresStore(
            settings.postgres_dsn(),
            settings.schema_name,
            pool_size=settings.pool_size,
            lease_seconds=lease_seconds(settings.failover_check_seconds),
        )
    from service.live.store.sqlite import SqliteStore

    return SqliteStore(settings.path)


def lease_seconds(failover_check_seconds: float) -> float:
    """How long a silent leader keeps the PostgreSQL lock: five missed renewals, and never under 10 s
    (a long page decode or a GC pause must not cost the lock)."""
    return max(10.0, 5 * failover_check_seconds)
