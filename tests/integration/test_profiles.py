"""The FHIR profiles of what the service writes (fhir_profiles/).

(a) every resource replay writes (--provenance) for a synthetic population validates against the
    profile it names, with fhir_profiles/validate.mjs (Medplum's validator, independent of the
    fhir.resources models the service itself validates with), for each grading scheme and for a
    deployment's own canonical base;
(b) deliberately broken resources are rejected, each for the reason it was broken (so the
    validator is not vacuous);
(c) the generated CodeSystems and ValueSets hold exactly the service's own grades, schemes and
    events, and the URLs the service stamps are the generated ones;
(d) the transaction shape documented for service/live/worker.py (fullUrls, Provenance by conditional
    create on its meta.tag) works against the test engine, re-posting included. What the worker
    itself posts in the live loop is validated by tests/integration/test_provenance_live.py.

`validate_resources(resources)` / `assert_valid(resources)` validate any list of resources in one
call (for the live loop: every resource it wrote to the engine).
"""

from __future__ import annotations

import copy
import json
import subprocess
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from service.__main__ import main as cli
from service.config import AlertSettings
from service.core.episodes import EventKind
from service.core.grading import BUILT_IN
from service.output import alerts, profiles
from service.output.transaction import OutboxWrites, outbox_writes, provenance_entry
from tests.fhir_server.engine import _node_executable, engine_available
from tests.fhir_server.load import export
from tests.fhir_server.pytest_plugin import _unavailable
from tests.integration.live import POOL, population

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "fhir_profiles"
GENERATED = PROFILES / "generated"
VALIDATOR = PROFILES / "validate.mjs"
Resource = dict[str, Any]

# -- the helper --------------------------------------------------------------------------------------


def validate_resources(
    resources: Iterable[Resource], *, canonical_base: str = profiles.DEFAULT_BASE
) -> list[dict[str, Any]]:
    """Validate `resources` with fhir_profiles/validate.mjs, each against the profile its
    meta.profile names; the report of each invalid one (resource, issues), empty when all are valid.
    Raises RuntimeError when the validator cannot run."""
    node = _node_executable() or "node"
    resources = list(resources)
    with tempfile.NamedTemporaryFile("wb", suffix=".ndjson") as fh:
        fh.write(b"".join(orjson.dumps(r) + b"\n" for r in resources))
        fh.flush()
        done = subprocess.run(
            [node, str(VALIDATOR), "--json", "--canonical-base", canonical_base, fh.name],
            capture_output=True,
            timeout=600,
        )
    if done.returncode not in (0, 1) or not done.stdout:
        raise RuntimeError(
            f"validate.mjs exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}"
        )
    report = json.loads(done.stdout)
    assert report["total"] == len(resources)
    return [
        {**result, "resource": resources[result["line"] - 1]}
        for result in report["results"]
        if not result["valid"]
    ]


def describe(failures: list[dict[str, Any]], limit: int = 10) -> str:
    lines = []
    for f in failures[:limit]:
        errors = [f"{i['path']}: {i['message']}" for i in f["issues"] if i["severity"] == "error"]
        lines.append(f"{f['resourceType']} {f['identifier']}: " + "; ".join(errors))
    return f"{len(failures)} invalid:\n  " + "\n  ".join(lines)


def assert_valid(resources: Iterable[Resource], *, canonical_base: str = profiles.DEFAULT_BASE) -> None:
    failures = validate_resources(resources, canonical_base=canonical_base)
    assert not failures, describe(failures)


@pytest.fixture(scope="module")
def validator() -> Callable[..., list[dict[str, Any]]]:
    """validate_resources, or a skip (a failure under CI=true) when Node or Medplum is missing."""
    ok, reason = engine_available()
    if not ok:
        _unavailable(reason.replace("FHIR test engine", "profile validator"))
    return validate_resources


# -- (a) what replay writes validates ----------------------------------------------------------------


def replay(
    tmp_path: Path, resources: list[Resource], config: dict[str, Any], *, provenance: bool = True
) -> tuple[list[dict], list[Resource]]:
    data, events, out, cfg = (
        tmp_path / n for n in ("in.ndjson", "events.jsonl", "alerts.ndjson", "config.yaml")
    )
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    cfg.write_text(yaml.safe_dump(config))
    args = ["replay", str(data), "--events", str(events), "--alerts", str(out), "--config", str(cfg)]
    assert cli(args + (["--provenance"] if provenance else [])) == 0
    read = lambda p: [orjson.loads(x) for x in p.read_bytes().splitlines()]  # noqa: E731 - a local one-liner
    return read(events), read(out)


@pytest.fixture(scope="module")
def big_population() -> list[Resource]:
    # 30 patients over 140 days with temperatures and corrections: every event kind occurs.
    return population(patients=30, days=140, seed=5, temperatures=True, corrections=0.1)


def test_every_resource_replay_writes_validates(validator, big_population, tmp_path):
    events, written = replay(tmp_path, big_population, {"alerts": {"recipients": list(POOL)}})
    kinds = {e["event"] for e in events}
    assert {k.value for k in EventKind} <= kinds, f"the population should exercise every event, has {kinds}"
    by_type = {
        t: [r for r in written if r["resourceType"] == t] for t in ("Flag", "Communication", "Provenance")
    }
    alert_events = [e for e in events if e["event"] in {k.value for k in EventKind}]
    assert len(by_type["Flag"]) == len(by_type["Provenance"]) == len(alert_events)
    flag_only = sum(
        e["event"] in ("chronic", "recovering") or e.get("retracted", {}).get("event") == "recovering"
        for e in events
    )  # Flag updates without a Communication
    assert len(by_type["Communication"]) == len(alert_events) - flag_only
    failures = validator(written)
    assert not failures, describe(failures)


@pytest.mark.parametrize("scheme", sorted(set(BUILT_IN) - {"default"}))
def test_other_schemes_and_a_deployments_own_base_validate(validator, scheme, tmp_path):
    base = "https://fhir.hospital.example/neutrowatch"
    config = {
        "grading": {"scheme": scheme},
        "alerts": {
            "canonical_base": base,
            "author": "Organization/haematology-lab",
            "recipients": list(POOL),
        },
    }
    _events, written = replay(
        tmp_path, population(patients=12, days=42, seed=3, temperatures=True, corrections=0.1), config
    )
    assert written and all(url.startswith(base + "/") for r in written for url in r["meta"]["profile"])
    failures = validator(written, canonical_base=base)
    assert not failures, describe(failures)
    # The same resources against the default base: every profile is unknown there.
    wrong = validator(written)
    assert len(wrong) == len(written)
    assert all(
        "unknown profile" in i["message"] for f in wrong for i in f["issues"] if i["severity"] == "error"
    )


def test_the_documented_examples_validate(validator):
    """docs/examples/ (scripts/alert_examples.py): each file validates against the profile it names."""
    examples = [
        json.loads((ROOT / "docs" / "examples" / f"{t}.json").read_text())
        for t in ("Flag", "Communication", "Provenance")
    ]
    failures = validator(examples)
    assert not failures, describe(failures)


def test_replay_writes_provenance_only_when_asked(tmp_path):
    resources = population(patients=12, days=42, seed=3, temperatures=True, corrections=0.1)
    config = {"alerts": {"recipients": list(POOL)}}
    (tmp_path / "plain").mkdir()
    (tmp_path / "prov").mkdir()
    events_plain, plain = replay(tmp_path / "plain", resources, config, provenance=False)
    events_prov, with_prov = replay(tmp_path / "prov", resources, config)
    assert events_plain == events_prov
    assert not any(r["resourceType"] == "Provenance" for r in plain)
    assert [r for r in with_prov if r["resourceType"] != "Provenance"] == plain
    # Each Provenance follows the Flag (and Communication) of its write and targets exactly them.
    for i, r in enumerate(with_prov):
        if r["resourceType"] != "Provenance":
            continue
        written = (
            with_prov[i - 2 : i]
            if with_prov[i - 1]["resourceType"] == "Communication"
            else with_prov[i - 1 : i]
        )
        assert [t["identifier"] for t in r["target"]] == [w["identifier"][0] for w in written]
        flag = written[0]
        details = [
            e["valueReference"]["reference"] for e in flag["extension"] if e["url"] == alerts.FLAG_DETAIL
        ]
        entities = [e["what"]["reference"] for e in r.get("entity", [])]
        assert entities[: len(details)] == details  # then, for `febrile`, the temperature
        assert all("/_history/" in ref for ref in details), "versions are known in replay"


def test_both_replay_engines_write_the_same_provenance(tmp_path):
    import io

    from service.config import load_settings
    from service.replay.engine import Replay

    data = tmp_path / "in.ndjson"
    data.write_bytes(
        b"".join(
            orjson.dumps(r) + b"\n"
            for r in population(patients=12, days=42, seed=3, temperatures=True, corrections=0.1)
        )
    )
    settings = load_settings(None)
    outputs = []
    for options in ({"engine": "sqlite"}, {"engine": "partitioned", "workers": 2}):
        events, out = io.BytesIO(), io.BytesIO()
        with Replay(settings.rules, settings.alerts, provenance=True, **options) as r:
            r.run([str(data)], events, out)
        outputs.append((events.getvalue(), out.getvalue()))
    assert outputs[0] == outputs[1]
    assert b'"resourceType":"Provenance"' in outputs[0][1]


def test_provenance_needs_alerts(tmp_path, capsys):
    data = tmp_path / "in.ndjson"
    data.write_bytes(b"")
    assert cli(["replay", str(data), "--events", str(tmp_path / "e.jsonl"), "--provenance"]) == 2
    assert "--provenance needs --alerts" in capsys.readouterr().err


# -- (b) broken resources are rejected ---------------------------------------------------------------


def _ext(resource: Resource, profile_id: str) -> dict[str, Any]:
    return next(e for e in resource["extension"] if e["url"].endswith("/" + profile_id))


def _drop(key: str) -> Callable[[Resource], None]:
    return lambda r: r.pop(key)


BROKEN: dict[str, tuple[str, Callable[[Resource], Any], str]] = {
    # missing a required element
    "Flag without subject": ("Flag", _drop("subject"), "Flag.subject: Missing required property"),
    "Flag without period": ("Flag", _drop("period"), "Flag.period: Missing required property"),
    "Communication without sent": (
        "Communication",
        _drop("sent"),
        "Communication.sent: Missing required property",
    ),
    "Communication without its event": (
        "Communication",
        lambda r: r["extension"].remove(_ext(r, profiles.EVENT_EXTENSION)),
        "slice 'event': expected 1..1, but found 0",
    ),
    "Communication not about its Flag": (
        "Communication",
        lambda r: r.update(about=r["about"][1:]),
        "slice 'flag': expected 1..1, but found 0",
    ),
    "Provenance without agent": ("Provenance", _drop("agent"), "Provenance.agent: Missing required property"),
    "Provenance without software version": (
        "Provenance",
        lambda r: r["agent"][0].update(extension=r["agent"][0]["extension"][1:]),
        "slice 'softwareVersion': expected 1..1, but found 0",
    ),
    "Provenance without its idempotency tag": (
        "Provenance",
        lambda r: r["meta"].pop("tag"),
        "Provenance.meta.tag: Missing required property",
    ),
    "Flag without a grade": (
        "Flag",
        lambda r: r["extension"].remove(_ext(r, profiles.GRADE_EXTENSION)),
        "slice 'grade': expected 1..1, but found 0",
    ),
    "Flag without a profile": ("Flag", _drop("meta"), "names no profile"),
    # a wrong code
    "Flag code not neutropenia": (
        "Flag",
        lambda r: r["code"]["coding"][0].update(code="22298006"),
        "http://snomed.info/sct|22298006 is not in the required value set",
    ),
    "Flag category lab": (
        "Flag",
        lambda r: r["category"][0]["coding"][0].update(code="lab"),
        "slice 'clinical': expected 1..1, but found 0",
    ),
    "Flag status not a status": (
        "Flag",
        lambda r: r.update(status="resolved"),
        "resolved is not in the required value set",
    ),
    "grade not of any scheme": (
        "Flag",
        lambda r: _ext(r, profiles.GRADE_EXTENSION)["valueCoding"].update(code="default-grade-5"),
        "default-grade-5 is not in the required value set",
    ),
    "grading scheme unknown": (
        "Communication",
        lambda r: _ext(r, profiles.SCHEME_EXTENSION)["valueCoding"].update(code="ctcae-v4"),
        "ctcae-v4 is not in the required value set",
    ),
    "event unknown": (
        "Communication",
        lambda r: _ext(r, profiles.EVENT_EXTENSION)["valueCoding"].update(code="rejected"),
        "rejected is not in the required value set",
    ),
    "Communication priority unknown": (
        "Communication",
        lambda r: r.update(priority="high"),
        "high is not in the required value set",
    ),
    "Communication category notification": (
        "Communication",
        lambda r: r["category"][0]["coding"][0].update(code="notification"),
        "slice 'alert': expected 1..1, but found 0",
    ),
    "Provenance activity DELETE": (
        "Provenance",
        lambda r: r["activity"]["coding"][0].update(code="DELETE"),
        "v3-DataOperation|DELETE is not in the required value set",
    ),
    "Provenance entity role derivation": (
        "Provenance",
        lambda r: r["entity"][0].update(role="derivation"),
        "Provenance.entity.role: Value did not match expected pattern",
    ),
    "Provenance agent performer": (
        "Provenance",
        lambda r: r["agent"][0]["type"]["coding"][0].update(code="performer"),
        "Provenance.agent.type: Value did not match expected pattern",
    ),
    # an ANC in the wrong unit, or not an ANC
    "ANC in 10*3/uL": (
        "Flag",
        lambda r: _ext(r, profiles.ANC_EXTENSION)["valueQuantity"].update(value=0.9, code="10*3/uL"),
        ".value[x].code: Value did not match expected pattern",
    ),
    "ANC without UCUM": (
        "Communication",
        lambda r: _ext(r, profiles.ANC_EXTENSION)["valueQuantity"].update(system="http://example.org/units"),
        ".value[x].system: Value did not match expected pattern",
    ),
    "ANC negative": (
        "Flag",
        lambda r: _ext(r, profiles.ANC_EXTENSION)["valueQuantity"].update(value=-1),
        "Constraint nw-anc-1 not met",
    ),
    "ANC as a string": (
        "Flag",
        lambda r: (
            _ext(r, profiles.ANC_EXTENSION).update(valueString="900/uL")
            or _ext(r, profiles.ANC_EXTENSION).pop("valueQuantity")
        ),
        "allows valueQuantity, not valueString",
    ),
    # structure
    "payload as a reference": (
        "Communication",
        lambda r: r.update(payload=[{"contentReference": {"reference": "Flag/1"}}]),
        "allows contentString, not contentReference",
    ),
    "Flag author a Practitioner": (
        "Flag",
        lambda r: r["author"].update(reference="Practitioner/1"),
        'Invalid reference: got "Practitioner"',
    ),
    "event extension on a Flag": (
        "Flag",
        lambda r: r["extension"].append(
            {
                "url": profiles.profile_url(profiles.DEFAULT_BASE, profiles.EVENT_EXTENSION),
                "valueCoding": _ext(r, profiles.GRADE_EXTENSION)["valueCoding"],
            }
        ),
        "is not allowed on Flag",
    ),
    "Provenance recorded a date": (
        "Provenance",
        lambda r: r.update(recorded="2026-01-09"),
        "Provenance.recorded: Invalid instant format",
    ),
    "Provenance targets an Observation": (
        "Provenance",
        lambda r: r["target"].append(
            {"reference": "Observation/1", "type": "Observation", "identifier": {"value": "x"}}
        ),
        "expected 1..2, but found 3",
    ),
    "unknown property": (
        "Communication",
        lambda r: r.update(urgency="high"),
        'Invalid additional property "urgency"',
    ),
}


@pytest.fixture(scope="module")
def samples(tmp_path_factory, big_population) -> dict[str, Resource]:
    """A valid Flag, Communication and Provenance (each with an ANC and entities) from replay."""
    _events, written = replay(
        tmp_path_factory.mktemp("samples"), big_population, {"alerts": {"recipients": list(POOL)}}
    )
    picked: dict[str, Resource] = {}
    for r in written:
        has_anc = any(e["url"].endswith(profiles.ANC_EXTENSION) for e in r.get("extension", []))
        if r["resourceType"] not in picked and (
            has_anc or (r["resourceType"] == "Provenance" and r.get("entity"))
        ):
            picked[r["resourceType"]] = r
    assert set(picked) == {"Flag", "Communication", "Provenance"}
    return picked


def test_broken_resources_are_rejected(validator, samples):
    originals = list(samples.values())
    assert not validator(originals), "the unbroken samples must be valid"
    broken = []
    for _name, (kind, breaks, _why) in BROKEN.items():
        resource = copy.deepcopy(samples[kind])
        breaks(resource)
        broken.append(resource)
    failures = validator(broken)
    rejected = {f["line"] - 1: f for f in failures}
    for index, (name, (_kind, _breaks, why)) in enumerate(BROKEN.items()):
        assert index in rejected, f"{name}: accepted"
        messages = [
            f"{i['path']}: {i['message']}" for i in rejected[index]["issues"] if i["severity"] == "error"
        ]
        assert any(why in m for m in messages), f"{name}: rejected, but not for {why!r}: {messages}"


# -- (c) the published codes are the service's own ---------------------------------------------------


def _generated(resource_type: str, ident: str) -> dict[str, Any]:
    return json.loads((GENERATED / f"{resource_type}-{ident}.json").read_text())


def _concepts(
    concepts: list[dict[str, Any]], parent: str | None = None
) -> dict[str, tuple[str | None, dict[str, Any]]]:
    out: dict[str, tuple[str | None, dict[str, Any]]] = {}
    for c in concepts:
        out[c["code"]] = (parent, c)
        out.update(_concepts(c.get("concept", []), c["code"]))
    return out


def _valueset_codes(ident: str) -> set[tuple[str, str]]:
    vs = _generated("ValueSet", ident)
    return {(inc["system"], c["code"]) for inc in vs["compose"]["include"] for c in inc["concept"]}


def test_generated_codes_equal_the_services():
    system = lambda ident: profiles.system_url(profiles.DEFAULT_BASE, ident)  # noqa: E731 - a local one-liner
    # schemes
    schemes = _concepts(_generated("CodeSystem", profiles.SCHEME_SYSTEM)["concept"])
    assert set(schemes) == set(BUILT_IN)
    assert _valueset_codes(profiles.SCHEME_SYSTEM) == {(system(profiles.SCHEME_SYSTEM), s) for s in BUILT_IN}
    # events
    events = _concepts(_generated("CodeSystem", profiles.EVENT_SYSTEM)["concept"])
    assert set(events) == {k.value for k in EventKind}
    assert _valueset_codes(profiles.EVENT_SYSTEM) == {
        (system(profiles.EVENT_SYSTEM), k.value) for k in EventKind
    }
    # grades: each band of each scheme, under its severity, with its rank and bound
    grades = _concepts(_generated("CodeSystem", profiles.GRADE_SYSTEM)["concept"])
    want = {profiles.grade_code(s.name, b): (s.name, b) for s in BUILT_IN.values() for b in s.bands}
    severities = {"mild", "moderate", "severe", profiles.NORMAL}
    assert set(grades) == set(want) | severities
    for code, (scheme, band) in want.items():
        parent, concept = grades[code]
        assert parent == profiles.severity_code(band.severity), code
        props = {
            p["code"]: next(v for k, v in p.items() if k.startswith("value")) for p in concept["property"]
        }
        assert props["scheme"] == scheme and props["rank"] == band.rank, code
        assert (
            props.get("upper-bound") == band.below
            and props.get("upper-bound-is-lln", False) == band.below_lln
        ), code
    assert _valueset_codes(profiles.GRADE_SYSTEM) == {(system(profiles.GRADE_SYSTEM), c) for c in want}
    # the other systems' codes the service writes
    assert _valueset_codes("neutrowatch-flag-code") == {
        (c["system"], c["code"]) for c in (alerts.NEUTROPENIA, alerts.FEBRILE_NEUTROPENIA)
    }
    assert _valueset_codes("neutrowatch-provenance-activity") == {
        (c["system"], c["code"]) for c in alerts.ACTIVITY.values()
    }


def test_the_urls_the_service_stamps_are_the_generated_ones():
    assert profiles.DEFAULT_BASE == AlertSettings().canonical_base
    config = yaml.safe_load((PROFILES / "sushi-config.yaml").read_text())
    assert config["canonical"] == profiles.DEFAULT_BASE
    urls = {json.loads(p.read_text())["url"] for p in GENERATED.glob("*.json")}
    stamped = {
        profiles.profile_url(profiles.DEFAULT_BASE, i)
        for i in (
            profiles.FLAG_PROFILE,
            profiles.COMMUNICATION_PROFILE,
            profiles.PROVENANCE_PROFILE,
            profiles.ANC_EXTENSION,
            profiles.GRADE_EXTENSION,
            profiles.SCHEME_EXTENSION,
            profiles.EVENT_EXTENSION,
            profiles.SOFTWARE_EXTENSION,
        )
    }
    stamped |= {
        profiles.system_url(profiles.DEFAULT_BASE, i)
        for i in (profiles.GRADE_SYSTEM, profiles.SCHEME_SYSTEM, profiles.EVENT_SYSTEM)
    }
    assert stamped <= urls
    for path in GENERATED.glob("*.json"):
        resource = json.loads(path.read_text())
        assert path.name == f"{resource['resourceType']}-{resource['id']}.json"
        assert resource["url"] == profiles.canonical(
            profiles.DEFAULT_BASE, resource["resourceType"], resource["id"]
        )


def test_terminology_fsh_is_generated_from_the_service():
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), str(PROFILES / "tools" / "terminology.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_generated_json_is_what_sushi_builds():
    """build.sh --check: SUSHI (offline) compiles the FSH to exactly generated/ (needs
    `npm ci --prefix fhir_profiles`)."""
    if not (PROFILES / "node_modules" / ".bin" / "sushi").exists():
        pytest.skip("SUSHI not installed: npm ci --prefix fhir_profiles")
    ok, reason = engine_available()
    if not ok:
        pytest.skip(reason)
    done = subprocess.run(
        ["bash", str(PROFILES / "build.sh"), "--check"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- (d) the transaction the worker posts --------------------------------------------------------------


def _post(base_url: str, bundle: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        base_url,
        data=json.dumps(bundle).encode(),
        method="POST",
        headers={"Content-Type": "application/fhir+json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _transaction(w: OutboxWrites, flag_entry: dict[str, Any] | None, flag_id: str | None) -> dict[str, Any]:
    """The Bundle as service/output/transaction.py and service/live/writer.py build it
    (fhir_profiles/README.md)."""
    entries = [flag_entry] if flag_entry else []
    if w.communication is not None and w.communication_identifier is not None:
        entries.append(
            {
                "fullUrl": w.communication_full_url,
                "resource": w.communication,
                "request": {
                    "method": "POST",
                    "url": "Communication",
                    "ifNoneExist": "identifier=" + "|".join(w.communication_identifier),
                },
            }
        )
    provenance = provenance_entry(w, flag_id)
    if provenance is not None:
        entries.append(provenance)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def test_transaction_with_provenance_against_the_engine(fhir_base_url, validator, tmp_path):
    """A new episode's write, re-posted; then an update of its Flag by PUT: the Provenance targets
    resolve to the ids the server gave, nothing is doubled, and what the server holds validates."""
    _events, written = replay(
        tmp_path, population(patients=12, days=42, seed=3), {"alerts": {"recipients": list(POOL)}}
    )
    # The first two writes of one episode, rebuilt as the worker's outbox writes.
    flags = [i for i, r in enumerate(written) if r["resourceType"] == "Flag"]
    episodes = Counter(written[i]["identifier"][0]["value"] for i in flags)
    episode = next(e for e, n in episodes.items() if n >= 2)
    writes = []
    for i in flags:
        flag = written[i]
        if flag["identifier"][0]["value"] != episode:
            continue
        comm = written[i + 1] if written[i + 1]["resourceType"] == "Communication" else None
        prov = written[i + (2 if comm else 1)]
        flag_id = (flag["identifier"][0]["system"], flag["identifier"][0]["value"])
        comm_id = (comm["identifier"][0]["system"], comm["identifier"][0]["value"]) if comm else None
        tag = (prov["meta"]["tag"][0]["system"], prov["meta"]["tag"][0]["code"])
        aw = alerts.AlertWrites(
            flag=flag,
            communication=comm,
            flag_identifier=flag_id,
            communication_identifier=comm_id,
            provenance=prov,
            provenance_tag=tag,
            flag_full_url=alerts.full_url(*flag_id),
            communication_full_url=alerts.full_url(*comm_id) if comm_id else None,
            provenance_full_url=alerts.full_url(*tag),
        )
        writes.append(outbox_writes(aw, ""))
        if len(writes) == 2:
            break
    assert len(writes) == 2, "the population should have an episode with two writes"
    first, second = writes
    flag_entry = {
        "fullUrl": first.flag_full_url,
        "resource": first.flag,
        "request": {
            "method": "POST",
            "url": "Flag",
            "ifNoneExist": "identifier=" + "|".join(first.flag_identifier),
        },
    }
    for _attempt in range(2):  # the second post is a retry after a lost answer: nothing new
        response = _post(fhir_base_url, _transaction(first, flag_entry, None))
        assert [e["response"]["status"][:1] for e in response["entry"]] == ["2"] * 3
    (flag,) = export(fhir_base_url, "Flag")
    (provenance,) = export(fhir_base_url, "Provenance")
    (communication,) = export(fhir_base_url, "Communication")
    assert [t["reference"] for t in provenance["target"]] == [
        f"Flag/{flag['id']}",
        f"Communication/{communication['id']}",
    ]
    # The next event updates the Flag by a versioned PUT: its Provenance then names the Flag by id.
    put = {
        "fullUrl": f"{fhir_base_url}/Flag/{flag['id']}",
        "resource": {**second.flag, "id": flag["id"]},
        "request": {
            "method": "PUT",
            "url": f"Flag/{flag['id']}",
            "ifMatch": f'W/"{flag["meta"]["versionId"]}"',
        },
    }
    response = _post(fhir_base_url, _transaction(second, put, flag["id"]))
    assert all(e["response"]["status"].startswith("2") for e in response["entry"])
    provenances = export(fhir_base_url, "Provenance")
    assert len(provenances) == 2
    assert second.provenance is not None
    newest = next(p for p in provenances if p["meta"]["tag"] == second.provenance["meta"]["tag"])
    assert newest["target"][0]["reference"] == f"Flag/{flag['id']}"
    held = export(fhir_base_url, "Flag") + export(fhir_base_url, "Communication") + provenances
    failures = validator(held)
    assert not failures, describe(failures)
