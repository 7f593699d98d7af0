"""The replay contract: CLI, event fields, ordering, rejections, alerts."""

from __future__ import annotations

import gzip
import io
import random
import subprocess
import sys
from pathlib import Path

import msgspec
import orjson
import pytest
from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.flag import Flag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.__main__ import main
from service.config import load_settings
from service.errors import ConfigError
from service.replay.engine import Replay
from tests.builders import observation

REQUIRED = {"patient", "event", "grade", "anc", "effective", "observations"}


def write_ndjson(path: Path, resources) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    return path


def replay(tmp_path: Path, *inputs, config=None) -> tuple[list[dict], list[dict]]:
    events, alerts = tmp_path / "events.jsonl", tmp_path / "alerts.ndjson"
    args = ["replay", *map(str, inputs), "--events", str(events), "--alerts", str(alerts)]
    if config:
        args += ["--config", str(config)]
    assert main(args) == 0

    def read(p):
        return [orjson.loads(line) for line in p.read_bytes().splitlines()]

    return read(events), read(alerts)


def cbc(
    patient: str,
    day: int,
    anc_k: float,
    *,
    wbc_k: float = 4.0,
    hour: int = 8,
    specimen: str | None = None,
    updated=True,
):
    """One auto-diff panel: WBC + 751-8, collected on `day` of January 2026."""
    eff = f"2026-01-{day:02d}T{hour:02d}:00:00Z"
    upd = f"2026-01-{day:02d}T{hour + 2:02d}:00:00.000Z" if updated else None
    spec = specimen or f"Specimen/{patient.split('/')[-1]}-{day}-{hour}"
    pid = patient.split("/")[-1]
    return [
        observation(
            "6690-2",
            wbc_k,
            "10*3/uL",
            id=f"{pid}-{day}-{hour}-wbc",
            patient=patient,
            effective=eff,
            updated=upd,
            specimen=spec,
        ),
        observation(
            "751-8",
            anc_k,
            "10*3/uL",
            id=f"{pid}-{day}-{hour}-anc",
            patient=patient,
            effective=eff,
            updated=upd,
            specimen=spec,
        ),
    ]


def test_diagnostic_report_101(tmp_path):
    # FHIR core example DiagnosticReport/101: WBC 4.6 10*9/L, 770-8 20 %, 751-8 0.9 10*9/L
    # -> 900/uL, moderate.
    # Grouped by the DiagnosticReport (no specimen references), as the example has none.
    kw = dict(
        patient="Patient/pat2",
        effective="2011-03-04T08:30:00+11:00",
        specimen=None,
        system="http://unitsofmeasure.org",
    )
    obs = [
        observation("6690-2", 4.6, "x10*9/L", id="r1", ucum_code="10*9/L", **kw),
        observation("770-8", 20, "%", id="r2", **kw),
        observation("751-8", 0.9, "x10*9/L", id="r3", ucum_code="10*9/L", **kw),
    ]
    report = {
        "resourceType": "DiagnosticReport",
        "id": "101",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
        "subject": {"reference": "Patient/pat2"},
        "result": [{"reference": f"Observation/{o['id']}"} for o in obs],
    }
    bundle = tmp_path / "dr101.json"
    bundle.write_bytes(
        orjson.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": r} for r in [*obs, report]],
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    events, alerts = replay(tmp_path, bundle)
    assert len(events) == 1
    e = events[0]
    assert REQUIRED <= e.keys()
    assert (e["patient"], e["event"], e["grade"], e["anc"]) == ("Patient/pat2", "new", "moderate", 900)
    assert e["effective"] == "2011-03-04T08:30:00+11:00"
    assert e["observations"] == ["Observation/r3", "Observation/r1"]
    assert [a["resourceType"] for a in alerts] == ["Flag", "Communication"]


LEGACY_RESOLUTION = (
    "clinical:\n  resolution: {confirmations: 1, min_hours: 0, reopen_days: 0, memory_days: 0}\n"
)
NADIR = [(2, 3.2), (6, 1.3), (9, 0.8), (12, 0.3), (14, 0.45), (17, 1.1), (20, 2.1), (27, 1.2)]


def test_nadir_sequence_events_and_alerts(tmp_path):
    """With one normal panel resolving (the former rule, set explicitly), a chemotherapy nadir gives
    new, worsening, worsening, resolved, and a new episode on the next drop."""
    patient = "Patient/chemo1"
    resources = []
    for day, anc in NADIR:
        resources += cbc(patient, day, anc)
    config = tmp_path / "legacy.yaml"
    config.write_text(LEGACY_RESOLUTION)
    events, alerts = replay(tmp_path, write_ndjson(tmp_path / "in.ndjson", resources), config=config)
    assert [(e["event"], e["grade"], e["anc"]) for e in events] == [
        ("new", "mild", 1300),
        ("worsening", "moderate", 800),
        ("worsening", "severe", 300),
        ("resolved", "mild", 2100),  # resolved from the grade of the previous panel (1100: mild)
        ("new", "mild", 1200),
    ]
    assert events[1]["previous_anc"] == 1300 and events[1]["previous_effective"] == "2026-01-06T08:00:00Z"
    flags = [a for a in alerts if a["resourceType"] == "Flag"]
    comms = [a for a in alerts if a["resourceType"] == "Communication"]
    assert len(flags) == len(comms) == 5
    for f in flags:
        Flag.model_validate(f)
        assert f["category"][0]["coding"][0]["code"] == "clinical"  # not "lab" (reference §1.5)
    for c in comms:
        Communication.model_validate(c)
    assert [c["priority"] for c in comms] == ["routine", "urgent", "asap", "routine", "routine"]
    # one Flag identifier per episode, two episodes
    assert len({f["identifier"][0]["value"] for f in flags}) == 2
    assert flags[3]["status"] == "inactive" and flags[3]["period"]["end"] == "2026-01-20T08:00:00Z"
    # Communication identifiers are unique (conditional-create keys)
    assert len({c["identifier"][0]["value"] for c in comms}) == 5


def test_nadir_sequence_with_confirmed_resolution(tmp_path):
    """With the default resolution rules (3 normal panels over >= 48 h, CIBMTR ANC recovery;
    reference §3), one normal panel only makes the episode `recovering` (a Flag update, no
    Communication) and the drop a week later keeps the same episode open: 3 Communications, not 5."""
    resources = []
    for day, anc in NADIR:
        resources += cbc("Patient/chemo1", day, anc)
    events, alerts = replay(tmp_path, write_ndjson(tmp_path / "in.ndjson", resources))
    assert [(e["event"], e["anc"], e.get("recovering")) for e in events] == [
        ("new", 1300, None),
        ("worsening", 800, None),
        ("worsening", 300, None),
        ("recovering", 2100, {"confirmations": 1, "needed": 3}),
        ("recovering", 1200, {"confirmations": 0, "needed": 3}),  # the recovery ends; the Flag says so
    ]
    flags = [a for a in alerts if a["resourceType"] == "Flag"]
    comms = [a for a in alerts if a["resourceType"] == "Communication"]
    assert len(comms) == 3 and {f["status"] for f in flags} == {"active"}
    assert len({f["identifier"][0]["value"] for f in flags}) == 1
    assert "recovering (1 of 3 confirmations)" in flags[3]["code"]["text"]
    assert "recovery interrupted" in flags[4]["code"]["text"]


def test_rejections_are_events_and_never_alert(tmp_path):
    resources = [
        observation(
            "26499-4", 3000, "10*3/uL", id="jenny", patient="Patient/m", specimen="Specimen/j"
        ),  # mCODE unit error
        observation("751-8", 20, "%", id="mislabel", patient="Patient/m", specimen="Specimen/k"),
        observation(
            "751-8", 0.3, "bananas/uL", id="unknown-unit", patient="Patient/m", specimen="Specimen/l"
        ),
    ]
    path = write_ndjson(tmp_path / "bad.ndjson", resources)
    with path.open("ab") as fh:
        fh.write(b'{"resourceType":"Observation","id":"trunc\n')
    events, alerts = replay(tmp_path, path)
    assert alerts == []
    assert [e["event"] for e in events] == ["rejected"] * 4
    reasons = {e["observations"][0] if e["observations"] else None: e["reason"] for e in events}
    assert reasons["Observation/jenny"] == "implausible ANC 3e+06/uL (outside 0-100000)"
    assert reasons["Observation/mislabel"] == "unit '%' is not a cell count unit for LOINC 751-8"
    assert reasons["Observation/unknown-unit"] == "unit 'bananas/uL' is not a cell count unit for LOINC 751-8"
    assert reasons[None].startswith("invalid JSON")
    assert all(e["grade"] is None and e["anc"] is None for e in events)


def test_each_version_is_an_arrival_and_a_correction_retracts(tmp_path):
    # v1 final 400/uL alerts when it is available; v2 "corrected" to 1800/uL arrives later: the
    # earlier alert no longer holds and is withdrawn (reference §1.5 amended/corrected); both versions
    # are never counted together. File order does not matter (newest first here).
    v1 = cbc("Patient/v", 3, 0.4)
    v2 = [dict(o, meta={"versionId": "2", "lastUpdated": "2026-01-03T12:00:00.000Z"}) for o in v1]
    v2[1] = dict(
        v2[1],
        status="corrected",
        valueQuantity={
            "value": 1.8,
            "unit": "10*3/uL",
            "system": "http://unitsofmeasure.org",
            "code": "10*3/uL",
        },
    )
    events, alerts = replay(tmp_path, write_ndjson(tmp_path / "v.ndjson", v2 + v1))
    assert [(e["event"], e["grade"], e["anc"]) for e in events] == [
        ("new", "severe", 400),
        ("retracted", "severe", 1800),
    ]
    assert events[1]["correction"] == {"revision": 1, "reason": "corrected"}
    assert events[1]["episode_status"] == "entered-in-error"
    flags = [a for a in alerts if a["resourceType"] == "Flag"]
    assert [f["status"] for f in flags] == ["active", "entered-in-error"]


def test_entered_in_error_withdraws_in_replay(tmp_path):
    v1 = cbc("Patient/e", 3, 0.4)
    gone = dict(
        v1[1], meta={"versionId": "2", "lastUpdated": "2026-01-04T09:00:00.000Z"}, status="entered-in-error"
    )
    gone.pop("valueQuantity")
    events, _ = replay(tmp_path, write_ndjson(tmp_path / "e.ndjson", [*v1, gone]))
    assert [(e["event"], e.get("correction", {}).get("reason")) for e in events] == [
        ("new", None),
        ("retracted", "entered-in-error"),
    ]


def test_preliminary_is_not_assessed(tmp_path):
    obs = cbc("Patient/pre", 3, 0.4)
    obs[1]["status"] = "preliminary"
    events, _ = replay(tmp_path, write_ndjson(tmp_path / "p.ndjson", obs))
    assert events == []


def test_late_arriving_older_panel_does_not_reopen(tmp_path):
    """A panel collected on day 5 that arrives after the day 8 panel opens nothing: it is remembered
    and reported as a visible `stale` decision that names the newer collection, never silently dropped."""
    new = cbc("Patient/late", 8, 1.2, updated=False)
    old = cbc("Patient/late", 5, 0.3, updated=False)
    events, _ = replay(tmp_path, write_ndjson(tmp_path / "l.ndjson", new + old))
    assert [(e["event"], e["anc"]) for e in events] == [("new", 1200), ("stale", 300)]
    assert events[1]["newest_effective"] == events[0]["effective"]


def test_panels_grouped_by_effective_when_no_specimen_or_report(tmp_path):
    eff = "2026-01-04T07:00:00Z"
    obs = [
        observation("6690-2", 2.0, id="w", effective=eff, specimen=None),
        observation("770-8", 30, "%", id="p", effective=eff, specimen=None),
    ]
    events, _ = replay(tmp_path, write_ndjson(tmp_path / "e.ndjson", obs))
    assert [(e["event"], e["anc"], e["observations"]) for e in events] == [
        ("new", 600, ["Observation/p", "Observation/w"])
    ]


def test_directory_input_and_non_observations_skipped(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_ndjson(d / "Patient.ndjson", [{"resourceType": "Patient", "id": "x", "name": [{"family": "Doe"}]}])
    write_ndjson(d / "Observation.ndjson", cbc("Patient/x", 3, 0.9))
    events, _ = replay(tmp_path, d)
    assert [(e["event"], e["grade"]) for e in events] == [("new", "moderate")]


def test_unreadable_input_fails_with_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "replay",
            str(tmp_path / "missing.ndjson"),
            "--events",
            str(tmp_path / "e"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0
    assert "missing.ndjson" in proc.stderr and "no such file" in proc.stderr


def test_bad_config_fails_naming_the_field(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("grading:\n  scheme: ctcae-v9\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "replay",
            str(tmp_path),
            "--events",
            str(tmp_path / "e"),
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "grading.scheme" in proc.stderr and "ctcae-v9" in proc.stderr


def test_unknown_config_field_is_named(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("alerts:\n  recipient: [Practitioner/1]\n")
    with pytest.raises(ConfigError, match="alerts.recipient: unknown field"):
        load_settings(cfg)


@st.composite
def patient_histories(draw):
    resources = []
    minute = 0
    for p in range(draw(st.integers(1, 4))):
        days = sorted(draw(st.sets(st.integers(1, 28), min_size=1, max_size=6)))
        for day in days:
            minute += 1
            anc = draw(st.sampled_from([0.2, 0.4, 0.7, 0.9, 1.2, 1.4, 1.6, 3.0]))
            panel = cbc(f"Patient/h{p}", day, anc)
            # shuffle availability so it is not the collection order
            stamp = f"2026-02-01T00:{draw(st.integers(0, 59)):02d}:{minute % 60:02d}.{minute:03d}Z"
            for o in panel:
                o["meta"]["lastUpdated"] = stamp
            resources += panel
    return resources


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(resources=patient_histories(), seed=st.integers(0, 10_000))
def test_output_does_not_depend_on_file_order(tmp_path, resources, seed):
    shuffled = list(resources)
    random.Random(seed).shuffle(shuffled)
    a = replay(tmp_path, write_ndjson(tmp_path / "a.ndjson", resources))
    b = replay(tmp_path, write_ndjson(tmp_path / "a.ndjson", shuffled))
    assert a == b


def test_ctcae_v5_uses_the_reported_lln(tmp_path):
    # 751-8 = 1.8 10*3/uL with referenceRange.low 2.0: CTCAE v5 grade 1 (<LLN-1500); the default
    # scheme calls 1800 normal.
    obs = cbc("Patient/lln", 4, 1.8)
    obs[1]["referenceRange"] = [
        {"low": {"value": 2.0, "unit": "10*3/uL", "system": "http://unitsofmeasure.org", "code": "10*3/uL"}}
    ]
    path = write_ndjson(tmp_path / "lln.ndjson", obs)
    cfg = tmp_path / "v5.yaml"
    cfg.write_text("grading:\n  scheme: ctcae-v5\n")
    events, alerts = replay(tmp_path, path, config=cfg)
    assert [(e["event"], e["grade"], e["scheme"], e["grade_label"]) for e in events] == [
        ("new", "mild", "ctcae-v5", "grade 1")
    ]
    assert "grade 1 <LLN" in alerts[1]["payload"][0]["contentString"]
    assert replay(tmp_path, path)[0] == []


def test_patient_context_from_the_input(tmp_path):
    # Reference §3 "Paediatrics": infants (2 weeks-1 year) neutropenic below 1000; first week out of
    # scope. An active Condition 234423001 gives the configured individual threshold (default 1000).
    resources = [
        {"resourceType": "Patient", "id": "infant", "birthDate": "2025-10-01"},
        {"resourceType": "Patient", "id": "neonate", "birthDate": "2026-01-01"},
        {"resourceType": "Patient", "id": "adult", "birthDate": "1970-01-01"},
        {"resourceType": "Patient", "id": "benign", "birthDate": "1975-01-01"},
        {
            "resourceType": "Condition",
            "id": "c1",
            "subject": {"reference": "Patient/benign"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "234423001"}]},
            "clinicalStatus": {"coding": [{"code": "active"}]},
        },
        *cbc("Patient/infant", 3, 1.2),
        *cbc("Patient/neonate", 3, 0.3),
        *cbc("Patient/adult", 3, 1.2),
        *cbc("Patient/benign", 3, 1.2),
    ]
    events, _ = replay(tmp_path, write_ndjson(tmp_path / "ctx.ndjson", resources))
    by_patient = {e["patient"]: e for e in events}
    assert set(by_patient) == {"Patient/neonate", "Patient/adult"}
    assert (
        by_patient["Patient/adult"]["event"] == "new"
        and by_patient["Patient/adult"]["threshold_rule"] == "scheme"
    )
    assert by_patient["Patient/neonate"]["event"] == "not-assessed"


def test_configured_threshold_applies_without_any_patient_resource(tmp_path):
    """A threshold configured for a patient (a documented Duffy-null associated neutrophil count,
    reference §3) applies in replay even when the input holds nothing but its results, as it does
    live: ANC 1200 is mild under the default scheme, normal under an individual 1000."""
    config = tmp_path / "c.yaml"
    config.write_text("clinical:\n  patient_thresholds:\n    Patient/danc: 1000\n")
    events, _ = replay(
        tmp_path,
        write_ndjson(tmp_path / "t.ndjson", [*cbc("Patient/danc", 3, 1.2), *cbc("Patient/other", 3, 1.2)]),
        config=config,
    )
    assert [(e["patient"], e["event"]) for e in events] == [("Patient/other", "new")]


# -- large documents: read entry by entry, the same events ---------------------------------------------


def _bundle(
    entries: list[bytes], *, head: bytes = b'"resourceType":"Bundle","type":"collection",', tail: bytes = b""
) -> bytes:
    return b"{" + head + b'"entry":[' + b",".join(entries) + b"]" + tail + b"}"


def _entries(resources: list[dict]) -> list[bytes]:
    return [b'{"fullUrl":"urn:x","resource":' + orjson.dumps(r) + b"}" for r in resources]


def _large_document_cases() -> dict[str, tuple[str, bytes]]:
    """(file name, bytes) of Bundles that `raw.read` reads by each of its paths, whole and cut
    short, and of documents the entry-by-entry reading must leave to the whole reading."""
    from tests.hostile.corpus import CORPUS, LINE_ONLY, MEGA, fill, neighbour

    good = [
        *cbc("Patient/lg1", 2, 0.3),
        *cbc("Patient/lg1", 5, 0.9),
        *cbc("Patient/lg2", 3, 0.4, specimen="Specimen/s9"),
    ]
    ok = _entries(good)
    poison = {h.name: b'{"resource":' + h.resources()[0] + b"}" for h in CORPUS if h.name not in LINE_ONLY}
    small = {k: v for k, v in poison.items() if len(v) < MEGA}
    pretty = orjson.dumps(
        {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in good]},
        option=orjson.OPT_INDENT_2,
    )
    cut = pretty[: pretty.rindex(b'"Observation"')]
    nb = _entries([fill(r) for r in neighbour("before")])
    odd_entries = [
        b"null",
        b"5",
        b'"text"',
        b"[]",
        b"{}",
        b'{"resource":null}',
        b'{"resource":"x"}',
        b'{"resource":[1]}',
        b'{"resource":{"resourceType":"Bundle","entry":[{"resource":' + orjson.dumps(good[0]) + b"}]}}",
        b'{"resource":{"resourceType":"Bundle"}}',
        b'{"resource":{"resourceType":"Bundle","entry":{}}}',
    ]
    return {
        "typed, pretty": ("pretty.json", pretty),
        "typed, one line": ("line.json", _bundle(ok)),
        "strict (an entry of the wrong shape)": (
            "strict.json",
            _bundle([*ok[:2], poison["quantity-is-a-list"], *ok[2:]]),
        ),
        "strict (a Bundle member of the wrong shape)": ("total.json", _bundle(ok, tail=b',"total":"many"')),
        "strict, odd entries": (
            "odd.json",
            _bundle([*ok[:3], *odd_entries, *nb, *ok[3:]], tail=b',"total":"x"'),
        ),
        "typed, odd entries": ("odd-typed.json", _bundle([*ok[:3], b'{"resource":null}', b"{}", *ok[3:]])),
        "tolerant (NaN, not UTF-8, surrogates)": (
            "tolerant.json",
            _bundle(
                [
                    *ok[:1],
                    poison["nan-token"],
                    poison["non-utf8-in-id"],
                    poison["unpaired-surrogate"],
                    *odd_entries,
                    *ok[1:],
                ]
            ),
        ),
        "framing (every hostile item)": ("all.json", _bundle([*nb, *small.values(), *odd_entries, *ok])),
        "framing, cut inside an entry": ("cut.json", cut),
        "framing, cut between entries": ("cut2.json", _bundle(ok)[:-2] + b","),
        "framing, cut after the entries": (
            "cut3.json",
            _bundle(ok, tail=b',"link":[{"relation":"self","url":"h')[:-3],
        ),
        "framing, cut with nothing readable": (
            "cut4.json",
            b'{\n"resourceType":"Bundle",\n"entry":[{},\n{"fullUrl":"x"},\n{"reso',
        ),
        "framing, cut before the entries": (
            "cut5.json",
            b'{\n"resourceType":"Bundle",\n"type":"collection",\n' + b'"id":"' + b"x" * 200,
        ),
        "framing, entries without their colon": (
            "colon.json",
            pretty.replace(b'"resource": {', b'"resource" {', 2),
        ),
        "broken framing: lines": (
            "broken.json",
            pretty.replace(b'"type": "searchset"', b'"type" "searchset"', 1),
        ),
        "resourceType after the entries": (
            "late-type.json",
            _bundle(ok, head=b"")[:-1] + b',"resourceType":"Bundle"}',
        ),
        "two entry arrays": ("two.json", _bundle(ok[:2], tail=b',"entry":[' + b",".join(ok[2:]) + b"]")),
        "not a Bundle": (
            "obs.json",
            orjson.dumps({**good[0], "entry": [{"resource": good[1]}]}, option=orjson.OPT_INDENT_2),
        ),
        "byte-order mark": ("bom.json", b"\xef\xbb\xbf" + pretty),
        "escaped key": ("escaped.json", _bundle(ok).replace(b'"entry"', b'"entr\\u0079"', 1)),
        "NDJSON with a Bundle line": (
            "lines.ndjson",
            b"\n".join([orjson.dumps(good[0]), _bundle(ok[1:]), _bundle(ok)[:-40], orjson.dumps(good[1])])
            + b"\n",
        ),
        "gzip": ("pretty.json.gz", gzip.compress(pretty)),
    }


LARGE_CASES = _large_document_cases()


@pytest.mark.parametrize("engine", ["partitioned", "sqlite"])
@pytest.mark.parametrize("case", sorted(LARGE_CASES))
def test_a_large_document_read_entry_by_entry_gives_what_reading_it_whole_gives(
    tmp_path, monkeypatch, case, engine
):
    """A document of LARGE_DOCUMENT bytes or more is read entry by entry, never whole: whatever
    the path `raw.read` of the whole takes (typed, strict, tolerant, by its framing; whole or cut
    short), the same resources come out in the same order, so the same events, alerts and counts
    (documents the entry-by-entry reading cannot follow are read whole, as before)."""
    from service.replay import documents as replay_module

    name, data = LARGE_CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    settings = load_settings(None)
    outputs = []
    for threshold in (replay_module.LARGE_DOCUMENT, 64):
        monkeypatch.setattr(replay_module, "LARGE_DOCUMENT", threshold)
        events, alerts = io.BytesIO(), io.BytesIO()
        with Replay(settings.rules, settings.alerts, engine=engine, workers=1) as r:
            stats = r.run([path], events, alerts)
        outputs.append((events.getvalue(), alerts.getvalue(), stats))
    assert outputs[0][0] == outputs[1][0] and outputs[0][1] == outputs[1][1]
    assert outputs[0][2] == outputs[1][2]
    assert outputs[0][2].resources  # something was read


STREAMED = {
    "typed, pretty": "typed",
    "typed, one line": "typed",
    "strict (an entry of the wrong shape)": "strict",
    "strict (a Bundle member of the wrong shape)": "strict",
    "strict, odd entries": "strict",
    "typed, odd entries": "typed",
    "tolerant (NaN, not UTF-8, surrogates)": "tolerant",
    "framing (every hostile item)": "framing",
    "framing, cut inside an entry": "framing",
    "framing, cut between entries": "framing",
    "framing, cut after the entries": "framing",
    "framing, entries without their colon": "framing",
    "resourceType after the entries": "typed",
    "gzip": "typed",
}


@pytest.mark.parametrize("case", sorted(LARGE_CASES))
def test_which_large_documents_are_read_entry_by_entry(tmp_path, monkeypatch, case):
    """Bundles are read entry by entry, each by the path the whole would take; what the walk cannot
    follow (no Bundle, broken framing, a second entry array, an escaped key, a byte-order mark, a
    cut Bundle with nothing readable before the cut) is read whole as before."""
    from service.replay import documents as replay_module

    monkeypatch.setattr(replay_module, "LARGE_DOCUMENT", 64)
    name, data = LARGE_CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    ways = [d.how for d in replay_module.file_documents(path) if isinstance(d, replay_module.StreamedBundle)]
    if case == "NDJSON with a Bundle line":
        assert ways == ["typed", "framing"]
    else:
        assert ways == ([STREAMED[case]] if case in STREAMED else [])


def test_a_large_bundle_is_read_in_flat_memory(tmp_path):
    """A 25 MB Bundle (one document) replays in about the memory of NDJSON: it used to be parsed
    whole (about 6 times its size in memory: 1.05 GB for 190 MB)."""
    from tests.synthetic import generate, observations_target

    path = tmp_path / "big.json"
    with open(path, "wb") as fh:
        fh.write(b'{"resourceType":"Bundle","type":"collection","entry":[')
        for n, resource in enumerate(generate(observations_target(25_000, 300, seed=3))):
            fh.write((b"," if n else b"") + b'{"resource":' + orjson.dumps(resource) + b"}")
        fh.write(b"]}")
    assert path.stat().st_size > 20e6
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of this test process across fork and exec
    code = (
        "import re, resource, sys\nfrom pathlib import Path\n"
        "from service.__main__ import main\nrc = main(sys.argv[1:])\n"
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1)\n"
        "print(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\nsys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "replay", str(path), "--events", str(tmp_path / "events.jsonl")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    own, workers = (int(v) / 1024 for v in proc.stdout.split()[-2:])
    assert max(own, workers) < 120, f"peak RSS {own:.0f} MiB (workers {workers:.0f} MiB)"


@pytest.mark.parametrize("name", ["trunc.ndjson.gz", "trunc.json.gz", "corrupt.ndjson.gz"])
def test_a_truncated_or_corrupt_gzip_is_an_input_error(tmp_path, name):
    """A .gz that ends early or is corrupt: exit 2 and one line naming the file (the replay
    contract for input that cannot be read), not a traceback and exit 1."""
    rng = random.Random(5)
    lines = b"".join(
        orjson.dumps(
            {"resourceType": "Observation", "id": f"o{i}", "note": [{"text": rng.randbytes(40).hex()}]}
        )
        + b"\n"
        for i in range(3000)
    )
    data = gzip.compress(
        lines
        if "ndjson" in name
        else orjson.dumps(
            {"resourceType": "Bundle", "entry": [{"resource": {}}] * 10}, option=orjson.OPT_INDENT_2
        )
        + lines
    )
    path = tmp_path / name
    if name.startswith("trunc"):
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:30] + bytes(b ^ 0x5A for b in data[30:200]) + data[200:])
    proc = subprocess.run(
        [sys.executable, "-m", "service", "replay", str(path), "--events", str(tmp_path / "e.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines_out = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines_out) == 1 and str(path) in lines_out[0], proc.stderr


_SEED_BUNDLE = orjson.dumps(
    {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "self", "url": "http://x/Observation"}],
        "entry": [
            {"fullUrl": f"urn:{i}", "resource": r}
            for i, r in enumerate(
                [
                    *cbc("Patient/fz", 2, 0.3),
                    {"resourceType": "Bundle", "entry": [{"resource": cbc("Patient/fz", 3, 0.5)[0]}]},
                    *cbc("Patient/fz2", 4, 1.2),
                ]
            )
        ],
    },
    option=orjson.OPT_INDENT_2,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["cut", "insert", "replace"]),
            st.integers(0, len(_SEED_BUNDLE) - 1),
            st.sampled_from(
                [
                    b"NaN",
                    b"\xff",
                    b"\\ud800",
                    b",",
                    b"}",
                    b"]",
                    b'"',
                    b"{",
                    b"[",
                    b"1e999",
                    b" ",
                    b"x",
                    b"\x00",
                ]
            ),
        ),
        max_size=3,
    )
)
def test_a_damaged_bundle_walked_entry_by_entry_gives_the_items_of_reading_it_whole(tmp_path, edits):
    """Whatever damage a Bundle carries (cut short, stray bytes, NaN, bytes that are not UTF-8,
    lone surrogates, broken brackets), the entry-by-entry reading either declines it (it is then
    read whole) or gives exactly the items `raw.decode` gives for the whole document."""
    from service.fhir import raw
    from service.replay import documents as replay_module

    data = _SEED_BUNDLE
    for kind, at, piece in edits:
        at = min(at, len(data))
        data = data[:at] if kind == "cut" else data[:at] + piece + data[at + (kind == "replace") :]
    path = tmp_path / "fuzz.json"
    path.write_bytes(data)
    streamed = replay_module._streamed(path, 0, None)
    if streamed is None:
        return
    whole = list(raw.decode(data))
    assert msgspec.msgpack.encode(list(streamed)) == msgspec.msgpack.encode(whole)
