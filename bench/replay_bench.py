"""`make bench`: replay throughput and memory on generated NDJSON, against a bare orjson parse.

Each measurement runs in its own child process so peak RSS belongs to that run alone. The replay
child's worker processes are its children: their peak RSS is the largest worker's, and the memory
of the whole process tree is sampled (sum of PSS, Linux only) while it runs. The SQLite engine
(`engine="sqlite"`, one process, the reference) is measured too, for comparison on the same machine
and moment. Figures go to docs/benchmarks.md (machine and date included). Numbers are measured,
never asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.synthetic import observations_target, write_ndjson  # noqa: E402 - after the sys.path line above

CHILD_REPLAY = """
import json, os, resource, sys, time
from service.config import load_settings
from service.replay.engine import Replay
s = load_settings(None)
t0 = time.perf_counter()
with Replay(s.rules, s.alerts, engine=sys.argv[2]) as r, open(os.devnull, "wb") as sink:
    stats = r.run([sys.argv[1]], sink)
elapsed = time.perf_counter() - t0
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": elapsed, "maxrss_kib": me.ru_maxrss, "workers_maxrss_kib": kids.ru_maxrss,
                  "cpu_seconds": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                  "observations": stats.observations, "resources": stats.resources, "events": dict(stats.events)}))
"""  # noqa: E501 - the child's code, kept as it runs

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
"""  # noqa: E501 - the child's code, kept as it runs


def child(code: str, path: Path, *args: str) -> dict:
    """Run `code` in a fresh interpreter; `pss_kib`: the largest sum of PSS over it and its
    children seen while it ran (sampled every 0.2 s; None where /proc cannot tell)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(path), *args],
            stdout=out,
            cwd=ROOT,
            env={**os.environ, "NEUTROWATCH_LOGGING__LEVEL": "warning"},
        )
        peak: int | None = None
        while proc.poll() is None:
            pss = _tree_pss_kib(proc.pid)
            if pss is not None:
                peak = max(peak or 0, pss)
            time.sleep(0.2)  # a sample costs ~1.5 ms of CPU: keep it from disturbing the run
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, proc.args)
        out.seek(0)
        result = json.loads(out.read().decode().strip().splitlines()[-1])
    result["pss_kib"] = peak
    return result


def _tree_pss_kib(pid: int) -> int | None:
    total, todo = 0, [pid]
    try:
        while todo:
            p = todo.pop()
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    except (OSError, ValueError):
        return None  # not Linux, or a process ended while being read
    return total


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
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}"
    )


def run_size(n: int, patients: int, workdir: Path, reference: bool = True, repeat: int = 1) -> dict:
    path = workdir / f"bench-{n}.ndjson"
    spec = observations_target(n, patients, seed=7)
    if not path.exists():
        t0 = time.perf_counter()
        write_ndjson(spec, path)
        print(f"generated {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    bases, reps = [], []
    for _ in range(repeat):  # alternated, so that a noisy moment does not favour one side
        bases.append(child(CHILD_ORJSON, path))
        reps.append(child(CHILD_REPLAY, path, "partitioned"))
    base, rep = _fastest(bases), _fastest(reps)
    ref = child(CHILD_REPLAY, path, "sqlite") if reference else None
    return {
        "n_target": n,
        "patients": patients,
        "bytes": path.stat().st_size,
        "orjson": base,
        "replay": rep,
        "ratio": rep["seconds"] / base["seconds"],
        "obs_per_s": rep["observations"] / rep["seconds"],
        "sqlite": ref,
    }


def _fastest(runs: list[dict]) -> dict:
    """The fastest run, with the highest memory peaks of all runs."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    for key in ("maxrss_kib", "workers_maxrss_kib", "pss_kib"):
        peaks = [r[key] for r in runs if r.get(key) is not None]
        if peaks:
            best[key] = max(peaks)
    best["all_seconds"] = [r["seconds"] for r in runs]
    return best


def _mib(kib: int | None) -> str:
    return f"{kib / 1024:,.0f} MiB" if kib else "n/a"


def render(results: list[dict], repeat: int = 1) -> str:
    rows = "\n".join(
        f"| {r['replay']['observations']:,} | {r['replay']['resources']:,} | {r['patients']:,} "
        f"| {r['bytes'] / 1e6:,.0f} MB "
        f"| {r['orjson']['seconds']:.2f} s | {r['replay']['seconds']:.2f} s | {r['obs_per_s']:,.0f} "
        f"| **{r['ratio']:.2f}×** "
        f"| {r['replay']['cpu_seconds']:.1f} s "
        f"| {_mib(r['replay']['maxrss_kib'])} | {_mib(r['replay']['workers_maxrss_kib'])} "
        f"| {_mib(r['replay']['pss_kib'])} |"
        for r in results
    )
    reference = "\n".join(
        f"| {r['sqlite']['observations']:,} | {r['sqlite']['seconds']:.2f} s "
        f"| {r['sqlite']['observations'] / r['sqlite']['seconds']:,.0f} "
        f"| {r['sqlite']['seconds'] / r['orjson']['seconds']:.2f}× "
        f"| {r['sqlite']['cpu_seconds']:.1f} s | {_mib(r['sqlite']['maxrss_kib'])} "
        f"| {_mib(r['sqlite']['pss_kib'])} |"
        for r in results
        if r["sqlite"]
    )
    if reference:
        reference = f"""
The SQLite engine (`engine="sqlite"`: one process; the reference the partitioned engine is tested
against, byte for byte), same inputs, same moment:

| Observations | replay | Observations/s | ratio | CPU | peak RSS | peak PSS |
|---:|---:|---:|---:|---:|---:|---:|
{reference}
"""
    return f"""## Replay (`make bench`)

Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}.

Input: `tests.synthetic` NDJSON (mixed automated/manual CBC panels, DiagnosticReports, temperatures,
Patients, ~2 % noise), seed 7. *orjson* is `orjson.loads` over the same lines (file reading not
timed); *replay* is the whole `replay` run (read, decode, normalise, spill, panel, decide, write
events) in a fresh process, with the default partitioned engine and its worker processes (one per
core). *CPU* is user + system time of all its processes. Peak RSS: the replay process, and the
largest worker; peak PSS: all its processes together (shared pages counted once). Targets:
ratio ≤ 3; peak memory flat from 100 k to 1 M.

| Observations | resources | patients | file | orjson.loads | replay | Observations/s | ratio | CPU | peak RSS | worker peak RSS | peak PSS |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}
{_repeat_note(results, repeat)}{reference}
Events at the largest size: `{json.dumps(results[-1]["replay"]["events"])}`.
"""  # noqa: E501 - Markdown written as is: wrapping would change its bytes


def _repeat_note(results: list[dict], repeat: int) -> str:
    if repeat <= 1:
        return ""
    spread = "\n".join(
        f"- {r['replay']['observations']:,} Observations: "
        f"orjson {', '.join(f'{s:.2f}' for s in r['orjson']['all_seconds'])} s; "
        f"replay {', '.join(f'{s:.2f}' for s in r['replay']['all_seconds'])} s"
        for r in results
    )
    return (
        f"\norjson and replay were each run {repeat} times, alternately; the table shows the fastest run of "
        f"each (memory: the highest peak of all runs). All runs:\n\n{spread}\n"
    )


def write_section(doc: Path, section: str, name: str = "replay-bench") -> None:
    """Replace the section between `<!-- name:start -->` and `<!-- name:end -->`, else append it
    (every bench writes its own section of docs/benchmarks.md this way)."""
    marker_start, marker_end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = (
        doc.read_text()
        if doc.exists()
        else "# Benchmarks\n\nNumbers from `make bench`. Each section says when and where it was measured.\n"
    )
    block = f"{marker_start}\n{section}{marker_end}\n"
    if marker_start in text:
        head, rest = text.split(marker_start, 1)
        tail = rest.split(marker_end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
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
    ap.add_argument("--no-reference", action="store_true", help="skip the SQLite engine")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of orjson and replay per size (the fastest is shown)"
    )
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = [
        run_size(int(n), args.patients, args.workdir, not args.no_reference, args.repeat)
        for n in args.sizes.split(",")
    ]
    section = render(results, args.repeat)
    print(section)
    if args.write:
        write_section(args.write, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
