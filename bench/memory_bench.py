"""`make bench`, memory part: peak memory of `replay` on one large Bundle file, and of `once`
against the real FHIR test engine serving one very large search page.

1. replay: a `tests.synthetic` population written as one pretty-printed Bundle (~200 MB) and as
   NDJSON (the same resources): `replay` of each in a fresh process, and of the Bundle once more
   read whole (`replay.LARGE_DOCUMENT` set above its size: how every Bundle was read before).
2. once: the engine (tests/fhir_server) holds 1000 Observations whose notes make one page of
   `_count=1000` about 300 MB; `python -m service once` with the default `fhir.max_response_bytes`
   (refused unread), with the cap raised above the page (what reading it costs), and on a page just
   under the default cap (what the largest accepted page costs).

Each run is a fresh interpreter; its peak RSS is VmHWM from /proc (ru_maxrss would carry over the
high-water mark of this process through fork and exec), and for replay also the largest worker
process (RUSAGE_CHILDREN). Numbers go to docs/benchmarks.md (machine and date included); they are
measured, never asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.replay_bench import machine, write_section  # noqa: E402 - after the sys.path line above
from tests.fhir_server.engine import FhirEngine  # noqa: E402 - after the sys.path line above
from tests.fhir_server.load import put_all  # noqa: E402 - after the sys.path line above
from tests.synthetic import generate, observations_target  # noqa: E402 - after the sys.path line above

# Runs `python -m service ARGS` in this interpreter and prints its exit code, peak RSS (VmHWM, KiB)
# and the largest child's peak RSS (KiB) as the last line of stdout.
CHILD = """
import json, re, resource, sys, time
from pathlib import Path
if sys.argv[1] != "-":
    import service.replay.engine
    service.replay.engine.LARGE_DOCUMENT = int(sys.argv[1])  # above the input's size: read whole, as before
from service.__main__ import main
t0 = time.perf_counter()
rc = main(sys.argv[2:])
seconds = time.perf_counter() - t0
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"rc": rc, "seconds": seconds, "hwm_kib": hwm,
                  "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def child(*args: str, whole: bool = False) -> dict:
    size = str(Path(args[1]).stat().st_size + 1) if whole else "-"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, size, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NEUTROWATCH_LOGGING__LEVEL": "warning"},
        timeout=900,
    )
    if not proc.stdout.strip():
        raise RuntimeError(f"child failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = [line for line in proc.stderr.splitlines() if line.strip()][-1:]
    return result


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


# -- replay -------------------------------------------------------------------------------------------


def write_inputs(n: int, work: Path) -> tuple[Path, Path, int]:
    """The same resources as one pretty-printed Bundle and as NDJSON."""
    bundle, ndjson = work / "bundle.json", work / "bundle.ndjson"
    count = 0
    with open(bundle, "wb", buffering=1 << 20) as b, open(ndjson, "wb", buffering=1 << 20) as nd:
        b.write(b'{\n  "resourceType": "Bundle",\n  "type": "collection",\n  "entry": [')
        for resource in generate(observations_target(n, 2000, seed=7)):
            entry = orjson.dumps(
                {"fullUrl": f"urn:uuid:{resource.get('id')}", "resource": resource},
                option=orjson.OPT_INDENT_2,
            )
            b.write((b"," if count else b"") + b"\n    " + entry.replace(b"\n", b"\n    "))
            nd.write(orjson.dumps(resource) + b"\n")
            count += 1
        b.write(b"\n  ]\n}\n")
    return bundle, ndjson, count


def bench_replay(n: int, work: Path) -> dict:
    t0 = time.perf_counter()
    bundle, ndjson, resources = write_inputs(n, work)
    print(
        f"generated {bundle.stat().st_size / 1e6:.0f} MB Bundle in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    events = str(work / "events.jsonl")
    runs = {
        "Bundle, entry by entry": child("replay", str(bundle), "--events", events),
        "Bundle, read whole (as before)": child("replay", str(bundle), "--events", events, whole=True),
        "NDJSON, same resources": child("replay", str(ndjson), "--events", events),
    }
    for name, run in runs.items():
        print(f"replay {name}: {run}", file=sys.stderr)
    return {
        "bundle_bytes": bundle.stat().st_size,
        "ndjson_bytes": ndjson.stat().st_size,
        "resources": resources,
        "runs": runs,
    }


# -- once against the engine ---------------------------------------------------------------------------


def padded(i: int, note_bytes: int) -> dict:
    """A monitored CBC Observation (ANC 2.5, no alert) carrying `note_bytes` of note text."""
    return {
        "resourceType": "Observation",
        "id": f"big-{i}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "751-8"}]},
        "subject": {"reference": f"Patient/big{i % 5}"},
        "effectiveDateTime": "2026-01-01T08:00:00Z",
        "valueQuantity": {
            "value": 2.5,
            "unit": "10*3/uL",
            "system": "http://unitsofmeasure.org",
            "code": "10*3/uL",
        },
        "note": [{"text": "x" * note_bytes}],
    }


def once(engine: FhirEngine, work: Path, name: str, cap: int | None) -> dict:
    config = work / f"{name}.yaml"
    fhir = {
        "base_url": engine.base_url,
        "allow_insecure_http": True,
        "page_size": 1000,
        "timeout_seconds": 600,
        **({"max_response_bytes": cap} if cap is not None else {}),
    }
    config.write_text(
        json.dumps(
            {
                "fhir": fhir,
                "store": {"path": str(work / f"{name}.sqlite3")},
                "poll": {"initial_lookback_hours": 24, "temperatures": "off"},
            }
        )
    )
    return child("once", "--config", str(config))


def page_bytes(engine: FhirEngine) -> int:
    import urllib.request

    size = 0
    with urllib.request.urlopen(f"{engine.base_url}/Observation?_count=1000", timeout=600) as response:
        while block := response.read(1 << 20):
            size += len(block)
    return size


def bench_once(big_note: int, fit_note: int, work: Path) -> dict:
    out: dict = {}
    with FhirEngine() as engine:
        for label, note, runs in (
            ("large", big_note, (("default cap", None), ("cap raised to 1 GiB", 1 << 30))),
            ("fits", fit_note, (("default cap", None),)),
        ):
            engine.reset()
            t0 = time.perf_counter()
            put_all(
                engine.base_url,
                (padded(i, note) for i in range(1000)),
                batch_size=max(1, (30 << 20) // max(note, 1)),
            )
            loaded = time.perf_counter() - t0
            t0 = time.perf_counter()
            size = page_bytes(engine)
            served = time.perf_counter() - t0
            print(
                f"engine: page of {size / 1e6:.0f} MB (loaded in {loaded:.0f} s, served in {served:.0f} s)",
                file=sys.stderr,
            )
            out[label] = {"page_bytes": size, "load_seconds": loaded, "serve_seconds": served, "runs": {}}
            for name, cap in runs:
                run = once(engine, work, f"{label}-{name.split()[0]}", cap)
                print(f"once, {label} page, {name}: {run}", file=sys.stderr)
                out[label]["runs"][name] = run
    return out


# -- the report ------------------------------------------------------------------------------------------


def error_of(run: dict) -> str:
    """The error of the run's last log line (JSON), or the line itself."""
    line = run["stderr"][0] if run["stderr"] else ""
    try:
        return str(json.loads(line).get("error", line))
    except (ValueError, AttributeError):
        return line.removeprefix("neutrowatch: ")


def render(rep: dict, onc: dict, started: float) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Memory on large inputs (`make bench`)",
        "",
        f"Measured {when} on {machine()}; whole bench {time.perf_counter() - started:.0f} s.",
        "",
        "Peak RSS of each run in a fresh process (VmHWM), and of its largest worker process (replay's "
        "partitioned engine). The Helm chart's container limit is 512 MiB.",
        "",
        f"**replay** of one pretty-printed Bundle file of {rep['bundle_bytes'] / 1e6:,.0f} MB "
        f"({rep['resources']:,} resources, `tests.synthetic`, seed 7), and of the same resources as "
        f"NDJSON ({rep['ndjson_bytes'] / 1e6:,.0f} MB). *Read whole* is how every Bundle was read before "
        "(`replay.LARGE_DOCUMENT` set above the file's size); the events are the same byte for byte "
        "(tests/unit/test_replay.py).",
        "",
        "| input | replay | peak RSS | worker peak RSS |",
        "|---|---:|---:|---:|",
    ]
    for name, run in rep["runs"].items():
        lines.append(
            f"| {name} | {run['seconds']:.1f} s | {mib(run['hwm_kib'])} | {mib(run['children_kib'])} |"
        )
    lines += [
        "",
        "**once** against the test engine (tests/fhir_server: Medplum FhirRouter + MemoryRepository, "
        "same machine), 1000 Observations whose notes make one search page (`page_size` 1000, the "
        "engine's maximum) of the size shown. The engine builds the whole page before it answers "
        "(with its Content-Length), so a refused page still costs the engine's time. Exit 1: the "
        "cycle failed (the cursor stays; the service would try again each interval).",
        "",
        "| page | `fhir.max_response_bytes` | exit | once | peak RSS | outcome |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for label in ("large", "fits"):
        page = onc[label]
        for name, run in page["runs"].items():
            outcome = f"refused: {error_of(run)}" if run["rc"] else "read, cycle done"
            lines.append(
                f"| {page['page_bytes'] / 1e6:,.0f} MB | {name} | {run['rc']} | {run['seconds']:.1f} s "
                f"| {mib(run['hwm_kib'])} | {outcome} |"
            )
    lines += [
        "",
        f"The engine served the {onc['large']['page_bytes'] / 1e6:,.0f} MB page in "
        f"{onc['large']['serve_seconds']:.0f} s (after {onc['large']['load_seconds']:.0f} s loading it).",
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--observations",
        type=int,
        default=100_000,
        help="Observations of the replay input (~200 MB as a Bundle)",
    )
    ap.add_argument(
        "--big-note",
        type=int,
        default=300_000,
        help="note bytes per Observation of the large page (1000 of them)",
    )
    ap.add_argument(
        "--fit-note",
        type=int,
        default=60_000,
        help="note bytes per Observation of the page under the default cap",
    )
    ap.add_argument("--write", type=Path, help="update this Markdown file")
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        work = Path(tmp)
        rep = bench_replay(args.observations, work)
        for path in work.glob("bundle*"):
            path.unlink()
        onc = bench_once(args.big_note, args.fit_note, work)
    section = render(rep, onc, started)
    print(section)
    if args.write:
        write_section(args.write, section, "memory-bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
