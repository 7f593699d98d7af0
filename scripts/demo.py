"""`make demo`: generate a small synthetic population, run the service's core over it with `replay`,
and show the alerts it raised as a table. (The live loop against the bundled FHIR engine joins this
demo with issue 3.)"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.__main__ import main as cli  # noqa: E402
from service.synthetic import PopulationSpec, write_ndjson  # noqa: E402

OUT = ROOT / ".demo"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main() -> int:
    OUT.mkdir(exist_ok=True)
    population = OUT / "population.ndjson"
    count = write_ndjson(PopulationSpec(patients=40, seed=1), population)
    events_path, alerts_path = OUT / "events.jsonl", OUT / "alerts.ndjson"
    code = cli(["replay", str(population), "--events", str(events_path), "--alerts", str(alerts_path)])
    if code:
        return code
    events = [orjson.loads(line) for line in events_path.read_bytes().splitlines()]
    alerts = [e for e in events if e["event"] != "rejected"]
    rows = [
        [e["patient"], e["event"], e["grade"] or "", f"{e['anc']:,}", e["effective"], e["method"]]
        for e in alerts
    ]
    print(f"\nneutrowatch demo: replay of {count:,} synthetic FHIR resources (40 patients, 8 weeks)\n")
    print(table(rows, ["PATIENT", "EVENT", "GRADE", "ANC /µL", "COLLECTED", "ANC METHOD"]))
    rejected = Counter(e["reason"] for e in events if e["event"] == "rejected")
    if rejected:
        print("\nRejected inputs (kept with their reason, never alerted on):")
        for reason, n in rejected.most_common():
            print(f"  {n:>3} × {reason}")
    kinds = Counter(e["event"] for e in alerts)
    resources = Counter(orjson.loads(line)["resourceType"] for line in alerts_path.read_bytes().splitlines())
    print(f"\n{len(alerts)} alert events ({', '.join(f'{k} {v}' for k, v in kinds.items())}); "
          f"{resources.get('Flag', 0)} Flag and {resources.get('Communication', 0)} Communication writes "
          f"in {alerts_path.relative_to(ROOT)}; decisions in {events_path.relative_to(ROOT)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
