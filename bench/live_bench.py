"""`make bench`, live part: the service against the real FHIR test engine (tests/fhir_server).

1. Backlog drain: ~N monitored Observations already on the server. A bare paging client
   (`FhirClient.search` over every page, nothing else) against one `Worker.run_cycle()` from an
   empty SQLite state, same search and page size; two rounds, order alternated, data re-staged.
2. Alert latency: the real process (`python -m service run`, poll interval 2 s) over a background
   population; at seeded random moments a new patient's neutropenic panel is PUT and
   `Flag?subject=Patient/<id>` polled every 50 ms until the Flag is there. SIGTERM at the end.

Every wait has a deadline. Figures go to docs/benchmarks.md between the live-bench markers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.replay_bench import machine, write_section  # noqa: E402 - after the sys.path line above
from service import logging as nw_logging  # noqa: E402 - after the sys.path line above
from service.fhir.client import FhirClient  # noqa: E402 - after the sys.path line above
from service.fhir.fhirtime import from_epoch_us  # noqa: E402 - after the sys.path line above
from service.live.search import pages_since, search_params  # noqa: E402 - after the sys.path line above
from service.live.store.sqlite import SqliteStore  # noqa: E402 - after the sys.path line above
from service.live.worker import Worker  # noqa: E402 - after the sys.path line above
from tests.fhir_server.engine import FhirEngine  # noqa: E402 - after the sys.path line above
from tests.fhir_server.load import put_all  # noqa: E402 - after the sys.path line above
from tests.integration.live import settings_for  # noqa: E402 - after the sys.path line above
from tests.synthetic import PopulationSpec, generate, observations_target  # noqa: E402 - after sys.path

INTERVAL, POLL_FLAG, TRIAL_TIMEOUT, READY_TIMEOUT = 2.0, 0.05, 30.0, 90.0


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (Linux /proc, else 0): less disturbed by other load."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(
        urllib.request.Request(url, headers={"Accept": "application/fhir+json"}), timeout=timeout
    ) as r:
        return r.read()


# -- 1. backlog drain ---------------------------------------------------------------------------------


async def bare_drain(settings) -> dict:
    async with FhirClient(settings.fhir) as client:
        marks, n, stamps = [time.perf_counter()], 0, []
        params, since_us = search_params(settings, None, time.time())
        async for page in pages_since(client, "Observation", params, since_us):
            marks.append(time.perf_counter())
            n += len(page.resources)
            stamps.append(page.resources[0].meta.lastUpdated if page.resources else None)
    per_page = [b - a for a, b in itertools.pairwise(marks)]
    return {
        "seconds": marks[-1] - marks[0],
        "pages": len(per_page),
        "observations": n,
        "per_page": per_page,
        "stamps": stamps,
    }


def kind_of(method: str, url: str) -> str:
    last = urllib.parse.urlsplit(url).path.rstrip("/").split("/")[-1]
    if method == "GET" and last == "Observation":
        return "temperatures" if "subject=" in url else "pages"
    return "writes" if method == "POST" or last == "Flag" else "look-ups"


async def service_drain(settings) -> dict:
    store, http, calls = SqliteStore(settings.store.path), defaultdict(float), defaultdict(int)
    await store.open()
    try:
        async with FhirClient(settings.fhir) as client:
            transport = client._transport  # noqa: SLF001 - its requests wrapped to time them, not changed
            request = transport.request

            async def timed(method, url, **kw):
                t = time.perf_counter()
                kind = kind_of(method, url)
                calls[kind] += 1
                try:
                    return await request(method, url, **kw)
                finally:
                    http[kind] += time.perf_counter() - t

            transport.request = timed  # type: ignore[method-assign]  # wrapped to time it, not changed
            t0 = time.perf_counter()
            report = await Worker(settings, client, store).run_cycle()
            seconds = time.perf_counter() - t0
        stored = (await store.counts())["results"]
    finally:
        await store.close()
    return {
        "seconds": seconds,
        "observations": report.observations,
        "stored": stored,
        "panels": report.panels_assessed,
        "written": report.written,
        "events": report.events,
        "http": defaultdict(float, http),
        "calls": dict(calls),
        "temperature_searches": getattr(report, "temperature_searches", 0),
    }


def first_page(base: str, settings, since: str | None = None, count: int | None = None) -> tuple[int, float]:
    """(matches, median of 3 timings) of the drain search's first page, maybe from a later
    `_lastUpdated` or with another `_count`."""
    base_params, since_us = search_params(settings, None, time.time())
    params = dict(base_params) | {"_lastUpdated": "ge" + (since or from_epoch_us(since_us))}
    params.update({"_count": str(count)} if count else {})
    url, times = f"{base}/Observation?" + urllib.parse.urlencode(params), []
    for _ in range(3):
        t = time.perf_counter()
        total = json.loads(get(url))["total"]
        times.append(time.perf_counter() - t)
    return total, statistics.median(times)


def drain(engine: FhirEngine, args, work: Path) -> dict:
    spec = observations_target(
        args.observations, args.patients, seed=7, base=PopulationSpec(temperatures=False, corrections=0.0)
    )
    population = list(generate(spec))
    settings = settings_for(engine.base_url, work / "drain.sqlite3", page_size=args.page_size)
    rounds, probe, n = [], [], len(population)
    for i, order in enumerate((("bare", "service"), ("service", "bare"))):
        engine.reset()
        if i == 0:  # staged in quarters: page cost against the data held
            for q in range(4):
                put_all(engine.base_url, population[q * n // 4 : (q + 1) * n // 4])
                probe.append((None, args.page_size, *first_page(engine.base_url, settings)))
        else:
            put_all(engine.base_url, population)
        runs = {"order": order}
        for kind in order:
            print(f"drain round {i + 1}: {kind}", file=sys.stderr)
            s = settings.model_copy(
                update={"store": settings.store.model_copy(update={"path": work / f"drain{i}.sqlite3"})}
            )
            engine_cpu, own_cpu = cpu_seconds(engine.pid), time.process_time()
            runs[kind] = asyncio.run(bare_drain(s) if kind == "bare" else service_drain(s))
            runs[kind] |= {
                "engine_cpu": cpu_seconds(engine.pid) - engine_cpu,
                "own_cpu": time.process_time() - own_cpu,
            }
        rounds.append(runs)
    held = rounds[1]["bare"]["observations"]  # all held: another page size, fewer matches (later cut-offs)
    probe.append((held, 200, *first_page(engine.base_url, settings, count=200)))
    stamps = rounds[1]["bare"]["stamps"]
    for since in dict.fromkeys((stamps[len(stamps) // 2], stamps[-max(1, len(stamps) // 10)])):
        probe.append((held, args.page_size, *first_page(engine.base_url, settings, since=since)))
    return {"spec": spec, "resources": n, "page_size": args.page_size, "rounds": rounds, "probe": probe}


# -- 2. alert latency ---------------------------------------------------------------------------------


def service_get(port: int, path: str) -> str | None:
    try:
        return get(f"http://127.0.0.1:{port}{path}", timeout=5).decode()
    except OSError:  # not up yet, or 503 not ready
        return None


def poll_seconds(port: int) -> tuple[float, float]:
    """(sum, count) of the service's own poll-cycle duration histogram."""
    lines = (service_get(port, "/metrics") or "").splitlines()

    def value(key: str) -> float:
        return next(
            (float(x.split()[1]) for x in lines if x.startswith(f"neutrowatch_poll_duration_seconds_{key} ")),
            0.0,
        )

    return value("sum"), value("count")


def open_episodes(path: Path) -> int | None:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM episodes WHERE open = 1").fetchone()[0])
    except sqlite3.Error:
        return None  # a store without that column


def panel(pid: str, anc: float) -> list[dict]:
    """A new patient's CBC: WBC and ANC (10*3/uL), one Specimen, effective now."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    lab = [
        {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}
            ]
        }
    ]
    unit = {"unit": "10*3/uL", "system": "http://unitsofmeasure.org", "code": "10*3/uL"}
    obs = lambda code, value: {  # noqa: E731 - a one-line local helper
        "resourceType": "Observation",
        "id": f"{pid}-{code}",
        "status": "final",
        "category": lab,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": now,
        "issued": now,
        "specimen": {"reference": f"Specimen/{pid}-sp"},
        "valueQuantity": {"value": value, **unit},
    }
    return [{"resourceType": "Patient", "id": pid}, obs("6690-2", round(anc / 0.6, 2)), obs("751-8", anc)]


def latency(engine: FhirEngine, args, work: Path) -> dict:
    # Background: a population whose timeline ended two days ago, staged with its own lastUpdated:
    # the first cycle drains it, and the overlap window afterwards holds only what the trials write.
    engine.reset()
    days = 28
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=days + 2)
    bg = list(
        generate(
            PopulationSpec(
                patients=args.background, days=days, seed=11, start=start, temperatures=False, corrections=0.0
            )
        )
    )
    put_all(engine.base_url, bg, keep_meta=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = settings_for(
        engine.base_url,
        work / "live.sqlite3",
        interval_seconds=INTERVAL,
        initial_lookback_hours=(days + 3) * 24,
    )
    data = settings.model_dump(mode="json", exclude_none=True)
    data["web"]["port"] = port
    (work / "live.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "NEUTROWATCH_LOGGING__FORMAT": "json", "NEUTROWATCH_LOGGING__LEVEL": "warning"}
    log_path = work / "service.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--config", str(work / "live.yaml")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    rng, trials = random.Random(args.seed), []
    try:
        t0 = time.monotonic()
        while service_get(port, "/readyz") is None:
            if proc.poll() is not None or time.monotonic() - t0 > READY_TIMEOUT:
                raise RuntimeError(f"service not ready:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        ready_s, before = time.monotonic() - t0, poll_seconds(port)
        for i in range(args.alerts):
            time.sleep(rng.uniform(0, 2 * INTERVAL))
            pid, t, found = f"lb-{args.seed}-{i:02d}", time.monotonic(), None
            put_all(engine.base_url, panel(pid, anc=round(rng.uniform(0.1, 0.45), 2)))
            while found is None and time.monotonic() - t < TRIAL_TIMEOUT:
                if json.loads(get(f"{engine.base_url}/Flag?subject=Patient/{pid}")).get("entry"):
                    found = time.monotonic() - t
                else:
                    time.sleep(POLL_FLAG)
            after = poll_seconds(port)
            cycle = (after[0] - before[0]) / (after[1] - before[1]) if after[1] > before[1] else None
            trials.append({"latency_s": found, "cycle_s": cycle})
            before = after
            print(f"alert {i + 1}: latency {found} s, mean cycle {cycle} s", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = f"none (killed after 20 s; code {proc.wait()})"
    lines = log_path.read_text().splitlines()
    return {
        "bg_resources": len(bg),
        "bg_obs": sum(r["resourceType"] == "Observation" for r in bg),
        "ready_s": ready_s,
        "page_size": settings.fhir.page_size,
        "trials": trials,
        "exit_code": exit_code,
        "open_episodes": open_episodes(work / "live.sqlite3"),
        "skipped": sum("skipped: maximum number of running instances" in x for x in lines),
        "plain": sum(not x.startswith("{") for x in lines),
    }


# -- report -------------------------------------------------------------------------------------------


def render(d: dict, lat: dict, load: tuple) -> str:
    walls, parts = [], []
    for i, r in enumerate(d["rounds"], 1):
        b, s, h = r["bare"], r["service"], r["service"]["http"]
        cpu_b, cpu_s = b["engine_cpu"] + b["own_cpu"], s["engine_cpu"] + s["own_cpu"]
        walls.append(
            f"| {i} ({' then '.join(r['order'])}) | {b['pages']} | {b['observations']:,} "
            f"| {b['seconds']:.1f} s "
            f"| {s['seconds']:.1f} s | **{s['seconds'] / b['seconds']:.2f}×** "
            f"| {b['engine_cpu']:.1f} + {b['own_cpu']:.1f} s "
            f"| {s['engine_cpu']:.1f} + {s['own_cpu']:.1f} s | **{cpu_s / cpu_b:.2f}×** |"
        )
        c = s.get("calls", {})
        per_alert = c.get("writes", 0) / s["written"] if s["written"] else 0.0
        parts.append(
            f"| {i} | {h['pages']:.1f} s | {s['temperature_searches']} in {h['temperatures']:.1f} s "
            f"| {h['look-ups']:.1f} s "
            f"| {h['writes']:.1f} s | {s['seconds'] - sum(h.values()):.1f} s | {s['panels']:,} "
            f"| {s['written']:,} "
            f"| {sum(c.values()):,} | {per_alert:.2f} |"
        )
    s0, spec = d["rounds"][0]["service"], d["spec"]
    ms = lambda xs: f"{statistics.median(xs) * 1000:,.0f} ms"  # noqa: E731 - a one-line local helper
    pages = "; ".join(
        f"round {i}: first 5 pages {ms(r['bare']['per_page'][:5])}, last 5 {ms(r['bare']['per_page'][-5:])}"
        for i, r in enumerate(d["rounds"], 1)
    )
    probe = "\n".join(
        f"| {held or m:,} | {m:,} | {count} | {t * 1000:,.0f} ms |" for held, count, m, t in d["probe"]
    )
    got = [t["latency_s"] for t in lat["trials"] if t["latency_s"] is not None]
    summary = (
        f"min **{min(got):.2f} s**, median **{statistics.median(got):.2f} s**, max **{max(got):.2f} s**"
        if got
        else "no Flag appeared"
    ) + (
        f"; {len(lat['trials']) - len(got)} without a Flag after {TRIAL_TIMEOUT:.0f} s"
        if len(got) < len(lat["trials"])
        else ""
    )
    fmt = lambda v: "—" if v is None else f"{v:.2f} s"  # noqa: E731 - a one-line local helper
    trials = "\n".join(
        f"| {i} | {fmt(t['latency_s'])} | {fmt(t['cycle_s'])} |" for i, t in enumerate(lat["trials"], 1)
    )
    avg = lambda la: " / ".join(f"{x:.1f}" for x in la)  # noqa: E731 - a one-line local helper
    return f"""## Live loop (`make bench`)

Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; code {d["revision"]}; load average
(1/5/15 min) {avg(load[0])} before, {avg(load[1])} after. FHIR server: the test engine
(`tests/fhir_server`: Medplum FhirRouter + MemoryRepository, in memory, on the same machine).

**Backlog drain.** A `tests.synthetic` population without temperatures or corrections
({spec.patients} patients, {spec.days} days, seed 7; {d["resources"]:,} resources, every Observation a
monitored CBC code), staged with `put_all`. *bare*: the service's own paging
(`search.pages_since`: keyset restarts from the newest lastUpdated, next links on ties) over every
page, nothing else. *service*: one
`Worker.run_cycle()` from an empty SQLite state, settings of `tests/integration/live.py`, same page
size ({d["page_size"]}: the largest that keeps a page and its DiagnosticReports within the
engine's 1,000 results). Data re-staged before each round, order alternated.
Wall time, and CPU time (engine + this process), which other load on the machine disturbs less.
Target: service/bare ≤ 1.2×.

| round | pages | Observations | bare | service | ratio | CPU bare (engine + client) | CPU service | CPU ratio |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(walls)}

Where the service's wall time went: its Observation pages, its per-patient temperature searches
(`poll.temperatures: open-episodes`), patient-context and recipient look-ups, alert writes
(transactions, Flag reads), and local work (intake, SQLite, decisions). *Requests*: every request the
cycle made; *per alert*: write requests (Flag + Communication Bundle, Provenance, Flag reads) per alert
written.

| round | CBC pages | temperature searches | look-ups | alert writes | local | panels | alerts written | requests | per alert |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(parts)}

Round 1 events: `{json.dumps(s0["events"])}`; SQLite `results` rows: {s0["stored"]:,}.

Every request costs the engine a full search: it tests every stored Observation, clones and sorts
all matches, then slices one page. So a page costs about the same early and late in a drain
({pages}), and the cost grows with the Observations held (and, less, matched), not with the
page size. First page of the drain's search:

| Observations held | matches | `_count` | first page (median of 3) |
|---:|---:|---:|---:|
{probe}

**Alert latency.** The real process (`python -m service run`, poll interval {INTERVAL:.0f} s, page size
{lat["page_size"]}, other settings as in `tests/integration/live.py`) over a background of
{lat["bg_obs"]:,} Observations ({lat["bg_resources"]:,} resources, their own `lastUpdated` up to two days old,
drained by the first cycle; ready after {lat["ready_s"]:.1f} s). {len(lat["trials"])} times, after a
seeded random pause of 0–{2 * INTERVAL:.0f} s, a new patient's panel (WBC 6690-2 and ANC 751-8
0.10–0.45 10*3/uL, one Specimen, effective now) is PUT in one batch, then `GET Flag?subject=Patient/<id>`
every {POLL_FLAG * 1000:.0f} ms; latency runs from just before the PUT to the first answer holding the
Flag. Mean cycle: the service's `neutrowatch_poll_duration_seconds` over the cycles since the
previous trial. Target: ≤ poll interval + 1 s = {INTERVAL + 1:.0f} s.

| trial | latency | mean cycle |
|---:|---:|---:|
{trials}

Latency: {summary}. Open episodes in the service's state at the end: {lat["open_episodes"]}.
SIGTERM at the end: exit code {lat["exit_code"]}. Scheduled cycles skipped because the previous one
was still running: {lat["skipped"]} (the service's JSON log held {lat["plain"]} plain-text lines).
"""  # noqa: E501 - Markdown written as is: wrapping would change its bytes


def revision() -> str:
    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD")
    dirty = " plus uncommitted changes in service/" if git("status", "--porcelain", "--", "service") else ""
    return f"`{rev}`{dirty}" if rev else "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--observations", type=int, default=20_000, help="backlog size (monitored Observations)")
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument(
        "--page-size",
        type=int,
        default=500,
        help="drain page size (the largest that keeps a page and its DiagnosticReports within the "
        "engine's 1,000 results; every page costs this engine a full search, so the service default "
        "200 takes longer)",
    )
    ap.add_argument(
        "--background", type=int, default=60, help="patients on the server during the latency test"
    )
    ap.add_argument("--alerts", type=int, default=10)
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--write", type=Path, help="update this Markdown file")
    ap.add_argument("--revision", help="what code is measured (default: from git)")
    args = ap.parse_args()
    nw_logging.configure("error", "console")  # the drain's (expected) rejections would flood the output
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="live-bench-") as tmp, FhirEngine() as engine:
        d = drain(engine, args, Path(tmp)) | {"revision": args.revision or revision()}
        lat = latency(engine, args, Path(tmp))
    section = render(d, lat, (load_before, os.getloadavg()))
    print(section)
    if args.write:
        write_section(args.write, section, "live-bench")
    return 0 if lat["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
