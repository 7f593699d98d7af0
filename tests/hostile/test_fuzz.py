"""Fuzzing the read -> normalise -> panel path with a fixed budget fit for CI (well under a minute
together). Extends tests/unit (arbitrary JSON objects, 200 random bytes, WBC x neutrophil %) with:
mutated real documents (NaN tokens, bytes that are not UTF-8, deep nesting, truncation, syntax
errors at any place), Bundles whose one hostile entry must not take its neighbours with it,
hostile field values that must never reach a reason or a log, every kind of panel member with
extreme values through `decide`, replay end to end, and atheris (libFuzzer) when installed."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import load_settings
from service.core.anc import ANC_MAX, Anc, PanelRejected, compute_anc
from service.core.codes import TERMS
from service.core.episodes import PatientState
from service.core.observations import LabResult, Rejected, normalise
from service.core.panels import decide
from service.fhir import model, raw
from service.metrics import reason_label
from service.replay.engine import Replay
from tests.hostile.corpus import CORPUS, fill, neighbour, observation
from tests.hostile.fuzz_target import RULES, check

ROOT = Path(__file__).resolve().parents[2]
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Seeds: the corpus items (under 64 kB), a valid panel, a small Bundle.
SEEDS = [r for h in CORPUS for r in h.resources() if len(r) < 65536]
SEEDS += [orjson.dumps(fill(r)) for r in neighbour("seed")]
SEEDS.append(
    orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": "http://x/n"}],
            "entry": [{"resource": fill(r)} for r in neighbour("b1") + neighbour("b2")],
        }
    )
)

# Tokens that keep a document's framing (its brackets still balance) but that strict JSON refuses,
# or that are the wrong JSON type for a value.
VALUE_TOKENS = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"-1e999",
    b"9" * 400,
    b"true",
    b"null",
    b'"0.3"',
    b'"NaN"',
    b"{}",
    b"[]",
    b"[" * 3000 + b"]" * 3000,
    b'"\xff\xfe"',
    b'"caf\xe9"',
    b'"\\ud800"',
    b"0.3,,",
    b"-0.3",
    b"1e300",
    b"0",
    b"-0",
    b"5e-324",
    b"0.3",
    b'"\x01"',
]
# Anything at all, framing included.
JUNK = VALUE_TOKENS + [
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b",",
    b":",
    b"\\",
    b"\xef\xbb\xbf",
    b"\x00",
    b"\n",
    b"<html>",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "byte"]))
        if kind == "insert":
            data[at:at] = draw(st.sampled_from(JUNK))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        elif kind == "replace":
            data[at : at + draw(st.integers(1, 12))] = draw(st.sampled_from(JUNK))
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = bytes([draw(st.integers(0, 255))])
    return bytes(data)


@settings(FAST, max_examples=2500)
@given(mutated())
def test_mutated_documents_never_raise_and_keep_the_invariants(data):
    check(data)


@settings(FAST, max_examples=300)
@given(
    k=st.integers(1, 6),
    at=st.integers(0, 6),
    token=st.sampled_from(VALUE_TOKENS),
    field=st.sampled_from(["valueQuantity.value", "status", "id", "subject", "code", "note"]),
)
def test_one_hostile_entry_never_takes_its_neighbours_with_it(k, at, token, field):
    """A Bundle of k valid results and one whose field holds a hostile token: every valid entry is
    read, in order, with its id; the hostile one is one item (read and judged, or undecodable)."""
    valid = [fill(observation(f"ok-{i}", f"Patient/ok-{i}", value=2.5)) for i in range(k)]
    hostile = fill(observation("bad", "Patient/bad"))
    if field == "valueQuantity.value":
        hostile["valueQuantity"]["value"] = "@T@"
    else:
        hostile[field] = "@T@"
    bad = orjson.dumps(hostile).replace(b'"@T@"', token)
    entries = [orjson.dumps({"resource": r}) for r in valid]
    entries.insert(min(at, k), b'{"resource":' + bad + b"}")
    bundle = b'{"resourceType":"Bundle","type":"searchset","entry":[' + b",".join(entries) + b"]}"
    doc = raw.read(bundle)
    assert doc.complete and doc.resource_type == "Bundle"
    read = [i.id for i in doc.items if isinstance(i, model.Resource) and i.id and i.id.startswith("ok-")]
    assert read == [f"ok-{i}" for i in range(k)]
    assert len(doc.items) == k + 1
    check(bundle)


# -- normalise: hostile values in every field the service reads -------------------------------------

MARKER = "Jane Q Public 1961-07-14"  # free text where a code, an id or a reference belongs
texts = st.one_of(
    st.text(max_size=30),
    st.just(MARKER),
    st.just("x" * 5000),
    st.sampled_from(
        [
            "10*3/uL",
            "%",
            "/uL",
            "10*9/L",
            "K/uL",
            "g/dL",
            "Cel",
            "[degF]",
            "1",
            "",
            "bananas/uL",
            " 10*3/uL ",
            "µL",
        ]
    ),
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**30), 10**30),
    st.floats(min_value=0, max_value=2000),
    st.sampled_from([0.0, -0.0, 5e-324, 1e308, 99.9999999, 100.0000001]),
)
codes = st.sampled_from(sorted(TERMS) + ["8310-5", "30394-1", "x", "", MARKER])
quantities = st.builds(
    model.Quantity,
    value=st.none() | numbers,
    comparator=st.none() | st.sampled_from(["<", "<=", ">", ">=", "ad", MARKER]),
    unit=st.none() | texts,
    system=st.none() | st.sampled_from(["http://unitsofmeasure.org", "urn:x", MARKER]),
    code=st.none() | texts,
)
references = st.builds(
    model.Reference,
    reference=st.none()
    | texts
    | st.sampled_from(
        [
            "Patient/1",
            "Patient/a.b-c",
            "https://h/fhir/Patient/9/_history/2",
            "Group/1",
            "#contained",
            f"Patient/{MARKER}",
        ]
    ),
)
resources = st.builds(
    model.Resource,
    resourceType=st.just("Observation"),
    id=st.none() | st.sampled_from(["o1", "a.b-c", "x" * 64, "x" * 65]) | texts,
    meta=st.none()
    | st.builds(
        model.Meta,
        versionId=st.none() | st.sampled_from(["1", "10"]) | texts,
        lastUpdated=st.none() | st.sampled_from(["2026-01-01T00:00:00Z", "1969-12-31T23:59:59Z"]) | texts,
    ),
    status=st.sampled_from(
        [
            "final",
            "amended",
            "corrected",
            "preliminary",
            "registered",
            "cancelled",
            "entered-in-error",
            "unknown",
            MARKER,
        ]
    ),
    code=st.builds(
        model.CodeableConcept,
        coding=st.lists(
            st.builds(
                model.Coding,
                system=st.sampled_from(["http://loinc.org", "urn:oid:2.16.840.1.113883.6.1", "urn:x"]),
                code=codes,
            ),
            max_size=3,
        ),
    ),
    subject=st.none() | references,
    specimen=st.none() | references,
    effectiveDateTime=st.none() | st.sampled_from(["2026-01-05T08:00:00Z", "2026-01-05", "2026"]) | texts,
    valueQuantity=st.none() | quantities,
    valueString=st.none() | texts,
    dataAbsentReason=st.none()
    | st.builds(model.CodeableConcept, coding=st.lists(st.builds(model.Coding, code=texts), max_size=2)),
    referenceRange=st.none() | st.lists(st.builds(model.Range, low=st.none() | quantities), max_size=2),
    basedOn=st.none() | st.lists(references, max_size=3),
)


@settings(FAST, max_examples=1500)
@given(resources)
def test_normalise_keeps_no_free_text_and_no_impossible_value(resource):
    out = normalise(resource)
    if isinstance(out, LabResult):
        assert out.value is None or (math.isfinite(out.value) and out.value >= 0)
        assert raw.fhir_id(out.ref.split("/", 1)[1]) and len(out.patient) <= 512
        assert MARKER not in out.patient and (out.specimen is None or MARKER not in out.specimen)
        assert all(MARKER not in r for r in out.based_on)
    elif isinstance(out, Rejected):
        shown = (out.reason, out.ref or "", out.patient or "", out.effective or "", out.version or "")
        assert all(MARKER not in s for s in shown), shown
        assert len(out.reason) <= 200 and len(reason_label(out.reason)) <= 80
        assert all(len(s) <= 600 for s in shown)
        msgspec.msgpack.encode(out)  # storable
        orjson.dumps(out.reason)


# -- panels: every kind of member, extreme values, through decide -----------------------------------

member_codes = st.sampled_from(
    [
        "6690-2",
        "26464-8",
        "33256-9",
        "804-5",
        "770-8",
        "23761-0",
        "71676-1",
        "769-0",
        "764-1",
        "751-8",
        "753-4",
        "26499-4",
        "768-2",
        "763-3",
        "718-7",
        "777-3",
        "8310-5",
    ]
)
units = {
    "%": ["%"],
    "1": ["1", "%"],
    "count": ["10*3/uL", "/uL", "10*9/L", "10*6/L"],
    "hb": ["g/dL", "g/L"],
    "temp": ["Cel", "[degF]"],
}
values = st.one_of(
    st.floats(min_value=0, max_value=1e7, allow_nan=False),
    st.sampled_from([0.0, 1e-9, 100.0, 1e300, 1e6, 999_999.0]),
)


@st.composite
def panels(draw: st.DrawFn) -> list[LabResult]:
    out: list[LabResult] = []
    for n in range(draw(st.integers(1, 7))):
        code = draw(member_codes)
        prop = TERMS[code].prop.name if code in TERMS else "TEMP"
        unit = draw(
            st.sampled_from(
                {
                    "PERCENT": units["%"],
                    "FRACTION": units["1"],
                    "COUNT": units["count"],
                    "MASS": units["hb"],
                    "TEMP": units["temp"],
                }[prop]
            )
        )
        obs = observation(
            f"m{n}",
            "Patient/fz",
            code,
            draw(values),
            unit,
            status=draw(st.sampled_from(["final", "final", "amended", "preliminary", "cancelled"])),
        )
        if draw(st.booleans()):
            obs["valueQuantity"]["comparator"] = draw(st.sampled_from(["<", "<="]))
        item = normalise(msgspec.convert(fill(obs), model.Resource))
        if isinstance(item, LabResult):
            out.append(item)
    return out


@settings(FAST, max_examples=1500)
@given(panels())
def test_any_panel_through_decide(results):
    anc = compute_anc(results)
    if isinstance(anc, Anc):
        assert 0 <= anc.value <= ANC_MAX
        assert anc.wbc is None or anc.value <= anc.wbc * (1 + 1e-6)
    decision = decide(PatientState(), "Patient/fz", "p", results, RULES)
    for event in decision.events:
        if event.assessment is not None:
            assert isinstance(anc, Anc)
            assert 0 <= event.assessment.anc <= ANC_MAX
            assert event.assessment.wbc is None or event.assessment.anc <= event.assessment.wbc * (1 + 1e-6)
    assert (decision.rejection is not None) == isinstance(anc, PanelRejected)


# -- replay end to end -------------------------------------------------------------------------------


@settings(FAST, max_examples=40)
@given(tokens=st.lists(st.sampled_from(VALUE_TOKENS), min_size=1, max_size=4), framing=st.booleans())
def test_replay_never_alerts_from_a_hostile_value(tokens, framing):
    """Hostile values for neutrophil counts beside valid WBCs (and a valid severe neighbour), as
    NDJSON lines or one Bundle: the neighbour alerts, no hostile patient ever does."""
    lines = [orjson.dumps(fill(r)) for r in neighbour("ok")]
    for n, token in enumerate(tokens):
        patient = f"Patient/fz-{n}"
        wbc = fill(observation(f"fz-{n}-wbc", patient, "6690-2", 4.0))
        anc = fill(observation(f"fz-{n}-anc", patient, value="@T@"))
        for o in (wbc, anc):
            o["specimen"] = {"reference": f"Specimen/fz-{n}"}
        if token in (b"0.3", b"0", b"-0", b"5e-324"):  # valid values: make them ones that do not alert
            token = b"2.5"
        lines += [orjson.dumps(wbc), orjson.dumps(anc).replace(b'"@T@"', token)]
    data = (
        (
            b'{"resourceType":"Bundle","entry":['
            + b",".join(b'{"resource":' + x + b"}" for x in lines)
            + b"]}\n"
        )
        if framing
        else b"\n".join(lines) + b"\n"
    )
    settings_ = load_settings(None)
    events, alerts = io.BytesIO(), io.BytesIO()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz-replay-{os.getpid()}.ndjson"
    path.write_bytes(data)
    try:
        with Replay(settings_.rules, settings_.alerts, engine="sqlite") as r:
            r.run([str(path)], events, alerts)
    finally:
        path.unlink()
    records = [orjson.loads(x) for x in events.getvalue().splitlines()]
    assert {e["patient"] for e in records if e["event"] != "rejected"} == {"Patient/nb-ok"}
    flagged = {
        a["subject"]["reference"]
        for a in map(orjson.loads, alerts.getvalue().splitlines())
        if a["resourceType"] == "Flag"
    }
    assert flagged == {"Patient/nb-ok"}


# -- atheris (libFuzzer), when installed -------------------------------------------------------------


def test_atheris_fuzzes_the_same_target(tmp_path):
    pytest.importorskip(
        "atheris",
        reason="atheris is not installed (pip install atheris: a wheel for CPython 3.11 on x86-64 Linux)",
    )
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for n, seed in enumerate(SEEDS):
        (seeds / f"seed-{n}").write_bytes(seed)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "hostile" / "fuzz_target.py"),
            str(seeds),
            "-max_total_time=15",
            "-max_len=8192",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert done.returncode == 0 and not crashes, done.stderr[-3000:]
    assert "stat::number_of_executed_units" in done.stderr
