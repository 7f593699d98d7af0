"""`make bench`: replay throughput and memory on generated NDJSON, against a bare orjson parse.

Each measurement runs in its own child process so peak RSS belongs to that run alone. Figures go to
docs/benchmarks.md (machine and date included). Numbers are measured, never asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.synthetic import observations_target, write_ndjson  # noqa: E402

CHILD_REPLAY = """
import json, os, resource, sys, time
from service.config import load_settings
from service.replay import Replay
s = load_settings(None)
t0 = time.perf_counter()
with Replay(s.rules, s.alerts) as r, open(os.devnull, "wb") as sink:
    stats = r.run([sys.argv[1]], sink)
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "observations": stats.observations, "resources": stats.resources, "events": dict(stats.events)}))
"""

CHILD_ORJSON = """
import json, resource, sys, time, orjson
loads = orjson.loads
total = 0.0
n = 0
with open(sys.argv[1], "rb") as fh:
    while True:
        chunk = fh.readlines(8 << 20)
        if not chunk:
            break
        t0 = time.perf_counter()
        for line in chunk:
            loads(line)
        total += time.perf_counter() - t0
        n += len(chunk)
print(json.dumps({"seconds": total, "lines": n, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def child(code: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "NEUTROWATCH_LOGGING__LEVEL": "warning"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; Python {platform.python_version()}"


def run_size(n: int, patients: int, workdir: Path) -> dict:
    path = workdir / f"bench-{n}.ndjson"
    spec = observations_target(n, patients, seed=7)
    if not path.exists():
        t0 = time.perf_counter()
        write_ndjson(spec, path)
        print(f"generated {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    base = child(CHILD_ORJSON, path)
    rep = child(CHILD_REPLAY, path)
    return {"n_target": n, "patients": patients, "bytes": path.stat().st_size, "orjson": base, "replay": rep,
            "ratio": rep["seconds"] / base["seconds"], "obs_per_s": rep["observations"] / rep["seconds"]}


def render(results: list[dict]) -> str:
    rows = "\n".join(
        f"| {r['replay']['observations']:,} | {r['replay']['resources']:,} | {r['patients']:,} | {r['bytes'] / 1e6:,.0f} MB "
        f"| {r['orjson']['seconds']:.2f} s | {r['replay']['seconds']:.2f} s | {r['obs_per_s']:,.0f} | **{r['ratio']:.2f}×** "
        f"| {r['replay']['maxrss_kib'] / 1024:,.0f} MiB |"
        for r in results
    )
    return f"""## Replay (`make bench`)

Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}.

Input: `service.synthetic` NDJSON (mixed automated/manual CBC panels, DiagnosticReports, temperatures,
Patients, ~2 % noise), seed 7. *orjson* is `orjson.loads` over the same lines (file reading not
timed); *replay* is the whole `replay` run (read, decode, normalise, spill, panel, decide, write
events) in a fresh process. Targets (issue 2): ratio ≤ 3; peak RSS flat from 100 k to 1 M.

| Observations | resources | patients | file | orjson.loads | replay | Observations/s | ratio | replay peak RSS |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

Events at the largest size: `{json.dumps(results[-1]['replay']['events'])}`.
"""


def write_section(doc: Path, section: str) -> None:
    marker_start, marker_end = "<!-- replay-bench:start -->", "<!-- replay-bench:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nNumbers from `make bench`. Each section says when and where it was measured.\n"
    block = f"{marker_start}\n{section}{marker_end}\n"
    if marker_start in text:
        head, rest = text.split(marker_start, 1)
        text = head + block + rest.split(marker_end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--write", type=Path, help="update this Markdown file")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = [run_size(int(n), args.patients, args.workdir) for n in args.sizes.split(",")]
    section = render(results)
    print(section)
    if args.write:
        write_section(args.write, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
