"""What a state store holds that no part of the service reads back, read as an operator reads it:
SQL on its tables. The quarantine is written through the store's contract (`ingest`, `quarantine`)
and read by no part of the service, so the tests read it here rather than through a store method
of their own."""

from __future__ import annotations

from service.live.store import Store
from service.live.store.postgres import PostgresStore
from service.live.store.sqlite import SqliteStore

_QUARANTINED = "SELECT ref, reason FROM quarantine ORDER BY id"


async def quarantined(store: Store) -> list[tuple[str | None, str]]:
    """(reference, reason) of each quarantined rejection, oldest first."""
    if isinstance(store, SqliteStore):
        rows = list(store.db.execute(_QUARANTINED))
    else:
        assert isinstance(store, PostgresStore)
        rows = list(await store.pool.fetch(_QUARANTINED))
    return [(ref, reason) for ref, reason in rows]
