from collections.abc import AsyncIterator

import pytest

from tests.chaos.proxy import Proxy
from tests.integration.live import postgres_store


@pytest.fixture(params=["sqlite", "postgres"])
def state(request: pytest.FixtureRequest, tmp_path):
    """The store section of a live-loop test, once per backend: a SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return tmp_path / "state.sqlite3"
    return postgres_store(request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema"))


@pytest.fixture
async def proxy(fhir_base_url: str) -> AsyncIterator[Proxy]:
    """The fault proxy in front of an empty engine (tests/chaos/proxy.py), started and stopped."""
    state = Proxy(upstream=fhir_base_url)
    await state.start()
    yield state
    await state.stop()
