import pytest

from tests.integration.live import postgres_store


@pytest.fixture(params=["sqlite", "postgres"])
def state(request: pytest.FixtureRequest, tmp_path):
    """The store section of a live-loop test, once per backend: a SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return tmp_path / "state.sqlite3"
    return postgres_store(request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema"))
