"""`check-config --probe`: contact the FHIR server and say, line by line, what works.

It sends one request of every kind the live loop sends (service/fhir/scopes.py lists them): the
Observation search, each context read and search, the Flag identifier search, and a write. The write
is a conditional create of one Provenance tagged `<alerts.canonical_base>/probe|neutrowatch-probe`
that targets the service's own author (a Device or Organization) and is then searched for by that
tag: it carries nothing clinical and, being conditional, exists at most once however often the probe
runs. (Flags and Communications are not written: a probe must not create anything that looks like
an alert; `$validate` would not show whether a write is allowed.) The context reads ask for an id
that does not exist: a 404 shows the read is allowed without reading anyone's record.

With SMART Backend Services it also compares the scopes the service needs with those configured
and those the token endpoint granted (its `scope`), and names each missing one. A refused request
(401/403) is reported with the scope it needs.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp

from service.config import Settings
from service.errors import NeutrowatchError
from service.fhir import model, scopes
from service.fhir.auth import make_auth
from service.fhir.client import FhirClient
from service.fhir.errors import FhirHttpError, FhirUnavailable
from service.fhir.fhirtime import from_epoch_us
from service.fhir.model import FhirJson
from service.fhir.tls import ssl_option
from service.live.search import search_params
from service.live.store import make_store
from service.output import profiles

PROBE_ATTEMPTS = 2  # a probe answers in seconds: one retry, not the service's full backoff
PROBE_ID = "neutrowatch-probe"  # an id no resource is expected to have (reads answer 404)
PROBE_CODE = "neutrowatch-probe"  # the tag code of the probe's one Provenance


class _Run:
    """Prints each check's line; counts failures."""

    def __init__(self, settings: Settings, say: Callable[[NeutrowatchError], str], lacking: set[str]) -> None:
        self.settings, self.say, self.lacking, self.failures = settings, say, lacking, 0
        self.grant_known = False  # the token response named the scopes granted
        self.need = {i.label: i for i in settings.interactions()}

    def ok(self, label: str, text: str) -> None:
        print(f"ok   {label}: {text}")

    def fail(self, label: str, text: str) -> None:
        self.failures += 1
        print(f"FAIL {label}: {text}")

    async def check(self, label: str, action: Callable[[], Awaitable[str]]) -> None:
        try:
            self.ok(label, await action())
        except NeutrowatchError as err:
            self.fail(label, self.say(err) + self._hint(err, label))

    def _hint(self, err: NeutrowatchError, label: str) -> str:
        """For a refusal (401/403): the scope the interaction needs, named as missing when the grant
        lacks it (or when the grant is not known), else said to be granted (the server refuses for
        another reason, e.g. a claimed profile its rules forbid reading)."""
        item = self.need.get(label)
        if not isinstance(err, FhirHttpError) or err.status not in (401, 403) or item is None:
            return ""
        lacking = [
            s
            for s in sorted(self.lacking)
            if s.split("/", 1)[1].split(".")[0] == item.resource
            and set(s.rsplit(".", 1)[1]) & set(item.letters)
        ]
        if lacking:
            return f" — missing {lacking[0]}?"
        if not self.grant_known:
            return f" — missing {item.scope}?"
        return f" — {item.scope} is granted: refused for another reason"


async def probe(settings: Settings) -> int:
    if not settings.fhir.base_url:
        print("probe: fhir.base_url is not set")
        return 2
    fhir = settings.fhir.model_copy(
        update={
            "retry": settings.fhir.retry.model_copy(
                update={"max_attempts": min(PROBE_ATTEMPTS, settings.fhir.retry.max_attempts)}
            )
        }
    )
    say = _explainer(settings.fhir.base_url)
    need = scopes.required(settings.interactions())
    failures = 0
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_option(fhir))) as session:
            auth = make_auth(fhir, session)
            async with FhirClient(fhir, auth=auth, session=session) as client:
                run = _Run(settings, say, set())
                try:
                    meta = await client.metadata()
                    run.ok(
                        "/metadata",
                        f"FHIR {meta.get('fhirVersion', '?')}, "
                        f"{meta.get('software', {}).get('name', 'unnamed server')}",
                    )
                except NeutrowatchError as err:
                    run.fail("/metadata", say(err))
                    if isinstance(err, FhirUnavailable) and err.reason in ("connection", "timeout", "tls"):
                        print("skip the other FHIR checks: the server cannot be reached")
                        return await _store(settings, 1)
                if settings.fhir.auth.method == "smart":
                    await (
                        auth.header()
                    )  # the token (and its granted scope), or an AuthError naming the refusal
                run.lacking = _scopes(settings, run, need, getattr(auth, "granted_scope", None))
                await _interactions(settings, client, run)
                failures = run.failures
    except NeutrowatchError as err:
        print(f"FAIL connection or auth: {say(err)}")
        return await _store(settings, 1)
    return await _store(settings, failures)


def _scopes(settings: Settings, run: _Run, need: dict[str, str], granted: str | None) -> set[str]:
    """Needed vs configured vs granted scopes (SMART only); the set of missing needed scopes."""
    if settings.fhir.auth.method != "smart":
        run.ok(
            "scopes",
            f"not compared (auth method {settings.fhir.auth.method}); "
            "the requests below show what is allowed",
        )
        return set()
    lacking: set[str] = set()
    requested = scopes.missing(need, settings.fhir.auth.smart.scope)
    if requested:
        lacking.update(requested)
        run.fail(
            "requested scope",
            f"fhir.auth.smart.scope lacks {' '.join(requested)} (needed: {scopes.scope_string(need)})",
        )
    else:
        run.ok("requested scope", "covers every interaction of this configuration")
    if granted is None:
        run.ok("granted scope", "the token response names none: taken as the requested scope (RFC 6749 §5.1)")
        return lacking
    run.grant_known = True
    refused = scopes.missing(need, granted)
    if refused:
        lacking.update(refused)
        run.fail("granted scope", f"the token endpoint did not grant {' '.join(refused)}")
    else:
        run.ok("granted scope", "every needed scope granted")
    return lacking


async def _interactions(settings: Settings, client: FhirClient, run: _Run) -> None:
    """One request of every kind the live loop sends (and the probe's own write)."""
    base, since_us = search_params(settings, None, time.time())
    params = [p for p in base if p[0] != "_count"] + [
        ("_count", "1"),
        ("_lastUpdated", "ge" + from_epoch_us(since_us)),
    ]

    async def observations() -> str:
        async for page in client.search("Observation", params):
            found = sum(
                1
                for r in page.resources
                if not isinstance(r, model.Resource) or r.resourceType == "Observation"
            )
            return f"{found} on the first page, {'more pages' if page.next_url else 'no more pages'}"
        return "no page"

    await run.check("Observation search", observations)
    patient = f"Patient/{PROBE_ID}"
    subject = f"{patient},{settings.fhir.base_url}/{patient}"
    if settings.poll.patient_context:
        await run.check("Patient read", lambda: _absent(client, "Patient"))
        if settings.clinical.chronic_benign_threshold_per_ul is not None:
            await run.check(
                "Condition search",
                lambda: _search(
                    client, "Condition", [("subject", subject), ("code", "http://snomed.info/sct|234423001")]
                ),
            )
        await run.check("ServiceRequest read", lambda: _absent(client, "ServiceRequest"))
        await run.check(
            "CareTeam search",
            lambda: _search(client, "CareTeam", [("subject", subject), ("status", "active")]),
        )
    else:
        print("skip context reads: poll.patient_context is off")
    canonical = settings.alerts.canonical_base
    await run.check(
        "Flag identifier search",
        lambda: _search(client, "Flag", [("identifier", f"{canonical}/episode|{PROBE_ID}")]),
    )
    await run.check("Provenance conditional create", lambda: _write(settings, client))
    if settings.alerts.claim_profiles:
        await run.check(
            "StructureDefinition read (claimed profiles)", lambda: _profiles_present(settings, client)
        )


async def _absent(client: FhirClient, resource_type: str) -> str:
    try:
        await client.read(resource_type, PROBE_ID)
    except FhirHttpError as err:
        if err.status in (404, 410):
            return f"allowed (HTTP {err.status} for the probe's made-up id, as expected)"
        raise
    return "allowed"


async def _search(client: FhirClient, resource_type: str, params: list[tuple[str, str]]) -> str:
    found = await client.search_all(resource_type, params)
    return f"allowed ({len(found)} found for the probe's made-up subject)" if found else "allowed"


async def _write(settings: Settings, client: FhirClient) -> str:
    """The probe's one Provenance: a conditional create on its tag, then found again by the tag."""
    system = f"{settings.alerts.canonical_base}/probe"
    author = settings.alerts.author
    provenance: FhirJson = {
        "resourceType": "Provenance",
        "meta": {"tag": [{"system": system, "code": PROBE_CODE}]},
        "target": [{"reference": author}],
        "recorded": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "agent": [
            {"who": {"reference": author, "display": f"neutrowatch {profiles.software_version()} probe"}}
        ],
    }
    _body, status = await client.create(provenance, if_none_exist=f"_tag={system}|{PROBE_CODE}")
    found = await client.search_all("Provenance", [("_tag", f"{system}|{PROBE_CODE}")])
    if len(found) != 1:
        raise NeutrowatchError(
            f"written (HTTP {status}) but {len(found)} found by its tag: "
            "conditional create or _tag search is not honoured"
        )
    done = (
        "created the probe Provenance"
        if status == 201
        else "the probe Provenance exists already, nothing written"
    )
    return f"{done} (HTTP {status}), found again by its tag"


async def _profiles_present(settings: Settings, client: FhirClient) -> str:
    base = settings.alerts.canonical_base
    urls = [
        profiles.profile_url(base, p)
        for p in (profiles.FLAG_PROFILE, profiles.COMMUNICATION_PROFILE, profiles.PROVENANCE_PROFILE)
    ]
    found = {r.get("url") for r in await client.search_all("StructureDefinition", [("url", ",".join(urls))])}
    absent = [u.rsplit("/", 1)[1] for u in urls if u not in found]
    if not absent:
        return "the claimed profiles are on the server"
    return (
        f"allowed; {', '.join(absent)} not on the server: "
        "a server that validates claimed profiles will refuse "
        "the writes (`python -m service profiles install`, or alerts.claim_profiles: false)"
    )


async def _store(settings: Settings, failures: int) -> int:
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
