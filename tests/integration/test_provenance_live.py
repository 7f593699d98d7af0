"""Provenance in the live write path: every alert write the worker posts is followed by its
Provenance, posted once the server has confirmed the Flag and the Communication, and what the server
then holds, whether it runs a transaction atomically or as a batch (every test runs on both engines),

(a) has exactly one Provenance per Communication and per Flag-only (chronic, recovering) update, whose targets
    are the server ids of that Flag and Communication, whose entities are the source Observations
    by version, whose agent is the configured author and whose `recorded` is an instant;
(b) is the Flag / Communication / Provenance set replay (--provenance) predicts, modulo
    server-assigned ids, references and the send time;
(c) validates against fhir_profiles/ with validate.mjs;
(d) holds one Provenance per write even when a write was applied but its answer was lost (502)
    and it was posted again;
(e) has no Provenance whose target does not exist when the server refused a Flag or a
    Communication entry: a batch server answers mixed statuses and keeps the rest.
"""

from __future__ import annotations

import copy
import json
import re
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import metrics
from service.__main__ import main as cli
from service.config import Settings
from service.core.codes import temperature_codes
from service.fhir.client import FhirClient
from service.live import report as report_module
from service.live.store import make_store
from service.live.store.base import OutboxEntry
from service.live.worker import Worker
from service.output import alerts
from service.output.transaction import Delivery, OutboxWrites, decode_outbox_writes
from tests.builders import observation
from tests.chaos.proxy import APPLIED_502, Fault, Proxy, outcome
from tests.fhir_server.load import export, export_history, put_all
from tests.integration.live import POOL, compare_with_oracle, cycle, population, settings_for, stages
from tests.integration.test_profiles import describe, validate_resources

pytestmark = pytest.mark.integration

Resource = dict[str, Any]
INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
VERSIONED = re.compile(r"^Observation/([A-Za-z0-9\-.]+)/_history/([A-Za-z0-9\-.]+)$")


@pytest.fixture
def fhir_base_url(fhir_base_url_each_mode: str) -> str:
    """Every test here runs against both engines: transactions atomic, and processed as batches."""
    return fhir_base_url_each_mode


# -- data ----------------------------------------------------------------------------------------------


def cbc(pid: str, anc_k: float | None, when: str, **kw: Any) -> list[Resource]:
    common = dict(patient=f"Patient/{pid}", effective=when, specimen=f"Specimen/{pid}-{when[:10]}")
    return [
        observation("6690-2", 3.0, id=f"{pid}-{when[:10]}-wbc", **common),
        observation("751-8", anc_k, id=f"{pid}-{when[:10]}-anc", **common, **kw),
    ]


def temperature(pid: str, celsius: float, when: str) -> Resource:
    return observation(
        "8310-5",
        celsius,
        "Cel",
        id=f"{pid}-t-{when[:10]}",
        patient=f"Patient/{pid}",
        effective=when,
        specimen=None,
        category=[{"coding": [{"code": "vital-signs"}]}],
    )


def corrected(resource: Resource, anc_k: float | None, status: str) -> Resource:
    fixed = copy.deepcopy(resource)
    fixed["status"] = status
    if anc_k is None:
        fixed.pop("valueQuantity", None)
    else:
        fixed["valueQuantity"]["value"] = anc_k
    return fixed


def scenario() -> list[list[Resource]]:
    """Stages of a small population whose writes cover every kind of write:
    wf: new (mild) -> worsening (severe) and febrile (fever 2 h later) -> chronic (Flag only, day 105);
    cx: new (severe) -> its ANC corrected to mild (a withdrawal, the Flag updated);
    ei: new (moderate) -> its ANC entered in error (a withdrawal, the Flag entered-in-error)."""
    cx, ei = cbc("cx", 0.3, "2026-01-06T09:00:00Z"), cbc("ei", 0.7, "2026-01-06T10:00:00Z")
    return [
        [*cbc("wf", 1.2, "2026-01-05T08:00:00Z"), *cx, *ei],
        [
            *cbc("wf", 0.3, "2026-01-07T08:00:00Z"),
            temperature("wf", 39.0, "2026-01-07T10:00:00Z"),
            corrected(cx[1], 1.1, "corrected"),
        ],
        [corrected(ei[1], None, "entered-in-error")],
        cbc("wf", 0.4, "2026-04-20T08:00:00Z"),
    ]


# -- reading back --------------------------------------------------------------------------------------


def held(base_url: str) -> dict[str, list[Resource]]:
    return {t: export(base_url, t) for t in ("Flag", "Communication", "Provenance")}


def identifier(resource: Resource) -> tuple[str, str]:
    (ident,) = resource["identifier"]
    return ident["system"], ident["value"]


def tag(provenance: Resource) -> tuple[str, str]:
    (t,) = provenance["meta"]["tag"]
    return t["system"], t["code"]


def read(base_url: str, reference: str) -> Resource:
    with urllib.request.urlopen(f"{base_url}/{reference}", timeout=30) as response:
        return json.loads(response.read())


def predicted(base_url: str, workdir: Path, *, history: bool) -> dict[str, list[Resource]]:
    """Replay --provenance over the Observations (every version with `history`) as the server holds them."""
    workdir.mkdir(parents=True, exist_ok=True)
    observations = export_history(base_url, "Observation") if history else export(base_url, "Observation")
    data, events, out, config = (
        workdir / n for n in ("server.ndjson", "events.jsonl", "alerts.ndjson", "oracle.yaml")
    )
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in observations))
    config.write_text(f"alerts:\n  recipients: {list(POOL)}\n")
    args = [
        "replay",
        str(data),
        "--events",
        str(events),
        "--alerts",
        str(out),
        "--config",
        str(config),
        "--provenance",
    ]
    assert cli(args) == 0
    written = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    return {
        t: [r for r in written if r["resourceType"] == t] for t in ("Flag", "Communication", "Provenance")
    }


# -- (a) one Provenance per write, pointing at what was written -----------------------------------------


def check_provenances(
    base_url: str, settings: Settings, got: dict[str, list[Resource]], flag_only: int
) -> None:
    flags = {f"Flag/{f['id']}": f for f in got["Flag"]}
    comms = {f"Communication/{c['id']}": c for c in got["Communication"]}
    provenances = got["Provenance"]
    tags = Counter(tag(p) for p in provenances)
    assert all(n == 1 for n in tags.values()), f"a Provenance written twice: {tags.most_common(2)}"
    assert len(provenances) == len(comms) + flag_only
    for_comm = Counter(
        t["reference"] for p in provenances for t in p["target"] if t["type"] == "Communication"
    )
    assert for_comm == Counter(dict.fromkeys(comms, 1)), "each Communication has exactly one Provenance"
    for p in provenances:
        flag_target, *comm_target = p["target"]
        assert flag_target["type"] == "Flag" and flag_target["reference"] in flags, flag_target
        assert identifier(flags[flag_target["reference"]]) == (
            flag_target["identifier"]["system"],
            flag_target["identifier"]["value"],
        )
        comm = None
        if comm_target:
            (target,) = comm_target
            comm = comms[target["reference"]]
            assert identifier(comm) == (target["identifier"]["system"], target["identifier"]["value"])
            assert tag(p)[1] == identifier(comm)[1]
            assert p["recorded"] == comm["sent"]
            # the Communication names the Flag of the same write
            assert comm["about"][0]["identifier"] == flag_target["identifier"]
        else:
            # a Flag-only update: chronic, recovering, or the withdrawal of a recovering
            assert ("-chronic-" in tag(p)[1] or "-recovering-" in tag(p)[1]) and p["extension"][0][
                "valueCoding"
            ]["code"] in ("chronic", "recovering", "retracted")
        assert INSTANT.match(p["recorded"]), p["recorded"]
        (agent,) = p["agent"]
        assert agent["who"]["reference"] == settings.alerts.author
        event = p["extension"][0]["valueCoding"]["code"]
        entities = [e["what"]["reference"] for e in p.get("entity", [])]
        results = entities[:-1] if event == "febrile" else entities
        assert all(VERSIONED.match(ref) for ref in results), entities
        assert results or event == "retracted", (
            "only a withdrawal of a result no longer on record has no source"
        )
        for ref in results:  # each names a version the server holds
            obs_id, vid = VERSIONED.match(ref).groups()  # type: ignore[union-attr]  # versioned refs
            found = read(base_url, ref)
            assert (found["id"], found["meta"]["versionId"]) == (obs_id, vid)
        for ref in entities[len(results) :]:  # the febrile temperature, by id (its version is not kept)
            assert {c["code"] for c in read(base_url, ref)["code"]["coding"]} & set(temperature_codes())
        if comm is not None:  # the results the announcement is about, then (febrile) the temperature
            about = [a["reference"] for a in comm["about"][1:]]
            assert [ref.split("/_history/")[0] for ref in results] == about


# -- (b) what replay predicts, modulo what the server assigns ------------------------------------------


def normalised(resource: Resource) -> Resource:
    out = {k: v for k, v in resource.items() if k not in ("id", "sent", "recorded")}
    out["meta"] = {k: v for k, v in resource["meta"].items() if k in ("profile", "tag")}
    if resource["resourceType"] == "Provenance":
        out["target"] = [{k: v for k, v in t.items() if k != "reference"} for t in resource["target"]]
    return out


def check_against_replay(got: dict[str, list[Resource]], want: dict[str, list[Resource]]) -> None:
    last_flags = {identifier(f): f for f in want["Flag"]}  # replay writes each version: the last one stands
    assert {identifier(f): normalised(f) for f in got["Flag"]} == {
        k: normalised(f) for k, f in last_flags.items()
    }
    assert len(got["Communication"]) == len(want["Communication"])
    assert {identifier(c): normalised(c) for c in got["Communication"]} == {
        identifier(c): normalised(c) for c in want["Communication"]
    }
    assert len(got["Provenance"]) == len(want["Provenance"])
    assert {tag(p): normalised(p) for p in got["Provenance"]} == {
        tag(p): normalised(p) for p in want["Provenance"]
    }


def check_valid(got: dict[str, list[Resource]]) -> None:
    resources = [r for rs in got.values() for r in rs]
    failures = validate_resources(resources)
    assert not failures, describe(failures)


# -- the live loop -------------------------------------------------------------------------------------


async def test_every_kind_of_write_leaves_one_provenance_as_replay_predicts(fhir_base_url, tmp_path, state):
    settings = settings_for(fhir_base_url, state)
    seen: Counter[str] = Counter()
    for stage in scenario():
        put_all(fhir_base_url, stage)
        report = await cycle(settings)
        assert report.delivered_all
        seen.update(report.events)
    assert {"new", "worsening", "febrile", "chronic", "retracted"} <= set(seen), seen
    got = held(fhir_base_url)
    check_provenances(fhir_base_url, settings, got, flag_only=seen["chronic"] + seen["recovering"])
    assert len(got["Provenance"]) == sum(seen.values())  # one per event, each its own write
    check_against_replay(got, predicted(fhir_base_url, tmp_path / "oracle", history=True))
    check_valid(got)
    # Nothing new: nothing written, nothing doubled.
    again = await cycle(settings)
    assert again.written == 0
    assert held(fhir_base_url) == got


async def test_population_in_stages_leaves_one_provenance_per_write(fhir_base_url, tmp_path):
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    seen: Counter[str] = Counter()
    for stage in stages(population(patients=24, days=56, seed=1, temperatures=True), 3):
        put_all(fhir_base_url, stage)
        report = await cycle(settings)
        assert report.delivered_all
        seen.update(report.events)
    assert {"new", "worsening", "resolved", "febrile"} <= set(seen), seen
    compare_with_oracle(fhir_base_url, tmp_path / "oracle")
    got = held(fhir_base_url)
    check_provenances(fhir_base_url, settings, got, flag_only=seen["chronic"] + seen["recovering"])
    check_against_replay(got, predicted(fhir_base_url, tmp_path / "oracle-prov", history=False))
    check_valid(got)


# -- (d) a lost answer, posted again -------------------------------------------------------------------


def applied_502(_status: int, _headers: dict[str, str], _body: bytes) -> tuple[int, dict[str, str], bytes]:
    return (
        502,
        {"Content-Type": "application/fhir+json"},
        orjson.dumps(outcome("transient", "injected after the write was applied")),
    )


# Text found only in the transaction of one write of scenario(): wf's first announcement (its
# current ANC is the panel of 5 January), its worsening, its chronic label.
ONLY_IN = {
    "new": b"collected 2026-01-05T08:00:00Z (",
    "worsening": b"Neutropenia worsening to",
    "chronic": b"-chronic-",
}


@pytest.mark.parametrize("times", [1, 3], ids=["client-retry", "next-cycle"])
@pytest.mark.parametrize("event", sorted(ONLY_IN))
async def test_a_lost_answer_reposted_leaves_one_provenance(fhir_base_url, tmp_path, event, times):
    """The write of `event` is applied upstream and answered 502: `times` 1, the client posts it
    again at once; 3 (every attempt of the cycle), the next cycle posts it again. A conditional
    create (new), a versioned PUT whose retry meets 412 (worsening), a Flag-only PUT (chronic)."""
    proxy = Proxy(fhir_base_url)
    await proxy.start()
    try:
        settings = settings_for(proxy.base, tmp_path / "s.sqlite3")
        assert settings.fhir.retry.max_attempts == 3
        fault = proxy.add(
            Fault(
                lambda r: r.method == "POST" and r.path == proxy.prefix,
                times=times,
                mutate=applied_502,
                kind=APPLIED_502,
                body_contains=ONLY_IN[event],
            )
        )
        seen: Counter[str] = Counter()
        undelivered = 0
        for stage in scenario():
            put_all(fhir_base_url, stage)
            report = await cycle(settings)
            undelivered += not report.delivered_all
            seen.update(report.events)
        while not (await cycle(settings)).delivered_all:
            undelivered += 1
            assert undelivered < 5
        assert (proxy.counts[APPLIED_502], fault.times) == (times, 0)
        assert undelivered == (times == 3)
    finally:
        await proxy.stop()
    got = held(fhir_base_url)
    check_provenances(fhir_base_url, settings, got, flag_only=seen["chronic"] + seen["recovering"])
    assert len(got["Provenance"]) == sum(seen.values())
    compare_with_oracle(fhir_base_url, tmp_path / "oracle", history=True)


# -- (e) an entry the server refuses -----------------------------------------------------------------


# Each refusal fails a write for real on the engine (POST /$fault: the next write of that type whose
# JSON holds the text answers 409), in the Bundle the worker posts.
REFUSED = {
    "communication-once": ("Communication", "Neutropenia worsening to", 1),  # wf's worsening announcement
    "flag-once": ("Flag", '"Patient/cx"', 1),  # cx's Flag, when it is created
    "communication-always": ("Communication", '"Patient/ei"', "always"),  # every write of ei's announcements
}


def assert_targets_resolve(base_url: str, provenances: list[Resource]) -> None:
    """Every Provenance target is a resource the server holds: read by its reference, 200."""
    for p in provenances:
        for t in p["target"]:
            found = read(base_url, t["reference"])  # raises HTTPError 404 on a dangling target
            assert (found["resourceType"], found["id"]) == tuple(t["reference"].split("/")), t


@pytest.mark.parametrize("refused", sorted(REFUSED))
async def test_a_refused_entry_leaves_no_provenance_pointing_at_nothing(
    fhir_engine_each_mode, tmp_path, refused
):
    """A Flag or Communication write the server refuses (409). On the batch engine the answer is
    mixed (the other entry kept): it is counted and only the refused entry is posted again, in the
    same write; the Provenance goes only once both targets are confirmed, naming the ids the server
    answered. Refused every time: the write waits in the outbox, no Provenance is posted, and once
    the server accepts it everything is written once. (A Provenance in the same Bundle kept the id
    the batch server had reserved for the refused entry: its target never existed.)"""
    engine = fhir_engine_each_mode
    base_url = engine.base_url
    kind, text, times = REFUSED[refused]
    engine.fault(kind, times=times, contains=text)
    settings = settings_for(base_url, tmp_path / "s.sqlite3")
    mixed_before = metrics.NONATOMIC_TRANSACTIONS._value.get()
    seen: Counter[str] = Counter()
    undelivered = 0
    for stage in scenario():
        put_all(base_url, stage)
        report = await cycle(settings)
        undelivered += not report.delivered_all
        seen.update(report.events)
        assert_targets_resolve(base_url, export(base_url, "Provenance"))  # at every step, not only at the end
    if times == "always":
        assert undelivered == 4  # ei's chain waits from its first write on, the others go on
        refused_patient = {p for p in held(base_url)["Provenance"] if "Patient/ei" in json.dumps(p)}
        assert not refused_patient, "a Provenance was posted although its Communication was refused"
        engine.clear_faults()
        assert (await cycle(settings)).delivered_all
    elif engine.batch_transactions:
        assert undelivered == 0  # mended within the write
        assert metrics.NONATOMIC_TRANSACTIONS._value.get() > mixed_before
    else:
        assert undelivered <= 1  # all or nothing: refused, then written whole
    got = held(base_url)
    assert_targets_resolve(base_url, got["Provenance"])
    check_provenances(base_url, settings, got, flag_only=seen["chronic"] + seen["recovering"])
    assert len(got["Provenance"]) == sum(seen.values())
    compare_with_oracle(base_url, tmp_path / "oracle", history=True)
    check_against_replay(got, predicted(base_url, tmp_path / "oracle-prov", history=True))


# -- the Flag the worker remembers ------------------------------------------------------------------


async def test_an_update_of_a_flag_the_worker_wrote_needs_no_search_and_a_stale_one_is_read_again(
    fhir_base_url, tmp_path, monkeypatch
):
    """One worker over the scenario's stages, as the running service keeps it: the Flag a write
    creates or updates is remembered from the server's answer (id, version, content), so the
    episode's next update is a versioned PUT without an identifier search first (2 requests a write,
    not 3). When someone else changed that Flag meanwhile, the PUT's If-Match is stale: 412, the Flag
    is read again (one search) and the write goes through, ending as replay predicts."""
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    searched: list[str] = []
    original = FhirClient.search_all

    async def counting(self: FhirClient, resource_type: str, params: Any) -> list[Resource]:
        if resource_type == "Flag":
            searched.append(dict(params)["identifier"])
        return await original(self, resource_type, params)

    monkeypatch.setattr(FhirClient, "search_all", counting)
    store = make_store(settings.store)
    await store.open()
    seen: Counter[str] = Counter()
    per_stage: list[int] = []
    try:
        assert await store.lead()
        async with FhirClient(settings.fhir) as client:
            worker = Worker(settings, client, store)
            for i, stage in enumerate(scenario()):
                if i == 2:  # before ei's withdrawal: its Flag is changed by someone else
                    (flag,) = [
                        f for f in export(fhir_base_url, "Flag") if f["subject"]["reference"] == "Patient/ei"
                    ]
                    put_all(fhir_base_url, [{**flag, "code": {**flag["code"], "text": "edited elsewhere"}}])
                put_all(fhir_base_url, stage)
                before = len(searched)
                report = await worker.run_cycle()
                assert report.delivered_all
                seen.update(report.events)
                per_stage.append(len(searched) - before)
    finally:
        await store.close()
    assert seen["worsening"] and seen["retracted"] >= 2 and seen["chronic"], seen  # updates in stages 2-4
    assert per_stage == [0, 0, 1, 0], per_stage  # only the Flag changed elsewhere was searched
    got = held(fhir_base_url)
    check_provenances(fhir_base_url, settings, got, flag_only=seen["chronic"] + seen["recovering"])
    compare_with_oracle(fhir_base_url, tmp_path / "oracle", history=True)
    check_against_replay(got, predicted(fhir_base_url, tmp_path / "oracle-prov", history=True))


# -- the worker's transaction --------------------------------------------------------------------------


def recorded_posts(monkeypatch: pytest.MonkeyPatch) -> list[OutboxEntry]:
    """Every outbox entry the worker posts, in order."""
    posted: list[OutboxEntry] = []
    original = Worker._post

    async def record(self: Worker, entry: OutboxEntry) -> Delivery:
        posted.append(entry)
        return await original(self, entry)

    monkeypatch.setattr(Worker, "_post", record)
    return posted


async def post_again(settings: Settings, entry: OutboxEntry) -> Delivery:
    async with FhirClient(settings.fhir) as client:
        return await Worker(settings, client, None)._post(entry)  # type: ignore[arg-type]  # no directory: _post reads none


async def test_a_write_posted_again_changes_nothing(fhir_base_url, tmp_path, monkeypatch):
    """Each patient's last write posted again (as after a lost answer): nothing is created, and a
    Flag the server holds as the write has it is recognised as unchanged although the server added
    meta.versionId and lastUpdated, so the transaction is the Communication and the Provenance only
    (the Provenance alone for a Flag-only write), each found by its conditional create."""
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    posted = recorded_posts(monkeypatch)
    for stage in scenario():
        put_all(fhir_base_url, stage)
        assert (await cycle(settings)).delivered_all
    before = held(fhir_base_url)
    last = {entry.patient: entry for entry in posted}
    # wf: the chronic label (Flag only); cx: the corrected re-announcement (new, revision 1);
    # ei: the withdrawal
    assert sorted(e.writes.event for e in last.values()) == ["chronic", "new", "retracted"]
    for entry in last.values():
        result = await post_again(settings, entry)
        assert result.statuses and all(s.startswith("200") for s in result.statuses), (
            result
        )  # found, not created
        types = [loc.split("/")[0] for loc in result.locations]
        assert types[-1] == "Provenance", types
        # `new` conditionally creates its Flag (found); otherwise the unchanged Flag is not written at all
        assert ("Flag" in types) == (entry.writes.event == "new"), types
    assert held(fhir_base_url) == before


async def test_an_outbox_row_from_before_provenance_still_posts(fhir_base_url, tmp_path, monkeypatch):
    """A write decided by the previous version (no Provenance keys in the outbox) and delivered by
    this one: the Flag and the Communication go out as before, without a Provenance."""

    def old_writes(writes: alerts.AlertWrites, event: str) -> OutboxWrites:
        """As the previous version stored it, and as such a row reads back: no fullUrls, no Provenance."""
        old = {
            "event": event,
            "flag": writes.flag,
            "communication": writes.communication,
            "flag_identifier": list(writes.flag_identifier),
            "communication_identifier": list(writes.communication_identifier)
            if writes.communication_identifier
            else None,
        }
        return decode_outbox_writes(orjson.dumps(old))

    monkeypatch.setattr(report_module, "outbox_writes", old_writes)
    settings = settings_for(fhir_base_url, tmp_path / "s.sqlite3")
    for stage in scenario()[:2]:
        put_all(fhir_base_url, stage)
        assert (await cycle(settings)).delivered_all
    got = held(fhir_base_url)
    assert got["Provenance"] == []
    assert len(got["Flag"]) == 3 and len(got["Communication"]) >= 5
    # The service upgraded: later writes carry their Provenance, targeting the Flag written before.
    monkeypatch.undo()
    for stage in scenario()[2:]:
        put_all(fhir_base_url, stage)
        assert (await cycle(settings)).delivered_all
    after = held(fhir_base_url)
    assert len(after["Provenance"]) == 2  # the withdrawal of ei and the chronic label of wf
    assert {p["target"][0]["reference"] for p in after["Provenance"]} <= {
        f"Flag/{f['id']}" for f in got["Flag"]
    }
    check_valid(after)
