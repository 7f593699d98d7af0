"""The hostile corpus through `replay` (the CLI, in-process): exit 0, no alert from a hostile
input, each one accounted for by an event with its reason, and the valid neighbours in the same
file still processed."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.__main__ import main
from service.config import load_settings
from service.core.copies import UNPLACED
from service.core.observations import CONFLICT as CONFLICT_REASON
from service.fhir import raw
from service.live.store.base import Intake
from service.live.store.sqlite import SqliteStore
from service.live.worker import intake
from service.replay.engine import Replay, ReplayStats
from tests.hostile.corpus import (
    BY_NAME,
    CORPUS,
    LINE_ONLY,
    PHI,
    REPLAY_UPDATED,
    Hostile,
    Outcome,
    bulk_entries,
    duplicate_pair,
    fill,
    neighbour,
    observation,
)

ROOT = Path(__file__).resolve().parents[2]
NEIGHBOURS = ("before", "after")


def read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def replay(tmp_path: Path, *inputs: Path) -> tuple[list[dict], list[dict]]:
    events, alerts = tmp_path / "events.jsonl", tmp_path / "alerts.ndjson"
    assert main(["replay", *map(str, inputs), "--events", str(events), "--alerts", str(alerts)]) == 0
    return read(events), read(alerts)


def neighbour_lines(name: str) -> list[bytes]:
    return [orjson.dumps(fill(r)) for r in neighbour(name)]


def alerted_patients(alerts: list[dict]) -> set[str]:
    return {a["subject"]["reference"] for a in alerts if a["resourceType"] == "Flag"}


def assert_outcome(item: Hostile, events: list[dict]) -> None:
    """The item is accounted for exactly as its class says, and nothing of it alerted."""
    mine = [
        e
        for e in events
        if e["patient"] == item.patient
        or (item.ref and item.ref in e["observations"])
        or (e["event"] == "rejected" and not e["observations"] and e["patient"] is None)
    ]
    if item.outcome is Outcome.ACCEPTED:
        assert mine == [], mine
        return
    assert len(mine) == 1, (item.name, mine)
    (event,) = mine
    assert event["event"] == "rejected" and event["grade"] is None and event["anc"] is None
    assert event["reason"].startswith(item.reason), (item.name, event["reason"])
    if item.outcome is Outcome.REJECTED:
        assert event["observations"] == ([item.ref] if item.ref else []), (item.name, event)
    else:
        assert item.ref in event["observations"]


@pytest.mark.parametrize("item", CORPUS, ids=lambda h: h.name)
def test_each_hostile_item_between_valid_neighbours(tmp_path, item: Hostile):
    lines = [*neighbour_lines("before"), *item.resources(), *neighbour_lines("after")]
    path = tmp_path / "in.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    events, alerts = replay(tmp_path, path)
    assert alerted_patients(alerts) == {
        f"Patient/nb-{n}" for n in NEIGHBOURS
    }  # neighbours processed, nothing else alerted
    assert [e["event"] for e in events if e["patient"] and e["patient"].startswith("Patient/nb-")] == [
        "new",
        "new",
    ]
    assert_outcome(item, events)
    assert len(events) == 2 + (item.outcome is not Outcome.ACCEPTED)  # nothing else, nothing lost


def test_the_whole_corpus_in_one_file_and_as_one_bundle_gives_the_same(tmp_path):
    """As NDJSON lines, and as one Bundle (whose strict parse fails as a whole, so it is read entry
    by entry): the same events, each item accounted for once."""
    items = [h for h in CORPUS if h.name not in LINE_ONLY]
    lines = [*neighbour_lines("before")]
    for item in items:
        lines += item.resources()
    lines += neighbour_lines("after")
    ndjson = tmp_path / "all.ndjson"
    ndjson.write_bytes(b"\n".join(lines) + b"\n")
    bundle = tmp_path / "all.json"
    bundle.write_bytes(
        b'{"resourceType":"Bundle","type":"collection","entry":['
        + b",".join(b'{"resource":' + line + b"}" for line in lines)
        + b"]}"
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    by_line, alerts_a = replay(tmp_path / "a", ndjson)
    by_bundle, alerts_b = replay(tmp_path / "b", bundle)
    assert by_line == by_bundle and alerts_a == alerts_b
    assert alerted_patients(alerts_a) == {"Patient/nb-before", "Patient/nb-after"}
    rejected = [e for e in by_line if e["event"] == "rejected"]
    assert len(rejected) == sum(h.outcome is not Outcome.ACCEPTED for h in items)
    for item in items:
        if item.ref is not None:
            assert_outcome(
                item, [e for e in by_line if item.ref in e["observations"] or e["patient"] == item.patient]
            )


def test_pretty_printed_bundle_with_nan_tokens_keeps_its_neighbours(tmp_path):
    """A pretty-printed Bundle holding NaN tokens used to fall back to reading line by line: every
    line a junk rejection, the valid entries lost. Now each entry is read on its own."""
    resources = [fill(r) for r in neighbour("before") + neighbour("after")]
    text = json.dumps(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": r} for r in resources[:2]]
            + [{"resource": orjson.loads(BY_NAME["quantity-is-a-list"].resources()[0])}]
            + [
                {
                    "resource": {
                        **resources[2],
                        "id": "nan-anc",
                        "valueQuantity": {"value": float("nan"), "unit": "10*3/uL"},
                    }
                }
            ]
            + [{"resource": r} for r in resources[2:]],
        },
        indent=2,
    )
    assert "NaN" in text
    path = tmp_path / "pretty.json"
    path.write_text(text)
    events, alerts = replay(tmp_path, path)
    assert alerted_patients(alerts) == {"Patient/nb-before", "Patient/nb-after"}
    assert sorted(
        (e["event"], tuple(e["observations"]), e.get("reason")) for e in events if e["event"] == "rejected"
    ) == [
        (
            "rejected",
            ("Observation/h-quantity-is-a-list",),
            "malformed: Expected `object | null`, got `array` - at `$.valueQuantity`",
        ),
        ("rejected", ("Observation/nan-anc",), "value is not a finite number"),
    ]


def test_truncated_bundle_file_keeps_the_entries_before_the_cut(tmp_path):
    resources = [fill(r) for r in neighbour("before") + neighbour("after")]
    text = json.dumps(
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]},
        indent=2,
    )
    cut = text.index('"nb-after-anc"')  # inside the last entry
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    events, alerts = replay(tmp_path, path)
    assert alerted_patients(alerts) == {"Patient/nb-before"}
    assert [e["event"] for e in events] == ["new", "rejected"]
    assert (
        events[1]["reason"] == "invalid JSON: Bundle truncated after 3 entries"
        and events[1]["observations"] == []
    )


def test_truncated_and_garbage_lines(tmp_path):
    lines = [
        *neighbour_lines("before"),
        b'{"resourceType":"Observation","id":"h-trunc',
        b"<html>502 Bad Gateway</html>",
        b"\xff\xfe\x00",
        *neighbour_lines("after"),
    ]
    path = tmp_path / "in.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    events, alerts = replay(tmp_path, path)
    assert alerted_patients(alerts) == {"Patient/nb-before", "Patient/nb-after"}
    rejected = [e for e in events if e["event"] == "rejected"]
    assert len(rejected) == 3 and all(
        e["reason"].startswith("invalid JSON") and e["observations"] == [] for e in rejected
    )


def test_a_corrupt_first_line_does_not_make_replay_read_the_file_whole(tmp_path, monkeypatch):
    """A first line that is not JSON but closes like a resource starts NDJSON: the file is read line by
    line (it used to be read into memory whole, to try it as one pretty-printed document)."""
    from service.replay import documents as replay_module

    path = tmp_path / "in.ndjson"
    path.write_bytes(b"\n".join([BY_NAME["nan-token"].resources()[0], *neighbour_lines("after")]) + b"\n")
    wholes: list[int] = []
    original = replay_module._one_document
    monkeypatch.setattr(
        replay_module, "_one_document", lambda data: wholes.append(len(data)) or original(data)
    )
    events, _ = replay(tmp_path, path)
    assert wholes == [] and [e["event"] for e in events] == ["rejected", "new"]


# -- duplicates: same id, versionId and lastUpdated --------------------------------------------------


def _replay_lines(tmp_path: Path, lines: list[bytes], engine: str) -> tuple[bytes, bytes, ReplayStats]:
    path = tmp_path / "copies.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    settings = load_settings(None)
    events_out, alerts_out = io.BytesIO(), io.BytesIO()
    with Replay(settings.rules, settings.alerts, engine=engine) as r:
        stats = r.run([str(path)], events_out, alerts_out)
    return events_out.getvalue(), alerts_out.getvalue(), stats


@pytest.mark.parametrize("engine", ["sqlite", "partitioned"])
def test_conflicting_copies_none_is_used_whatever_the_order(tmp_path, engine):
    """A normal and a severe copy of one version (same id, versionId, lastUpdated): in every order
    of the lines, both are rejected as CONFLICT (one event each), nothing alerts, and the events
    are the same bytes."""
    patient, (first, second, wbc) = duplicate_pair(conflicting=True)
    lines = [r.replace(b"@UPDATED@", b"2026-03-01T10:00:00.000Z") for r in [wbc, first, second]]
    seen = set()
    for order in itertools.permutations(lines):
        events, alerts, stats = _replay_lines(tmp_path, list(order), engine)
        seen.add(events)
        records = [orjson.loads(x) for x in events.splitlines()]
        assert [(e["event"], e["reason"]) for e in records] == [("rejected", CONFLICT_REASON)] * 2
        assert {e["patient"] for e in records} == {patient} and alerts == b""
        assert {tuple(e["observations"]) for e in records} == {("Observation/h-duplicate-conflict",)}
        assert stats.events["rejected"] == 2
    assert len(seen) == 1


def _copies_of_one_observation() -> list[bytes]:
    """An ANC whose version 1 (severe) alerts, whose version 2 came as two copies that conflict
    (severe and normal), read again alike, and a copy without meta (severe): its WBC partner too."""

    def anc(value: float, **meta: str) -> bytes:
        obs = fill(observation("h-order", "Patient/hx-order", value=value))
        return orjson.dumps({**obs, "meta": meta} if meta else {k: v for k, v in obs.items() if k != "meta"})

    wbc = fill(observation("h-order-wbc", "Patient/hx-order", code="6690-2", value=4.0))
    wbc["specimen"] = {"reference": "Specimen/h-order-sp"}
    v2 = {"versionId": "2", "lastUpdated": "2026-03-02T10:00:00.000Z"}
    return [
        orjson.dumps(wbc),
        anc(0.3, versionId="1", lastUpdated=REPLAY_UPDATED),
        anc(0.2, **v2),
        anc(2.5, **v2),
        anc(2.5, **v2),
        anc(0.1),
    ]


@pytest.mark.parametrize("engine", ["sqlite", "partitioned"])
def test_the_events_do_not_depend_on_the_order_of_the_copies(tmp_path, engine):
    """Every order of the ANC's copies (120): the same events and alerts, byte for byte. Version 1 alerts;
    version 2 is a conflict (both contents rejected as CONFLICT), so it is a rejected version that
    withdraws the alert as any unusable correction does; the copy without meta is no version
    (rejected as UNPLACED) and changes nothing; the identical copy is counted, not reported."""
    wbc, *copies = _copies_of_one_observation()
    outputs = set()
    for order in itertools.permutations(copies):
        events, alerts, stats = _replay_lines(tmp_path, [wbc, *order], engine)
        outputs.add((events, alerts))
        assert stats.ignored["identical copy of a version already read"] == 1
    ((events, alerts),) = outputs
    records = [orjson.loads(x) for x in events.splitlines()]
    assert [(e["event"], e.get("reason")) for e in records] == [
        ("new", None),
        ("rejected", CONFLICT_REASON),
        ("retracted", None),
        ("rejected", CONFLICT_REASON),
        ("rejected", UNPLACED),
    ]
    assert b'"Flag"' in alerts


@pytest.mark.parametrize("engine", ["sqlite", "partitioned"])
@pytest.mark.parametrize("where", ["after", "before"])
def test_a_copy_without_meta_changes_nothing(tmp_path, engine, where):
    """A copy without versionId and lastUpdated (severe) of an Observation whose stamped version
    (normal) was read, after it or before it in the input: the events are those without it, and
    one `rejected` event (UNPLACED) for it. It used to be taken as the newest arrival: it overrode
    the stamped version and alerted."""
    wbc, v1, *_rest, no_meta = _copies_of_one_observation()
    normal = v1.replace(b'"value":0.3', b'"value":2.5')
    assert normal != v1
    without, _, _ = _replay_lines(tmp_path, [wbc, normal], engine)
    lines = [wbc, normal, no_meta] if where == "after" else [no_meta, wbc, normal]
    events, alerts, _stats = _replay_lines(tmp_path, lines, engine)
    assert without == b"" and alerts == b""
    (record,) = [orjson.loads(x) for x in events.splitlines()]
    assert (record["event"], record["reason"], record["observations"]) == (
        "rejected",
        UNPLACED,
        ["Observation/h-order"],
    )


@pytest.mark.parametrize("engine", ["sqlite", "partitioned"])
def test_identical_copies_are_one_version(tmp_path, engine):
    patient, (first, second, wbc) = duplicate_pair(conflicting=False)
    path = tmp_path / "dup.ndjson"
    path.write_bytes(
        b"\n".join(r.replace(b"@UPDATED@", b"2026-03-01T10:00:00.000Z") for r in [first, wbc, second]) + b"\n"
    )
    settings = load_settings(None)
    events_out = io.BytesIO()
    with Replay(settings.rules, settings.alerts, engine=engine) as r:
        stats = r.run([str(path)], events_out, None)
    assert events_out.getvalue() == b""  # normal ANC, read once
    assert stats.ignored["identical copy of a version already read"] == 1  # counted, not silent
    assert stats.panels == 1


def _variant(change: Callable[[dict[str, Any]], bytes]) -> bytes:
    obs = fill(observation("h-copy", "Patient/hx-copy", value=0.3))
    return change(obs)


def _reserialised(obs: dict[str, Any]) -> bytes:
    """Other key order, whitespace and number spelling: the same resource."""
    text = json.dumps(dict(reversed(list(obs.items()))), separators=(" , ", " : "))
    assert '"value" : 0.3 ,' in text
    return text.replace('"value" : 0.3 ,', '"value" : 0.30 ,').encode()


def _changed(**changes: Any) -> Callable[[dict[str, Any]], bytes]:
    return lambda obs: orjson.dumps({**obs, **changes})


def _quantity(**changes: Any) -> Callable[[dict[str, Any]], bytes]:
    return lambda obs: orjson.dumps({**obs, "valueQuantity": {**obs["valueQuantity"], **changes}})


# A second copy of the same version (id, versionId, lastUpdated): is it a conflict?
SECOND_COPIES: dict[str, tuple[Callable[[dict[str, Any]], bytes], bool]] = {
    "identical": (orjson.dumps, False),
    "re-serialised": (_reserialised, False),
    "narrative and note": (
        _changed(text={"status": "generated", "div": "<div>x</div>"}, note=[{"text": "re-sent"}]),
        False,
    ),
    "value": (_quantity(value=0.1), True),
    "unit": (_quantity(unit="/uL", code="/uL"), True),
    "code": (_changed(code={"coding": [{"system": "http://loinc.org", "code": "26499-4"}]}), True),
    "subject": (_changed(subject={"reference": "Patient/hx-copy-other"}), True),
    "status": (_changed(status="preliminary"), True),
}


async def _live_says_conflict(state: Path, first: bytes, second: bytes) -> bool:
    store = SqliteStore(state)
    await store.open()
    try:
        taken = [intake(r) for data in (first, second) for r in raw.decode(data)]
        assert all(isinstance(t, Intake) for t in taken)
        assert await store.ingest(taken[:1], now=1.0) == taken[:1]  # type: ignore[arg-type]  # all Intake, asserted above
        held = await store.ingest(taken[1:], now=2.0)  # type: ignore[arg-type]  # all Intake, asserted above
        return bool(held) and held[0].outcome.reason == CONFLICT_REASON  # type: ignore[union-attr]  # held: its outcome is set
    finally:
        await store.close()


@pytest.mark.parametrize("engine", ["sqlite", "partitioned"])
@pytest.mark.parametrize("name", SECOND_COPIES)
async def test_replay_and_the_live_store_tell_copies_apart_alike(tmp_path, engine, name):
    """Two copies of one version: replay drops the second as identical or rejects it as a conflict,
    and the live store skips it as read before or quarantines it as a conflict, on the same line:
    the normalised content (what a decision can depend on), not the bytes."""
    change, conflict = SECOND_COPIES[name]
    first, second = _variant(orjson.dumps), _variant(change)
    path = tmp_path / "copies.ndjson"
    path.write_bytes(first + b"\n" + second + b"\n")
    settings = load_settings(None)
    events_out = io.BytesIO()
    with Replay(settings.rules, settings.alerts, engine=engine) as r:
        stats = r.run([str(path)], events_out, None)
    events = [orjson.loads(x) for x in events_out.getvalue().splitlines()]
    replay_conflict = [e["reason"] for e in events if e["event"] == "rejected"] == [CONFLICT_REASON] * 2
    assert replay_conflict is conflict
    assert stats.ignored["identical copy of a version already read"] == (0 if conflict else 1)
    assert await _live_says_conflict(tmp_path / "s.sqlite3", first, second) is conflict


@pytest.mark.parametrize("engine", ["sqlite", "partitioned"])
@pytest.mark.parametrize("order", ["readable-first", "undecodable-first"])
def test_an_undecodable_copy_never_withdraws_a_readable_version(tmp_path, engine, order):
    """As live: the unreadable copy is reported (a `rejected` event with its reason), and the
    readable version stands whichever was read first: its alert is not retracted."""
    item = BY_NAME["invalid-json"]
    broken, wbc = item.resources()
    readable = orjson.dumps(fill(observation(item.ref.removeprefix("Observation/"), item.patient, value=0.3)))  # type: ignore[union-attr]  # this corpus item has a ref
    lines = [wbc, readable, broken] if order == "readable-first" else [broken, wbc, readable]
    path = tmp_path / "in.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    settings = load_settings(None)
    events_out = io.BytesIO()
    with Replay(settings.rules, settings.alerts, engine=engine) as r:
        r.run([str(path)], events_out, None)
    events = [orjson.loads(x) for x in events_out.getvalue().splitlines()]
    assert [(e["event"], e["grade"]) for e in events] == [("new", "severe"), ("rejected", None)]
    assert events[1]["reason"].startswith(item.reason) and events[1]["observations"] == [item.ref]


# -- a Bundle of 30 000 entries ------------------------------------------------------------------


def _max_rss_mb(args: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """Run a child process; its exit code, its own peak RSS (MiB, from wait4) and its stderr."""
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))  # type: ignore[union-attr]  # PIPE
    reader.start()
    _pid, status, usage = os.wait4(proc.pid, 0)
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, err[0].decode(errors="replace")


def test_bundle_of_30000_entries_with_poison_among_them(tmp_path):
    """One Bundle document, 30 000 valid entries and a few poison ones (NaN, bytes that are not
    UTF-8, 100 000 levels of nesting): the strict parse of the whole fails, every entry is still
    read, every valid one assessed, every poison one rejected."""
    poison = [
        BY_NAME[n].resources()[0]
        for n in ("nan-token", "non-utf8-in-free-text", "deeply-nested", "invalid-json")
    ]
    entries = bulk_entries(30_000)
    for n, p in enumerate(poison):
        entries.insert(7_000 * (n + 1), p)
    path = tmp_path / "big.json"
    path.write_bytes(
        b'{"resourceType":"Bundle","type":"collection","entry":['
        + b",".join(b'{"resource":' + e + b"}" for e in entries)
        + b"]}"
    )
    events, alerts = tmp_path / "events.jsonl", tmp_path / "alerts.ndjson"
    env = {**os.environ, "NEUTROWATCH_LOGGING__FORMAT": "json", "NEUTROWATCH_LOGGING__LEVEL": "info"}
    code, _rss, err = _max_rss_mb(
        [
            sys.executable,
            "-m",
            "service",
            "replay",
            str(path),
            "--events",
            str(events),
            "--alerts",
            str(alerts),
        ],
        env,
    )
    assert code == 0, err
    summary = next(json.loads(line) for line in err.splitlines() if '"replay finished"' in line)
    assert summary["resources"] == 30_000 + len(poison)  # every entry read
    assert (
        summary["observations"] == 30_000 + 1
    )  # those decoded as Observations (NaN is, the others are undecodable)
    assert summary["panels"] == 15_000
    got = read(events)
    assert sorted(e["patient"] for e in got if e["event"] == "new") == sorted(
        f"Patient/bulk-{p}" for p in range(10)
    )
    rejected = [e for e in got if e["event"] == "rejected"]
    assert sorted(e["observations"][0] for e in rejected) == sorted(
        BY_NAME[n].ref for n in ("nan-token", "non-utf8-in-free-text", "deeply-nested", "invalid-json")
    )
    assert (
        len([e for e in got if e["event"] != "stale"]) == 14
    )  # stale: collected before a newer panel (visible, no alert)
    # Memory is measured by `make bench` (bench/memory_bench.py: peak RSS from /proc), not asserted
    # here: wait4's ru_maxrss carries the test runner's own high-water mark through fork and exec.


def test_no_phi_in_the_replay_log(tmp_path):
    lines = [*neighbour_lines("before")]
    for item in CORPUS:
        lines += item.resources()
    path = tmp_path / "all.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    env = {**os.environ, "NEUTROWATCH_LOGGING__FORMAT": "json", "NEUTROWATCH_LOGGING__LEVEL": "debug"}
    code, _rss, err = _max_rss_mb(
        [sys.executable, "-m", "service", "replay", str(path), "--events", str(tmp_path / "e.jsonl")], env
    )
    assert code == 0, err
    assert err.strip(), "the replay logged nothing: the scan would prove nothing"
    for line in err.splitlines():
        json.loads(line)
        for phi in PHI:
            assert phi not in line
