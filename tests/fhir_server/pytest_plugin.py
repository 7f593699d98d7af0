"""pytest fixtures for the in-memory FHIR test engine.

Register from the root conftest with ``pytest_plugins = ["tests.fhir_server.pytest_plugin"]``.

* ``fhir_engine`` (session): a started :class:`~tests.fhir_server.engine.FhirEngine`. When Node.js
  or ``tests/fhir_server/node_modules`` is missing the requesting tests are skipped with the reason,
  except under ``CI=true``, where they fail: CI must never silently skip the engine tests.
* ``fhir_base_url`` (function): empties the engine (``POST /$reset``) and returns its base URL.
* ``fhir_engine_batch`` / ``fhir_base_url_batch``: the same, for a second engine that processes a
  `transaction` Bundle as a batch (``--batch-transactions``: mixed entry statuses, successful entries
  kept), as Medplum does for a project without transaction bundles.
* ``fhir_engine_each_mode`` (function, parametrised ``atomic`` / ``batch``: a test using it runs
  once against each engine, emptied) and ``fhir_base_url_each_mode`` (its base URL).

Set ``FHIR_ENGINE_VERBOSE=1`` to have the engine log each request to its stderr log.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest

from tests.fhir_server.engine import EngineUnavailable, FhirEngine, engine_available


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def _unavailable(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: the FHIR engine tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def _engine(*, batch_transactions: bool) -> Iterator[FhirEngine]:
    ok, reason = engine_available()
    if not ok:
        _unavailable(reason)
    engine = FhirEngine(
        verbose=os.environ.get("FHIR_ENGINE_VERBOSE", "") not in {"", "0"},
        batch_transactions=batch_transactions,
    )
    try:
        engine.start()
    except EngineUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def fhir_engine() -> Iterator[FhirEngine]:
    yield from _engine(batch_transactions=False)


@pytest.fixture(scope="session")
def fhir_engine_batch() -> Iterator[FhirEngine]:
    yield from _engine(batch_transactions=True)


@pytest.fixture
def fhir_base_url(fhir_engine: FhirEngine) -> str:
    fhir_engine.reset()
    return fhir_engine.base_url


@pytest.fixture
def fhir_base_url_batch(fhir_engine_batch: FhirEngine) -> str:
    fhir_engine_batch.reset()
    return fhir_engine_batch.base_url


@pytest.fixture(params=["atomic", "batch"])
def fhir_engine_each_mode(request: pytest.FixtureRequest) -> FhirEngine:
    """An emptied engine: once the one whose transactions are atomic, once the batch one."""
    engine: FhirEngine = request.getfixturevalue(
        "fhir_engine" if request.param == "atomic" else "fhir_engine_batch"
    )
    engine.reset()
    return engine


@pytest.fixture
def fhir_base_url_each_mode(fhir_engine_each_mode: FhirEngine) -> str:
    return fhir_engine_each_mode.base_url


@pytest.fixture
def start_engine(fhir_engine: FhirEngine) -> Iterator[Callable[..., FhirEngine]]:
    """Start engines of this test's own, with options (batch transactions, quota, conflicts); each is
    stopped after the test. `fhir_engine` is requested only for its skip-or-fail handling when
    Node.js is missing."""
    engines: list[FhirEngine] = []

    def start(**options: Any) -> FhirEngine:
        engine = FhirEngine(**options)
        engines.append(engine)
        engine.start()
        return engine

    yield start
    for engine in engines:
        engine.stop()
