"""`make demo`: the service end to end on embedded defaults.

Starts the bundled FHIR engine, loads a generated population (40 patients with CBC panels over
8 weeks, some through a chemotherapy nadir) in four arrivals, runs the service's poll cycle after
each (SQLite state), prints the Flags and Communications it created on the server, and checks them
against what `replay` predicts for the same data. Everything is stopped at the end."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import logging as nw_logging  # noqa: E402 - after the sys.path line above
from service.fhir.client import FhirClient  # noqa: E402 - after the sys.path line above
from service.live.store.sqlite import SqliteStore  # noqa: E402 - after the sys.path line above
from service.live.worker import Worker  # noqa: E402 - after the sys.path line above
from service.output.events import Decision, EventRecord, RejectedRecord  # noqa: E402 - after sys.path
from tests.fhir_server.engine import EngineUnavailable, FhirEngine  # noqa: E402 - after sys.path
from tests.fhir_server.load import export, put_all  # noqa: E402 - after the sys.path line above
from tests.integration.live import compare_with_oracle, settings_for, stages  # noqa: E402 - after sys.path
from tests.synthetic import PopulationSpec, generate  # noqa: E402 - after the sys.path line above

FLAG_ONLY = ("recovering", "chronic")  # decisions that update the Flag without a Communication


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


async def run_service(settings, state: Path) -> tuple[list[str], list[Decision]]:
    store = SqliteStore(state)
    await store.open()
    lines = []
    decisions: list[Decision] = []
    try:
        async with FhirClient(settings.fhir) as client:
            worker = Worker(settings, client, store)
            population = list(generate(PopulationSpec(patients=40, seed=1, corrections=0.0)))
            for n, stage in enumerate(stages(population, 4), 1):
                put_all(settings.fhir.base_url, stage)
                t0 = time.perf_counter()
                report = await worker.run_cycle()
                lines.append(
                    f"arrival {n}: {len(stage):>5} resources loaded; cycle read {report.observations:>5} "
                    f"Observations on {report.pages} pages, assessed {report.panels_assessed} panels, "
                    f"wrote {report.written} alerts in {time.perf_counter() - t0:.1f} s"
                )
            decisions = await store.decisions()
    finally:
        await store.close()
    return lines, decisions


def main() -> int:
    os.environ.setdefault("NEUTROWATCH_LOGGING__LEVEL", "error")  # rejections are summarised below instead
    nw_logging.configure("error", "console")
    try:
        engine = FhirEngine()
        base = engine.start()
    except EngineUnavailable as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="neutrowatch-demo-") as tmp:
            settings = settings_for(base, Path(tmp) / "state.sqlite3")
            print(
                f"\nneutrowatch demo: FHIR engine at {base}, state in SQLite, 40 synthetic patients over 8 "
                "weeks\n"
            )
            lines, decisions = asyncio.run(run_service(settings, Path(tmp) / "state.sqlite3"))
            for line in lines:
                print("  " + line)
            comms = {c["identifier"][0]["value"]: c for c in export(base, "Communication")}
            flags = {f["identifier"][0]["value"]: f for f in export(base, "Flag")}
            alerts = sorted(
                (d for d in decisions if isinstance(d, EventRecord)), key=lambda d: (d.patient, d.effective)
            )
            rows = []
            for d in alerts:
                comm = next(
                    (c for key, c in comms.items() if key.startswith(f"{d.episode}-{d.event}-")), None
                )
                rows.append(
                    [
                        d.patient,
                        d.event,
                        d.grade or "-",
                        f"{d.anc:,.0f}",
                        d.effective[:16],
                        "(Flag only)" if d.event in FLAG_ONLY else comm["priority"] if comm else "MISSING",
                        flags[d.episode]["status"],
                    ]
                )
            print(
                "\nAlerts written to the FHIR server (a Communication each, but the Flag-only updates "
                "`recovering` and `chronic`; the episode's Flag as it stands now):\n"
            )
            print(table(rows, ["PATIENT", "EVENT", "GRADE", "ANC /µL", "COLLECTED", "PRIORITY", "FLAG"]))
            rejected = Counter(d.reason for d in decisions if isinstance(d, RejectedRecord))
            print("\nRejected inputs (kept with their reason in the state store, never alerted on):")
            for reason, n in rejected.most_common():
                print(f"  {n:>3} × {reason}")
            counts = compare_with_oracle(base, Path(tmp) / "oracle")
            kinds = Counter(d.event for d in alerts)
            print(
                f"\n{counts['flags']} Flags and {counts['communications']} Communications on the server for "
                f"{len(alerts)} decisions ({', '.join(f'{k} {v}' for k, v in kinds.items())}); they match "
                "what `replay` predicts "
                "for the same data: none missing, none doubled."
            )
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
