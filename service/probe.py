"""`check-config --probe`: contact the FHIR server and say, line by line, what works."""

from __future__ import annotations

import time

from .clinical.fhirtime import from_epoch_us
from .config import Settings
from .errors import NeutrowatchError
from .fhir.client import FhirClient
from .store import make_store
from .worker import search_params


async def probe(settings: Settings) -> int:
    if not settings.fhir.base_url:
        print("probe: fhir.base_url is not set")
        return 2
    failures = 0
    try:
        async with FhirClient(settings.fhir) as client:
            try:
                meta = await client.metadata()
                print(f"ok   /metadata: FHIR {meta.get('fhirVersion', '?')}, {meta.get('software', {}).get('name', 'unnamed server')}")
            except NeutrowatchError as err:
                failures += 1
                print(f"FAIL /metadata: {err}")
            base, since_us = search_params(settings, None, time.time())
            params = [p for p in base if p[0] != "_count"] + [("_count", "1"), ("_lastUpdated", "ge" + from_epoch_us(since_us))]
            try:
                async for page in client.search("Observation", params):
                    print(f"ok   Observation search: {len(page.resources)} on the first page, "
                          f"{'more pages' if page.next_url else 'no more pages'}")
                    break
            except NeutrowatchError as err:
                failures += 1
                print(f"FAIL Observation search: {err}")
    except NeutrowatchError as err:
        print(f"FAIL connection or auth: {err}")
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
