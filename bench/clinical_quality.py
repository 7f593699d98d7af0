"""`make bench`: alert burden and safety of the resolution rules, the defaults against the former
rule (one normal panel resolves: resolution.confirmations 1, min_hours 0, reopen_days 0), on the
MIMIC-IV demo extract with LOINC codings (tests/mimic.py) and a synthetic population with
chemotherapy-like nadirs (tests/synthetic.py). Figures go to docs/clinical-quality.md between its
markers; tests/unit/test_clinical_quality.py asserts the safety comparison on both populations.

Measures (docs/clinical-quality.md explains them): Communications per patient-month, `resolved`
followed by `new` for the same patient within 7 days, episodes resolved within 48 h of opening, and
the severe and febrile alerts of the former rule that the defaults announce late or not at all.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.__main__ import main as service_main  # noqa: E402 - after the sys.path line above
from service.fhir.fhirtime import to_epoch_us  # noqa: E402 - after the sys.path line above
from tests import mimic, synthetic  # noqa: E402 - after the sys.path line above

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
MONTH_US = int(30.4375 * DAY_US)
LEGACY: dict[str, float] = {"confirmations": 1, "min_hours": 0, "reopen_days": 0, "memory_days": 0}
# Events that send a Communication (chronic and recovering update the Flag only).
COMMUNICATED = {"new", "worsening", "resolved", "febrile", "recurrence", "retracted"}
OPENS = {"new", "worsening", "recurrence"}
CHEMO = synthetic.PopulationSpec(patients=120, seed=16, days=120, chemo_fraction=0.6, chronic_fraction=0.1)
START, END = "<!-- clinical-quality:start -->", "<!-- clinical-quality:end -->"


@dataclass(frozen=True)
class Burden:
    patients: int
    patient_months: float
    communications: int
    resolved_then_new_7d: int
    resolved_within_48h: int
    most_for_one_patient: int

    @property
    def per_patient_month(self) -> float:
        return self.communications / self.patient_months if self.patient_months else 0.0


@dataclass
class _Episode:
    announced: set[str] = field(default_factory=set)  # "severe", "febrile"
    open: bool = True


def replay(
    source: Path, workdir: Path, name: str, resolution: dict[str, float] | None
) -> list[dict[str, Any]]:
    """The events replay writes for `source` with the given clinical.resolution settings (None: defaults)."""
    config = workdir / f"{name}.yaml"
    settings: dict[str, Any] = {"logging": {"level": "warning"}}
    if resolution is not None:
        settings["clinical"] = {"resolution": resolution}
    config.write_text(yaml.safe_dump(settings))
    events = workdir / f"{name}.events.jsonl"
    assert service_main(["replay", str(source), "--events", str(events), "--config", str(config)]) == 0
    return [orjson.loads(line) for line in events.read_bytes().splitlines()]


def patient_months(source: Path) -> tuple[int, float]:
    """Patients with an Observation, and the sum of their spans (first to last collection, at least a day)."""
    spans: dict[str, list[int]] = {}
    for line in source.read_bytes().splitlines():
        r = orjson.loads(line)
        when, subject = r.get("effectiveDateTime"), r.get("subject", {}).get("reference")
        if r.get("resourceType") != "Observation" or not when or not subject:
            continue
        try:
            us = to_epoch_us(when)
        except ValueError:
            continue
        span = spans.setdefault(subject, [us, us])
        span[0], span[1] = min(span[0], us), max(span[1], us)
    return len(spans), sum(max(hi - lo, DAY_US) for lo, hi in spans.values()) / MONTH_US


def _us(event: dict[str, Any]) -> int:
    return to_epoch_us(event["effective"])


def burden(events: Iterable[dict[str, Any]], patients: int, months: float) -> Burden:
    alerts = [e for e in events if e["event"] in COMMUNICATED]
    opened: dict[str, int] = {}
    last_resolved: dict[str, int] = {}
    pairs = quick = 0
    for e in alerts:
        if e["event"] == "new":
            opened[e["episode"]] = _us(e)
            resolved = last_resolved.get(e["patient"])
            pairs += resolved is not None and _us(e) - resolved <= 7 * DAY_US
        elif e["event"] == "resolved" and not e.get("correction"):
            last_resolved[e["patient"]] = _us(e)
            quick += e["episode"] in opened and _us(e) - opened[e["episode"]] < 48 * HOUR_US
    per_patient = Counter(e["patient"] for e in alerts)
    return Burden(patients, months, len(alerts), pairs, quick, max(per_patient.values(), default=0))


def _urgent(event: dict[str, Any]) -> set[str]:
    """What an alert announces that the comparison must find again: severe, febrile."""
    found = {"febrile"} if event["event"] == "febrile" else set()
    if event["event"] in OPENS and event["grade"] == "severe":
        found.add("severe")
    return found


def late_or_missed(former: Sequence[dict[str, Any]], now: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The former rule's severe and febrile alerts (those it did not withdraw itself) for which,
    with the rules now, the patient's episode is not open with that announced at or before the same
    panel's collection time."""
    by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in now:
        if e["event"] in COMMUNICATED | {"recovering", "chronic"}:
            by_patient[e["patient"]].append(e)
    withdrawn = {
        (e["episode"], e["retracted"]["event"], e["retracted"]["grade"], e["retracted"]["effective"])
        for e in former
        if e["event"] == "retracted"
    }
    out = []
    for old in former:
        if (old.get("episode"), old["event"], old["grade"], old["effective"]) in withdrawn:
            continue  # the former rule withdrew it itself (a corrected result)
        wanted = _urgent(old)
        if wanted and not wanted <= _announced_at(by_patient[old["patient"]], _us(old)):
            out.append(old)
    return out


def _announced_at(events: Sequence[dict[str, Any]], at_us: int) -> set[str]:
    """What the patient's open episode has announced by `at_us` (events in decision order)."""
    episodes: dict[str, _Episode] = {}
    current: str | None = None
    for e in events:
        if _us(e) > at_us:
            break
        episode = episodes.setdefault(e["episode"], _Episode())
        if e["event"] == "retracted":
            episode.announced -= {
                "severe" if e["retracted"]["grade"] == "severe" else "",
                e["retracted"]["event"],
            }
            episode.open = e.get("episode_status") == "active"
        elif e["event"] == "resolved":
            episode.open = False
        else:
            episode.open = True
            episode.announced |= _urgent(e)
        current = e["episode"] if episode.open else (None if current == e["episode"] else current)
    return episodes[current].announced if current is not None else set()


def compare(source: Path, workdir: Path, name: str) -> tuple[Burden, Burden, list[dict[str, Any]]]:
    """(burden with the former rule, burden with the defaults, former severe/febrile alerts late or
    missed)."""
    former = replay(source, workdir, f"{name}-former", LEGACY)
    now = replay(source, workdir, f"{name}-defaults", None)
    patients, months = patient_months(source)
    return burden(former, patients, months), burden(now, patients, months), late_or_missed(former, now)


def populations(workdir: Path, chemo: synthetic.PopulationSpec = CHEMO) -> dict[str, Path]:
    """The two inputs: the MIMIC extract with LOINC codings, the synthetic chemotherapy population."""
    synthetic.write_ndjson(chemo, workdir / "chemo.ndjson")
    return {
        "MIMIC-IV demo (LOINC-mapped)": mimic.write_ndjson(workdir / "mimic.ndjson"),
        f"synthetic, {chemo.patients} patients, {chemo.days} days, chemo {chemo.chemo_fraction:.0%}": workdir
        / "chemo.ndjson",
    }


def table(results: dict[str, tuple[Burden, Burden, list[dict[str, Any]]]]) -> str:
    rows = [
        "| population | rule | patients | patient-months | Communications | per patient-month | "
        "most for one patient | resolved→new ≤ 7 d | resolved < 48 h "
        "| former severe/febrile late or missed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (former, now, missed) in results.items():
        for rule, b, late in (("former (1 normal)", former, "—"), ("defaults", now, str(len(missed)))):
            rows.append(
                f"| {name} | {rule} | {b.patients} | {b.patient_months:.1f} | {b.communications} | "
                f"{b.per_patient_month:.2f} | {b.most_for_one_patient} | {b.resolved_then_new_7d} | "
                f"{b.resolved_within_48h} | {late} |"
            )
    return "\n".join(rows)


def write(doc: Path, text: str) -> None:
    body = doc.read_text(encoding="utf-8")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--write", type=Path, help="docs/clinical-quality.md: replace the figures between its markers"
    )
    p.add_argument("--patients", type=int, default=CHEMO.patients)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = populations(work, replace(CHEMO, patients=args.patients))
        results = {name: compare(path, work, f"p{i}") for i, (name, path) in enumerate(inputs.items())}
    text = table(results)
    print(text)
    if args.write:
        write(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
