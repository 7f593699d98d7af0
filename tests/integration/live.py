"""Shared helpers of the live-loop tests: settings for the test engine, staging data, and the
replay oracle (what replay predicts for the resources as the server holds them)."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import orjson
import yaml

from service.__main__ import main as cli
from service.config import Settings
from service.fhir.client import FhirClient
from service.live.store import make_store
from service.live.worker import Worker
from tests.fhir_server.load import export, export_history
from tests.synthetic import PopulationSpec, generate

Resource = dict[str, Any]
POOL = ("CareTeam/oncology",)  # the configured recipient pool of the tests (live loop and oracle alike)


async def cycle(settings: Settings, *, with_decisions: bool = False, client: FhirClient | None = None) -> Any:
    """One worker cycle with a fresh store connection and client (as a restarted process would);
    `client`: the one of a process that goes on running instead."""
    store = make_store(settings.store)
    await store.open()
    try:
        assert await store.lead(), "another test process holds the store"
        async with contextlib.AsyncExitStack() as stack:
            if client is None:
                client = await stack.enter_async_context(FhirClient(settings.fhir))
            report = await Worker(settings, client, store).run_cycle()
            if not with_decisions:
                return report
            return report, msgspec.to_builtins(await store.decisions())  # as JSON, to compare with replay's
    finally:
        await store.close()


def settings_for(base_url: str, state: Path | dict[str, Any], **poll: Any) -> Settings:
    """Settings for the test engine; `state` is a SQLite path or a whole store section (PostgreSQL)."""
    return Settings(
        fhir={
            "base_url": base_url,
            "allow_insecure_http": True,
            "page_size": poll.pop("page_size", 50),
            "timeout_seconds": 10,
            "retry": {"max_attempts": 3, "backoff_base_seconds": 0.05, "backoff_max_seconds": 0.5},
        },
        store=state if isinstance(state, dict) else {"path": state},
        poll={
            "interval_seconds": 0.5,
            "overlap_seconds": 120,
            "settle_seconds": 0,
            "initial_lookback_hours": 24,
            **poll,
        },
        alerts={"recipients": list(POOL)},
        web={"host": "127.0.0.1", "port": 0},
    )


def postgres_store(dsn: str, schema: str, **more: Any) -> dict[str, Any]:
    return {"backend": "postgres", "dsn": dsn, "schema_name": schema, "pool_size": 3, **more}


def population(
    patients: int = 12, days: int = 42, seed: int = 3, *, temperatures: bool = False, corrections: float = 0.0
) -> list[Resource]:
    """A synthetic population (by default without temperatures and corrections)."""
    spec = PopulationSpec(
        patients=patients, days=days, seed=seed, corrections=corrections, temperatures=temperatures
    )
    return list(generate(spec))


def stages(resources: list[Resource], n: int) -> list[list[Resource]]:
    size = -(-len(resources) // n)
    return [resources[i : i + size] for i in range(0, len(resources), size)]


def oracle(
    base_url: str,
    workdir: Path,
    *,
    history: bool = False,
    accepted_foreign_bases: tuple[str, ...] = (),
    more_config: dict[str, Any] | None = None,
) -> tuple[list[dict], list[Resource]]:
    """Replay over the Patients, Conditions, Observations (every version with `history`) and
    DiagnosticReports as the server holds them now, with the server's base as fhir.base_url (an
    absolute reference under it is the relative one, as in the live loop)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "server.ndjson"
    observations = export_history(base_url, "Observation") if history else export(base_url, "Observation")
    kinds = ("Patient", "Condition", "ServiceRequest", "CareTeam", "DiagnosticReport")
    resources = [r for t in kinds for r in export(base_url, t)] + observations
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    events, alerts = workdir / "events.jsonl", workdir / "alerts.ndjson"
    config = workdir / "oracle.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "alerts": {"recipients": list(POOL)},
                "fhir": {
                    "base_url": base_url,
                    "allow_insecure_http": True,
                    "accepted_foreign_bases": list(accepted_foreign_bases),
                },
                **(more_config or {}),
            }
        )
    )
    assert (
        cli(["replay", str(data), "--events", str(events), "--alerts", str(alerts), "--config", str(config)])
        == 0
    )
    read = lambda p: [orjson.loads(x) for x in p.read_bytes().splitlines()]  # noqa: E731 - a local one-liner
    return read(events), read(alerts)


def identifier(resource: Resource) -> str:
    (ident,) = resource["identifier"]
    return f"{ident['system']}|{ident['value']}"


def compare_with_oracle(
    base_url: str,
    workdir: Path,
    *,
    history: bool = False,
    accepted_foreign_bases: tuple[str, ...] = (),
    more_config: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Assert the server holds exactly the alerts replay predicts: every Communication once, every
    episode's Flag once with the final status. Returns counts for the caller's own assertions."""
    _events, predicted = oracle(
        base_url,
        workdir,
        history=history,
        accepted_foreign_bases=accepted_foreign_bases,
        more_config=more_config,
    )
    want_comms = [identifier(r) for r in predicted if r["resourceType"] == "Communication"]
    want_flags = {identifier(r): r for r in predicted if r["resourceType"] == "Flag"}  # last state wins
    comms = export(base_url, "Communication")
    flags = export(base_url, "Flag")
    got_comms = Counter(identifier(c) for c in comms)
    duplicated = {k: v for k, v in got_comms.items() if v > 1}
    assert not duplicated, f"duplicated Communications: {duplicated}"
    assert set(got_comms) == set(want_comms), (
        f"missing {sorted(set(want_comms) - set(got_comms))[:5]}, "
        f"unexpected {sorted(set(got_comms) - set(want_comms))[:5]}"
    )
    got_flags = Counter(identifier(f) for f in flags)
    assert all(v == 1 for v in got_flags.values()), f"duplicated Flags: {got_flags.most_common(3)}"
    assert set(got_flags) == set(want_flags)
    for f in flags:
        want = want_flags[identifier(f)]
        assert (f["status"], f["period"]) == (want["status"], want["period"]), identifier(f)
    by_id = {identifier(c): c for c in comms}
    for c in predicted:
        if c["resourceType"] == "Communication":
            got = by_id[identifier(c)]
            assert (got["priority"], got.get("recipient")) == (c["priority"], c.get("recipient")), identifier(
                c
            )
    return {"communications": len(comms), "flags": len(flags)}
