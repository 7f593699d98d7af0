#!/usr/bin/env python3
"""Generate docs/examples/{Flag,Communication,Provenance}.json: one alert write (a febrile
neutropenia) exactly as the service builds it, taken from `python -m service replay --provenance`
over a fixed synthetic population, so the examples cannot drift from the code.

    python scripts/alert_examples.py           # write the files
    python scripts/alert_examples.py --check   # exit 1 (with a diff) if the committed files are stale

The input is `tests.synthetic` with SPEC below (deterministic from its seed); the configuration is
the default one with RECIPIENTS as the fallback recipient pool. The write shown is the first
`febrile` event of the replay: its Flag as updated by the event, the Communication announcing it,
and its Provenance (targets by the transaction's urn:uuid fullUrls, which the server rewrites to
the ids it assigns; see fhir_profiles/README.md). The files change when the code changes what it
writes, and with the installed version (Provenance.agent carries it).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "examples"

sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402 - after the sys.path line above
import yaml  # noqa: E402 - after the sys.path line above

from service.__main__ import main as cli  # noqa: E402 - after the sys.path line above
from tests.synthetic import PopulationSpec, generate  # noqa: E402 - after the sys.path line above

SPEC = PopulationSpec(patients=6, days=42, seed=3, temperatures=True, corrections=0.0)
RECIPIENTS = ["CareTeam/oncology"]
EVENT = "febrile"
TYPES = ("Flag", "Communication", "Provenance")
Resource = dict[str, Any]


def replay(workdir: Path) -> list[Resource]:
    """What `python -m service replay INPUT --alerts A --provenance` writes for SPEC."""
    data, events, alerts, config = (
        workdir / n for n in ("input.ndjson", "events.jsonl", "alerts.ndjson", "config.yaml")
    )
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in generate(SPEC)))
    config.write_text(yaml.safe_dump({"alerts": {"recipients": RECIPIENTS}, "logging": {"level": "warning"}}))
    args = [
        "replay",
        str(data),
        "--events",
        str(events),
        "--alerts",
        str(alerts),
        "--config",
        str(config),
        "--provenance",
    ]
    if cli(args) != 0:
        raise SystemExit("replay failed")
    return [orjson.loads(line) for line in alerts.read_bytes().splitlines()]


def event_of(provenance: Resource) -> str:
    return next(
        e["valueCoding"]["code"]
        for e in provenance["extension"]
        if e["url"].endswith("/neutrowatch-alert-event")
    )


def pick(written: list[Resource]) -> dict[str, Resource]:
    """The first write of EVENT: the Flag and Communication just before its Provenance."""
    for i, resource in enumerate(written):
        if resource["resourceType"] == "Provenance" and event_of(resource) == EVENT:
            flag, communication = written[i - 2], written[i - 1]
            assert (flag["resourceType"], communication["resourceType"]) == ("Flag", "Communication")
            return {"Flag": flag, "Communication": communication, "Provenance": resource}
    raise SystemExit(f"the population has no {EVENT} event: change SPEC")


def render(resource: Resource) -> str:
    return json.dumps(resource, indent=2, ensure_ascii=False) + "\n"


def generated() -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="neutrowatch-examples-") as tmp:
        chosen = pick(replay(Path(tmp)))
    return {f"{t}.json": render(chosen[t]) for t in TYPES}


def check(files: dict[str, str], out: Path) -> int:
    stale = 0
    for name, text in files.items():
        path = out / name
        current = path.read_text() if path.exists() else ""
        if current != text:
            stale += 1
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(True),
                    text.splitlines(True),
                    f"{path} (committed)",
                    f"{path} (generated)",
                    n=2,
                )
            )
    if stale:
        print(f"{stale} example(s) out of date: run python scripts/alert_examples.py", file=sys.stderr)
        return 1
    print(f"{out} is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--check", action="store_true", help="exit 1 if the committed examples differ from the generated ones"
    )
    p.add_argument("--output", type=Path, default=OUT)
    args = p.parse_args(argv)
    files = generated()
    if args.check:
        return check(files, args.output)
    args.output.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.output / name).write_text(text)
    print(f"wrote {', '.join(files)} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
