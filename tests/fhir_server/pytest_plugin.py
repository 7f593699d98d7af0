"""pytest fixtures for the in-memory FHIR test engine.

Register from the root conftest with ``pytest_plugins = ["tests.fhir_server.pytest_plugin"]``.

* ``fhir_engine`` (session): a started :class:`~tests.fhir_server.engine.FhirEngine`. When Node.js
  or ``tests/fhir_server/node_modules`` is missing the requesting tests are skipped with the reason,
  except under ``CI=true``, where they fail: CI must never silently skip the engine tests.
* ``fhir_base_url`` (function): empties the engine (``POST /$reset``) and returns its base URL.

Set ``FHIR_ENGINE_VERBOSE=1`` to have the engine log each request to its stderr log.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from tests.fhir_server.engine import EngineUnavailable, FhirEngine, engine_available


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def _unavailable(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: the FHIR engine tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fhir_engine() -> Iterator[FhirEngine]:
    ok, reason = engine_available()
    if not ok:
        _unavailable(reason)
    engine = FhirEngine(verbose=os.environ.get("FHIR_ENGINE_VERBOSE", "") not in {"", "0"})
    try:
        engine.start()
    except EngineUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def fhir_base_url(fhir_engine: FhirEngine) -> str:
    fhir_engine.reset()
    return fhir_engine.base_url
