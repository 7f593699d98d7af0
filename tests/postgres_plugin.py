"""PostgreSQL fixtures: the machine's real server (127.0.0.1:5432, trust auth, database `test`, or
$NEUTROWATCH_TEST_PG_DSN). Each test gets its own schema, dropped afterwards. Without a reachable
server the tests skip with the reason; under CI=true they fail instead."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def dsn_under_test() -> str:
    return os.environ.get("NEUTROWATCH_TEST_PG_DSN", DEFAULT_DSN)


async def _ping(dsn: str) -> str | None:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as err:
        return f"{type(err).__name__}: {err}"
    await conn.close()
    return None


async def _drop(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    dsn = dsn_under_test()
    problem = asyncio.run(_ping(dsn))
    if problem is not None:
        reason = f"PostgreSQL not reachable at {dsn.split('@')[-1]} ({problem})"
        if os.environ.get("CI", "").strip().lower() in {"true", "1"}:
            pytest.fail(f"{reason} (CI=true: the PostgreSQL tests must not be skipped)", pytrace=False)
        pytest.skip(reason)
    return dsn


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name; the store creates it, the fixture drops it."""
    schema = f"nwtest_{uuid.uuid4().hex[:12]}"
    yield schema
    asyncio.run(_drop(pg_dsn, schema))
