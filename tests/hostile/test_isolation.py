"""No single input may silence monitoring: adding any one hostile resource to a population leaves
every other patient's decisions and alert resources exactly as they were — in replay and in the live
loop — and a panel whose deciding or building fails is quarantined while the cycle goes on.

The population comes from `tests.synthetic`; the hostile resource from the whole corpus
(tests/hostile/corpus.py: dates, references, values, sizes, encodings), either for a patient of its
own or aimed at a patient of the population. A rejected hostile resource aimed at a population
patient must not change even that patient's alerts.
"""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.__main__ import main as cli
from service.output.events import QUARANTINED
from tests.fhir_server.load import export, put_all
from tests.hostile.corpus import BY_NAME, CORPUS, LINE_ONLY, UPDATED, Hostile, Outcome
from tests.hostile.middleman import Middleman, Splice
from tests.hostile.test_live_hostile import _quarantine_and_decisions, counter, delta
from tests.integration.live import cycle, population, settings_for

POPULATION = population(patients=8, days=28, seed=11)
PATIENTS = sorted({r["subject"]["reference"] for r in POPULATION if r["resourceType"] == "Observation"})
REPLAY_STAMP = "2026-03-01T10:00:00.000Z"  # later than every synthetic collection


def _aimed(item: Hostile, target: str | None, stamp: str) -> list[bytes]:
    """The hostile resource (and its partner results) as bytes, for its own patient or `target`."""
    out = item.resources(stamp)
    if target is not None:
        out = [r.replace(item.patient.encode() + b'"', target.encode() + b'"') for r in out]
    return out


def _by_patient(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[r.get("patient") or ""].append(r)
    return out


def _alerts_by_patient(resources: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in resources:
        if r["resourceType"] in ("Flag", "Communication"):
            out[r["subject"]["reference"]].append(r)
    return out


def _replay(
    tmp: Path, extra: list[bytes], *, alerts: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "input.ndjson"
    data.write_bytes(
        b"".join(orjson.dumps(r) + b"\n" for r in POPULATION) + b"".join(e + b"\n" for e in extra)
    )
    events, out = tmp / "events.jsonl", tmp / "alerts.ndjson"
    args = ["replay", str(data), "--events", str(events)] + (["--alerts", str(out)] if alerts else [])
    # Hypothesis raises the interpreter's recursion limit while a test runs; the service runs with
    # Python's default, which is what decides how deep a document the C decoders read.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        assert cli(args) == 0
    finally:
        sys.setrecursionlimit(limit)

    def read(p):
        return [orjson.loads(x) for x in p.read_bytes().splitlines()] if p.exists() else []

    return read(events), read(out)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    events, alerts = _replay(tmp_path_factory.mktemp("baseline"), [])
    assert any(e["event"] == "new" for e in events), (
        "the population raises no alert: the property would prove nothing"
    )
    return _by_patient(events), _alerts_by_patient(alerts)


def _assert_isolated(
    baseline: Any,
    events: list[dict[str, Any]],
    alerts: list[dict[str, Any]],
    item: Hostile,
    target: str | None,
) -> None:
    base_events, base_alerts = baseline
    got_events, got_alerts = _by_patient(events), _alerts_by_patient(alerts)
    for patient in PATIENTS:
        if patient == target:
            if item.outcome is Outcome.ACCEPTED:
                continue  # a readable result of the target's own may change the target's episode
            kept = [e for e in got_events[patient] if e["event"] != "rejected"]
            assert kept == [e for e in base_events[patient] if e["event"] != "rejected"], (item.name, patient)
        else:
            assert got_events[patient] == base_events[patient], (item.name, patient)
        assert got_alerts[patient] == base_alerts[patient], (item.name, patient)
    if item.outcome is not Outcome.ACCEPTED:
        assert not got_alerts.get(item.patient), f"{item.name} raised an alert"


@pytest.mark.parametrize("item", CORPUS, ids=lambda h: h.name)
def test_replay_one_hostile_resource_changes_no_other_patient(baseline, tmp_path, item: Hostile):
    """Every corpus item, for a patient of its own, beside the population: every population
    patient's events and alert resources are byte-for-byte those of the population alone."""
    events, alerts = _replay(tmp_path, _aimed(item, None, REPLAY_STAMP))
    _assert_isolated(baseline, events, alerts, item, None)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    item=st.sampled_from([h for h in CORPUS if h.outcome is not Outcome.ACCEPTED]),
    target=st.sampled_from(PATIENTS),
)
def test_replay_hostile_resource_aimed_at_a_patient_changes_nothing_alerted(
    baseline, tmp_path_factory, item, target
):
    """A rejected hostile resource naming a population patient adds a rejection and nothing else:
    that patient's alerts and every other patient's records stay as they were."""
    events, alerts = _replay(tmp_path_factory.mktemp("aimed"), _aimed(item, target, REPLAY_STAMP))
    _assert_isolated(baseline, events, alerts, item, target)


# -- containment: a panel that cannot be decided or built ---------------------------------------------


class Defect(RuntimeError):
    """Stands for any defect met while one patient's writes are built (its message quotes input)."""


@pytest.fixture
def defect_for(monkeypatch):
    """Make building the alert writes raise for one patient: the code path a value no writer accepts,
    or any other defect, takes. Everything else runs for real."""
    import service.output.outcomes as outcomes

    real = outcomes.build

    def arm(patient: str) -> None:
        def build(event: Any, *args: Any, **kwargs: Any) -> Any:
            if event.patient == patient:
                raise Defect(f"cannot build for {patient} born 1961-07-14")
            return real(event, *args, **kwargs)

        monkeypatch.setattr(outcomes, "build", build)

    return arm


def test_replay_quarantines_the_failing_panel_and_decides_the_rest(baseline, tmp_path, defect_for):
    """`replay` and `replay --alerts` alike: the failing patient's alerting panels become
    `quarantined` records naming the exception class (not its message), its state stays as before
    them, and every other patient is exactly as without the defect."""
    victim = next(p for p in PATIENTS if any(e["event"] == "new" for e in baseline[0][p]))
    defect_for(victim)
    with_alerts, alerts = _replay(tmp_path / "a", [])
    without, _ = _replay(tmp_path / "b", [], alerts=False)
    assert with_alerts == without  # replay predicts only what the live loop can send
    quarantined = [e for e in with_alerts if e["event"] == QUARANTINED]
    assert quarantined and {e["patient"] for e in quarantined} == {victim}
    assert all(e["reason"] == "could not be decided: Defect" and e["observations"] for e in quarantined)
    assert not any("1961" in orjson.dumps(e).decode() for e in quarantined)
    assert not _alerts_by_patient(alerts).get(victim)
    got = _by_patient(with_alerts)
    for patient in PATIENTS:
        if patient != victim:
            assert got[patient] == baseline[0][patient]


# -- the live loop ------------------------------------------------------------------------------------

LIVE_ITEMS = [
    "effective-no-offset",
    "effective-offset-without-colon",
    "effective-date-only",
    "effective-far-future",
    "effective-year-one",
    "nan-token",
    "huge-value",
    "megabyte-subject",
    "megabyte-note",
    "deeply-nested",
    "value-and-data-absent-reason",
    "free-text-subject",
    "code-with-whitespace",
]


def _server_alerts(base_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Per patient, what the server holds of its alerts (the parts that do not depend on when they
    were sent)."""
    out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for f in export(base_url, "Flag"):
        out[f["subject"]["reference"]].append(
            (
                "Flag",
                orjson.dumps(f["identifier"]),
                f["status"],
                orjson.dumps(f["period"]),
                orjson.dumps(f.get("code")),
            )
        )
    for c in export(base_url, "Communication"):
        out[c["subject"]["reference"]].append(
            (
                "Communication",
                orjson.dumps(c["identifier"]),
                c["priority"],
                orjson.dumps(c.get("recipient")),
                orjson.dumps(c.get("payload")),
            )
        )
    return {k: sorted(v) for k, v in out.items()}


async def _live(base_url: str, state: Path, entries: list[bytes]) -> dict[str, list[tuple[Any, ...]]]:
    middleman = Middleman(base_url, [Splice(entries, times=1)] if entries else [])
    await middleman.start()
    try:
        settings = settings_for(middleman.base, state, page_size=100)
        for _ in range(2):
            report = await cycle(settings)
            assert report.delivered_all
    finally:
        await middleman.stop()
    return _server_alerts(base_url)


@pytest.fixture(scope="module")
def live_baseline(fhir_engine, tmp_path_factory) -> dict[str, list[tuple[Any, ...]]]:
    fhir_engine.reset()
    put_all(fhir_engine.base_url, POPULATION)
    got = asyncio.run(_live(fhir_engine.base_url, tmp_path_factory.mktemp("live-base") / "s.sqlite3", []))
    assert any(got.get(p) for p in PATIENTS), (
        "the population raised no alert: the property would prove nothing"
    )
    return got


@pytest.mark.parametrize("aim", ["own patient", "population patient"])
@pytest.mark.parametrize("name", LIVE_ITEMS)
async def test_live_one_hostile_resource_changes_no_other_patient(
    fhir_engine, live_baseline, tmp_path, name, aim
):
    """The live loop against the real engine: one hostile resource spliced into a search page; the
    server's Flags and Communications of every population patient are those of the population
    alone (a rejected resource aimed at a population patient changes not even its alerts)."""
    item = BY_NAME[name]
    assert name not in LINE_ONLY
    target = PATIENTS[len(name) % len(PATIENTS)] if aim == "population patient" else None
    fhir_engine.reset()
    put_all(fhir_engine.base_url, POPULATION)
    got = await _live(fhir_engine.base_url, tmp_path / "s.sqlite3", _aimed(item, target, UPDATED))
    for patient in PATIENTS:
        if patient == target and item.outcome is Outcome.ACCEPTED:
            continue
        assert got.get(patient, []) == live_baseline.get(patient, []), (name, patient)
    if item.outcome is not Outcome.ACCEPTED:
        assert not got.get(item.patient), f"{name} raised an alert"


async def test_live_quarantines_the_failing_panel_and_the_cycle_goes_on(
    fhir_engine, live_baseline, tmp_path, defect_for
):
    """A defect while one patient's writes are built: that panel is quarantined (decision log,
    neutrowatch_panel_failures_total, an error log line with ids only), every other patient is
    alerted as without it, the cycle completes and the cursor advances."""
    victim = next(p for p in PATIENTS if live_baseline.get(p))
    defect_for(victim)
    fhir_engine.reset()
    put_all(fhir_engine.base_url, POPULATION)
    failures = counter("neutrowatch_panel_failures_total", "error")
    polls = counter("neutrowatch_polls_total", "outcome")
    state = tmp_path / "s.sqlite3"
    got = await _live(fhir_engine.base_url, state, [])
    assert delta(counter("neutrowatch_panel_failures_total", "error"), failures)["Defect"] >= 1
    assert "error" not in delta(counter("neutrowatch_polls_total", "outcome"), polls)
    assert not got.get(victim)
    for patient in PATIENTS:
        if patient != victim:
            assert got.get(patient, []) == live_baseline.get(patient, []), patient
    _quarantine, decisions = await _quarantine_and_decisions(state)
    quarantined = [d for d in decisions if d["event"] == QUARANTINED]
    assert quarantined and {d["patient"] for d in quarantined} == {victim}
    assert all(d["reason"] == "could not be decided: Defect" for d in quarantined)
    assert await _cursor(settings_for(fhir_engine.base_url, state)) is not None  # the cycle moved on


async def _cursor(settings: Any) -> str | None:
    from service.live.store import make_store

    store = make_store(settings.store)
    await store.open()
    try:
        return await store.get_cursor()
    finally:
        await store.close()


async def test_a_cycle_failed_by_a_defect_is_counted_and_named(fhir_engine, tmp_path, monkeypatch):
    """An exception that fails a whole cycle (here a defect in the store's commit) is counted in
    neutrowatch_polls_total{outcome="error"} and logged with its type, not its message; the next
    cycle, without the defect, delivers."""
    from service.live.store.sqlite import SqliteStore
    from tests.hostile.logs import captured_logs

    fhir_engine.reset()
    put_all(fhir_engine.base_url, POPULATION)
    real = SqliteStore.commit

    async def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise Defect("quoting Ophelia Quennell-Marchetti")

    monkeypatch.setattr(SqliteStore, "commit", broken)
    polls = counter("neutrowatch_polls_total", "outcome")
    settings = settings_for(fhir_engine.base_url, tmp_path / "s.sqlite3")
    with captured_logs("debug") as buffer, pytest.raises(Defect):
        await cycle(settings)
    assert delta(counter("neutrowatch_polls_total", "outcome"), polls)["error"] == 1
    (line,) = [orjson.loads(x) for x in buffer.getvalue().splitlines() if '"poll cycle failed"' in x]
    assert line["error_type"] == "Defect" and "Ophelia" not in orjson.dumps(line).decode()
    monkeypatch.setattr(SqliteStore, "commit", real)
    assert (await cycle(settings)).delivered_all
