"""`check-config --probe`: contact the FHIR server and say, line by line, what works."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit

from .clinical.fhirtime import from_epoch_us
from .config import Settings
from .errors import NeutrowatchError
from .fhir.client import FhirClient
from .fhir.errors import FhirUnavailable
from .store import make_store
from .worker import search_params

PROBE_ATTEMPTS = 2  # a probe answers in seconds: one retry, not the service's full backoff


async def probe(settings: Settings) -> int:
    if not settings.fhir.base_url:
        print("probe: fhir.base_url is not set")
        return 2
    failures = 0
    fhir = settings.fhir.model_copy(update={"retry": settings.fhir.retry.model_copy(
        update={"max_attempts": min(PROBE_ATTEMPTS, settings.fhir.retry.max_attempts)})})
    say = _explainer(settings.fhir.base_url)
    try:
        async with FhirClient(fhir) as client:
            try:
                meta = await client.metadata()
                print(f"ok   /metadata: FHIR {meta.get('fhirVersion', '?')}, {meta.get('software', {}).get('name', 'unnamed server')}")
            except NeutrowatchError as err:
                failures += 1
                print(f"FAIL /metadata: {say(err)}")
            base, since_us = search_params(settings, None, time.time())
            params = [p for p in base if p[0] != "_count"] + [("_count", "1"), ("_lastUpdated", "ge" + from_epoch_us(since_us))]
            try:
                async for page in client.search("Observation", params):
                    print(f"ok   Observation search: {len(page.resources)} on the first page, "
                          f"{'more pages' if page.next_url else 'no more pages'}")
                    break
            except NeutrowatchError as err:
                failures += 1
                print(f"FAIL Observation search: {say(err)}")
    except NeutrowatchError as err:
        print(f"FAIL connection or auth: {say(err)}")
        return 1
    store = make_store(settings.store)
    try:
        await store.open()
        leader = "free" if await store.lead() else "held by another replica"
        print(f"ok   state store ({settings.store.backend}): schema current, leader lock {leader}")
    except NeutrowatchError as err:
        failures += 1
        print(f"FAIL state store: {err}")
    finally:
        await store.close()
    return 1 if failures else 0


def _explainer(base_url: str) -> Callable[[NeutrowatchError], str]:
    """The error's message; when the server could not be reached, first where it was looked for
    (host and port: a wrong port, a proxy in the way, a name that resolves elsewhere)."""
    parts = urlsplit(base_url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    where = f"{parts.hostname}:{port}"

    def say(err: NeutrowatchError) -> str:
        if isinstance(err, FhirUnavailable) and err.reason in ("connection", "timeout", "tls"):
            return f"cannot reach {where} ({err})"
        return str(err)

    return say
