"""State-store benchmark: SqliteStore against PostgresStore, driven the way the worker drives them.

Each run is a child process: it generates a `tests.synthetic` population (~20 000 monitored
Observations, seed 7) and converts it, untimed, with `worker.intake` (non-Intake results skipped); then,
on a fresh store (a new SQLite file in a temporary directory; a new PostgreSQL schema `nwbench_<random>`,
dropped afterwards):

1. ingest: pages of 200 through `store.ingest(items, now)`, `now` a float clock (+1 s a page); each new
   rejected version gets `record_decision` as `Worker._ingest` does;
2. decide + commit: rounds of `dirty_panels()` -> `load_states()` -> `clinical.panels.decide` (rules of
   `Settings()`, default patient context) -> `Decided` (the decision records of service/output/events.py,
   and a stand-in outbox write per event) -> `commit()`, until no panel is dirty (a backlog
   drain: `Worker._decide` takes every ready panel at once, so one round does the work);
3. outbox: `pending_outbox(500)`, then `check_leader()` and `mark_sent()` for each entry, one at a time,
   until none is pending (`Worker.deliver` without the HTTP).

Per phase: wall seconds, the process's CPU seconds and Observations/s; per store method: calls and
seconds; peak RSS of the run's process (VmHWM, reset once the population is converted); for
PostgreSQL, the client's socket writes. Median of the repeats (3), backends alternated. Both backends
must log the same decision records in the same order (`decisions()`) and end with the same table
counts, or the script fails. With --write, the section goes to
docs/benchmarks.md between the store-bench markers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.live_bench import revision  # noqa: E402 - after the sys.path line above
from bench.replay_bench import machine, write_section  # noqa: E402 - after the sys.path line above
from service import logging as nw_logging  # noqa: E402 - after the sys.path line above
from service.config import Settings  # noqa: E402 - after the sys.path line above
from service.core.anc import is_complete  # noqa: E402 - after the sys.path line above
from service.core.episodes import AlertEvent, PatientState  # noqa: E402 - after the sys.path line above
from service.core.grading import Scheme  # noqa: E402 - after the sys.path line above
from service.core.observations import Rejected  # noqa: E402 - after the sys.path line above
from service.core.panels import PanelDecision, decide  # noqa: E402 - after the sys.path line above
from service.fhir import model  # noqa: E402 - after the sys.path line above
from service.live.store.base import Decided, Intake, PanelWork  # noqa: E402 - after the sys.path line above
from service.live.store.postgres import PostgresStore  # noqa: E402 - after the sys.path line above
from service.live.store.sqlite import SqliteStore  # noqa: E402 - after the sys.path line above
from service.live.worker import intake  # noqa: E402 - after the sys.path line above
from service.output.events import (  # noqa: E402 - after the sys.path line above
    event_record,
    not_assessed_record,
    panel_rejected_record,
    rejected_record,
)
from service.output.transaction import Delivery, OutboxWrites, StoredRecord  # noqa: E402 - after sys.path
from tests.synthetic import generate, observations_target  # noqa: E402 - after the sys.path line above

HEADING = "## State store: SQLite vs PostgreSQL"
PHASES = ("ingest", "decide+commit", "outbox")
BACKENDS = ("sqlite", "postgres")
CLOCK0 = 1_800_000_000.0  # the float clock handed to ingest (seconds)
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
CHILD_TIMEOUT = 120.0  # seconds for one backend run


# -- population ---------------------------------------------------------------------------------------


def population(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = observations_target(args.observations, args.patients, seed=args.seed)
    items: list[Intake] = []
    kinds: Counter[str] = Counter()
    for resource in generate(spec):
        kinds[resource["resourceType"]] += 1
        if resource["resourceType"] != "Observation":
            continue
        item = intake(msgspec.convert(resource, model.Resource))
        if isinstance(item, Intake):
            items.append(item)
        else:
            kinds["skipped (" + type(item).__name__ + ")"] += 1
    return {
        "spec": spec,
        "items": items,
        "kinds": kinds,
        "rejected": sum(isinstance(i.outcome, Rejected) for i in items),
        "seconds": time.perf_counter() - t0,
    }


# -- measurement helpers ------------------------------------------------------------------------------


def vm_hwm_kib() -> int:
    m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def vm_rss_kib() -> int:
    m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so each run has its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class SocketWrites:
    """Counts the writes of asyncio socket transports: asyncpg sends a statement (or the pending
    messages of a pipelined executemany) with one write/writelines."""

    def __init__(self) -> None:
        self.n = 0
        from asyncio import selector_events

        self.cls = selector_events._SelectorSocketTransport  # noqa: SLF001 - counted, not changed
        self.saved = (self.cls.write, self.cls.writelines)

    def __enter__(self) -> SocketWrites:
        write, writelines = self.saved
        counter = self

        def counted_write(transport: Any, data: Any) -> None:
            counter.n += 1
            write(transport, data)

        def counted_writelines(transport: Any, lines: Any) -> None:
            counter.n += 1
            writelines(transport, lines)

        self.cls.write, self.cls.writelines = counted_write, counted_writelines
        return self

    def __exit__(self, *exc: object) -> None:
        self.cls.write, self.cls.writelines = self.saved


class Timed:
    """Wraps a store: per-method calls, wall seconds and socket writes."""

    def __init__(self, store: Any, writes: SocketWrites | None):
        self.store, self.writes = store, writes
        self.calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.store, name)

        async def timed(*a: Any, **kw: Any) -> Any:
            w0, t0 = self.writes.n if self.writes else 0, time.perf_counter()
            try:
                return await method(*a, **kw)
            finally:
                c = self.calls[name]
                c[0] += 1
                c[1] += time.perf_counter() - t0
                c[2] += (self.writes.n if self.writes else 0) - w0

        return timed


# -- the run ------------------------------------------------------------------------------------------


def outbox_write(event: AlertEvent) -> OutboxWrites:
    """A stand-in for the alert's writes (the store keeps them whole; their content is not measured)."""
    key = f"{event.episode}:{event.kind.value}:{event.band.rank}:{event.revision}"
    return OutboxWrites(
        event=event.kind.value,
        flag={},
        communication=None,
        flag_identifier=("urn:neutrowatch:episode", event.episode),
        communication_identifier=("urn:neutrowatch:alert", key),
    )


def decision_records(
    work: PanelWork, d: PanelDecision, stats: Counter[str], scheme: Scheme
) -> list[StoredRecord]:
    """The records of one panel's decision (rejection, not assessed, events), counting its events."""
    records: list[StoredRecord] = []
    if d.rejection is not None:
        records.append((panel_rejected_record(d.rejection, work.results), None))
    if d.not_assessed is not None:
        records.append((not_assessed_record(d.not_assessed), None))
    for event in d.events:
        records.append((event_record(event, scheme), outbox_write(event)))
        stats["event " + event.kind.value] += 1
    return records


async def drive(
    store: Any, items: list[Intake], page_size: int, settings: Settings, writes: SocketWrites | None
) -> dict:
    rules, settle = settings.rules, settings.poll.settle_seconds
    s = Timed(store, writes)
    phases: dict[str, dict[str, float]] = {}
    stats: Counter[str] = Counter()

    def phase(name: str, t0: float, c0: float, w0: int) -> None:
        phases[name] = {
            "wall": time.perf_counter() - t0,
            "cpu": time.process_time() - c0,
            "writes": (writes.n if writes else 0) - w0,
        }

    # 1. ingest ----------------------------------------------------------------------------------
    t0, c0, w0 = time.perf_counter(), time.process_time(), writes.n if writes else 0
    now = CLOCK0
    for start in range(0, len(items), page_size):
        now += 1.0
        page = items[start : start + page_size]
        new = await s.ingest(page, now)
        stats["pages"] += 1
        stats["new versions"] += len(new)
        for item in new:
            if isinstance(item.outcome, Rejected):  # Worker._rejected
                await s.record_decision(rejected_record(item.outcome))
    phase("ingest", t0, c0, w0)

    # 2. decide + commit --------------------------------------------------------------------------
    t0, c0, w0 = time.perf_counter(), time.process_time(), writes.n if writes else 0
    now += settle + 1.0  # the drain is over and the settle time has passed: every dirty panel is ready
    decide_s = 0.0
    committed: list[Decided] = []
    while True:
        ready = [w for w in await s.dirty_panels() if is_complete(w.results) or now - w.changed_at >= settle]
        if not ready:
            break
        stats["rounds"] += 1
        states = await s.load_states([w.patient for w in ready])
        t_dec = time.perf_counter()
        decided: list[Decided] = []
        for work in ready:
            d = decide(
                states.get(work.patient, PatientState()), work.patient, work.panel, work.results, rules
            )
            states[work.patient] = d.state
            records = decision_records(work, d, stats, rules.scheme)
            stats["panels"] += 1
            stats["assessed"] += d.assessed
            decided.append(Decided(work.patient, work.panel, d.state, records))
        decide_s += time.perf_counter() - t_dec
        await s.commit(decided)
        committed.extend(decided)
    phase("decide+commit", t0, c0, w0)
    phases["decide+commit"]["decide (pure Python)"] = decide_s
    # Untimed: what commit() had to write. Each Decided carries its patient's whole state, and the
    # stores upsert every one of them; only the last state of each patient survives the commit.
    last = {d.patient: d for d in committed}
    stats["decided rows"] = len(committed)
    stats["patients"] = len(last)
    stats["most rows of one patient"] = max(Counter(d.patient for d in committed).values(), default=0)
    stats["state bytes"] = sum(len(msgspec.json.encode(d.state)) for d in committed)
    stats["state bytes, last per patient"] = sum(len(msgspec.json.encode(d.state)) for d in last.values())

    # 3. outbox -----------------------------------------------------------------------------------
    t0, c0, w0 = time.perf_counter(), time.process_time(), writes.n if writes else 0
    while entries := await s.pending_outbox(500):
        for entry in entries:
            await s.check_leader()
            await s.mark_sent(entry.id, Delivery(["201 Created"], [f"Flag/{entry.id}"], {}))
            stats["sent"] += 1
    phase("outbox", t0, c0, w0)

    return {
        "phases": phases,
        "calls": {k: tuple(v) for k, v in s.calls.items()},
        "stats": stats,
        "decisions": [msgspec.to_builtins(d) for d in await store.decisions()],
        "counts": await store.counts(),
        "pending": await store.outbox_pending_count(),
    }


async def run_backend(
    backend: str, items: list[Intake], args: argparse.Namespace, settings: Settings
) -> dict:
    gc.collect()
    base_rss = vm_rss_kib()
    peak_reset = reset_peak()
    t0 = time.perf_counter()
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
            store = SqliteStore(Path(tmp) / "state.sqlite3")
            await store.open()
            try:
                if not await store.lead():  # the stores fence every write to the leader
                    raise SystemExit("no leadership on a fresh SQLite file")
                out = await drive(store, items, args.page_size, settings, None)
            finally:
                await store.close()
            out["file_mib"] = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
    else:
        schema = "nwbench_" + secrets.token_hex(4)
        store = PostgresStore(args.dsn, schema=schema)
        try:
            with SocketWrites() as writes:
                await store.open()
                if not await store.lead():
                    raise SystemExit(f"no leadership on the fresh schema {schema}")
                out = await drive(store, items, args.page_size, settings, writes)
        finally:
            await store.close()
            conn = await asyncpg.connect(args.dsn)
            try:
                out_size = await conn.fetchval(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
                    schema,
                )
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
        out["file_mib"] = out_size / 2**20
    out["total"] = time.perf_counter() - t0
    out["peak_rss_kib"] = vm_hwm_kib() if peak_reset else None
    out["base_rss_kib"] = base_rss
    return out


async def pg_facts(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SHOW server_version")
        settings = {
            k: await conn.fetchval(f"SHOW {k}") for k in ("synchronous_commit", "fsync", "shared_buffers")
        }
        rtts = []
        for _ in range(200):
            t = time.perf_counter()
            await conn.fetchval("SELECT 1")
            rtts.append(time.perf_counter() - t)
    finally:
        await conn.close()
    return {"version": version, "settings": settings, "rtt_ms": statistics.median(rtts) * 1000}


def check_equivalent(runs: dict[str, dict], repeat: int) -> None:
    a, b = runs["sqlite"], runs["postgres"]
    if a["decisions"] != b["decisions"]:
        first = next(
            (i for i, (x, y) in enumerate(zip(a["decisions"], b["decisions"], strict=False)) if x != y),
            min(len(a["decisions"]), len(b["decisions"])),
        )
        raise SystemExit(
            f"repeat {repeat}: decision logs differ (sqlite {len(a['decisions'])}, postgres "
            f"{len(b['decisions'])} records; first difference at #{first}:\n"
            f"  sqlite:   {a['decisions'][first] if first < len(a['decisions']) else None}\n"
            f"  postgres: {b['decisions'][first] if first < len(b['decisions']) else None})"
        )
    if a["counts"] != b["counts"] or a["stats"] != b["stats"] or a["pending"] or b["pending"]:
        raise SystemExit(
            f"repeat {repeat}: stores disagree: counts {a['counts']} vs {b['counts']}, "
            f"stats {dict(a['stats'])} vs {dict(b['stats'])}, pending {a['pending']}/{b['pending']}"
        )


# -- report -------------------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def summarise(runs: list[dict[str, dict]], n_obs: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for backend in BACKENDS:
        rs = [r[backend] for r in runs]
        ph = {p: {k: med([r["phases"][p][k] for r in rs]) for k in rs[0]["phases"][p]} for p in PHASES}
        calls = {
            m: (
                rs[0]["calls"][m][0],
                med([r["calls"][m][1] for r in rs]),
                med([r["calls"][m][2] for r in rs]),
            )
            for m in rs[0]["calls"]
        }
        out[backend] = {
            "phases": ph,
            "calls": calls,
            "total": med([r["total"] for r in rs]),
            "timed": med([sum(r["phases"][p]["wall"] for p in PHASES) for r in rs]),
            "walls": {p: [r["phases"][p]["wall"] for r in rs] for p in PHASES},
            "peak_rss_mib": med([r["peak_rss_kib"] / 1024 for r in rs]) if rs[0]["peak_rss_kib"] else None,
            "base_rss_mib": med([r["base_rss_kib"] / 1024 for r in rs]),
            "size_mib": med([r["file_mib"] for r in rs]),
            "stats": rs[0]["stats"],
            "counts": rs[0]["counts"],
        }
    out["n_obs"] = n_obs  # type: ignore[assignment]  # the summary's one int
    return out


def table(s: dict, n_obs: int) -> str:
    rate = lambda sec: f"{n_obs / sec:,.0f}" if sec else "—"  # noqa: E731 - a one-line local helper
    rows = []
    for p in PHASES:
        a, b = s["sqlite"]["phases"][p], s["postgres"]["phases"][p]
        rows.append(
            f"| {p} | {a['wall']:.2f} s | {a['cpu']:.2f} s | {rate(a['wall'])} "
            f"| {b['wall']:.2f} s | {b['cpu']:.2f} s "
            f"| {rate(b['wall'])} | **{b['wall'] / a['wall']:.1f}×** |"
        )
    a, b = s["sqlite"]["timed"], s["postgres"]["timed"]
    cpu = {k: sum(s[k]["phases"][p]["cpu"] for p in PHASES) for k in BACKENDS}
    rows.append(
        f"| **all three** | **{a:.2f} s** | {cpu['sqlite']:.2f} s | **{rate(a)}** | **{b:.2f} s** "
        f"| {cpu['postgres']:.2f} s | **{rate(b)}** | **{b / a:.1f}×** |"
    )
    ra, rb = s["sqlite"]["peak_rss_mib"], s["postgres"]["peak_rss_mib"]
    if ra is not None:
        rows.append(f"| peak RSS (run's process) | {ra:,.0f} MiB | | | {rb:,.0f} MiB | | | |")
    head = (
        "| phase | SQLite wall | CPU | Obs/s | PostgreSQL wall | CPU (this process) | Obs/s | PG / SQLite |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    return head + "\n" + "\n".join(rows)


def method_table(s: dict) -> str:
    order = [
        "ingest",
        "record_decision",
        "dirty_panels",
        "load_states",
        "commit",
        "pending_outbox",
        "check_leader",
        "mark_sent",
    ]
    rows = []
    for m in order:
        if m not in s["sqlite"]["calls"]:
            continue
        n, ta, _ = s["sqlite"]["calls"][m]
        _, tb, wb = s["postgres"]["calls"][m]
        rows.append(
            f"| `{m}` | {n:,} | {ta:.2f} s | {ta / n * 1e3:.3f} ms | {tb:.2f} s | {tb / n * 1e3:.3f} ms "
            f"| {wb / n:.1f} |"
        )
    return (
        "| method | calls | SQLite | per call | PostgreSQL | per call | PG socket writes per call |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )


def render(
    args: argparse.Namespace,
    pop: dict,
    s: dict,
    pg: dict,
    rev: str,
    elapsed: float,
    load: tuple,
    began: datetime,
) -> str:
    n_obs, st = pop["items"], s["sqlite"]["stats"]
    a, b = s["sqlite"], s["postgres"]
    pages = st["pages"]
    events = ", ".join(f"{k.split(' ', 1)[1]} {v:,}" for k, v in sorted(st.items()) if k.startswith("event "))
    avg = lambda la: " / ".join(f"{x:.1f}" for x in la)  # noqa: E731 - a one-line local helper

    def spread(backend, p):
        return " / ".join(f"{x:.2f}" for x in s[backend]["walls"][p])

    pc = lambda backend, m: s[backend]["calls"][m]  # noqa: E731 - a one-line local helper
    dominant = {k: max(PHASES, key=lambda p: s[k]["phases"][p]["wall"]) for k in BACKENDS}
    share = {k: s[k]["phases"][dominant[k]]["wall"] / s[k]["timed"] for k in BACKENDS}
    ing_w = pc("postgres", "ingest")[2] / pc("postgres", "ingest")[0]
    ms_b = pc("postgres", "mark_sent")[1] / pc("postgres", "mark_sent")[0] * 1e3
    ms_a = pc("sqlite", "mark_sent")[1] / pc("sqlite", "mark_sent")[0] * 1e3
    cl_b = pc("postgres", "check_leader")[1] / pc("postgres", "check_leader")[0] * 1e3
    dp_a, dp_b = pc("sqlite", "dirty_panels")[1], pc("postgres", "dirty_panels")[1]
    dec = a["phases"]["decide+commit"]["decide (pure Python)"]
    sent = st["sent"]
    rss = (
        f"Peak RSS of the run's process (VmHWM, reset just before the store is opened; it includes the "
        f"converted population, ~{a['base_rss_mib']:,.0f} MiB resident at that moment): SQLite "
        f"{a['peak_rss_mib']:,.0f} MiB, PostgreSQL {b['peak_rss_mib']:,.0f} MiB; the PostgreSQL server's own "
        f"memory is not included."
        if a["peak_rss_mib"] is not None
        else "Peak RSS: not available on this system."
    )
    return f"""{HEADING}

Measured {began:%Y-%m-%d %H:%M} UTC on {machine()}; SQLite {sqlite3.sqlite_version}; PostgreSQL
{pg["version"]} on the same machine (127.0.0.1, TCP; `synchronous_commit={pg["settings"]["synchronous_commit"]}`,
`fsync={pg["settings"]["fsync"]}`, `shared_buffers={pg["settings"]["shared_buffers"]}`; `SELECT 1` round trip
{pg["rtt_ms"]:.3f} ms, median of 200); asyncpg {asyncpg.__version__}, default asyncio loop; code {rev}.
Load average (1/5/15 min) {avg(load[0])} before, {avg(load[1])} after: the machine was shared, so
absolute numbers are noisy; the ratios less so. `python bench/store_bench.py --write docs/benchmarks.md`,
whole run {elapsed:.0f} s.

**Input.** `tests.synthetic` ({pop["patients"]} patients, {pop["days"]} days, seed {pop["seed"]}, temperatures and
corrections on): {n_obs:,} Observations, every one an `Intake` after `worker.intake` (a monitored CBC
code or a body temperature; {pop["rejected"]} rejected versions among them), converted before timing
({pop["seconds"]:.1f} s). Each run is a child process of its own, on a fresh store (a new SQLite file in a
temporary directory, WAL, `synchronous=NORMAL`; a new schema `nwbench_<random>`, dropped afterwards), driven as the worker
drives it: **ingest** in {pages} pages of {args.page_size} (a float clock, +1 s a page; `record_decision`
for each new rejected version); **decide + commit**: `dirty_panels()` -> `load_states()` ->
`clinical.panels.decide` (rules of `Settings()`) -> one `commit()` per round, until nothing is dirty
({st["rounds"]} round: a backlog, all panels ready at once, as in `Worker._decide`); **outbox**:
`pending_outbox(500)`, then `check_leader()` + `mark_sent()` per entry, sequentially, until none is
pending. Median of {args.repeat} runs per backend, backends alternated; Observations/s = {n_obs:,} / the
phase's wall time.

{table(s, n_obs)}

Per run: {st["panels"]:,} panels decided ({st["assessed"]:,} with an ANC graded), events {events};
{a["counts"]["decisions"]:,} decision records, {a["counts"]["outbox"]:,} outbox rows, all sent. Wall time per
repeat — SQLite ingest {spread("sqlite", "ingest")} s, decide+commit {spread("sqlite", "decide+commit")} s,
outbox {spread("sqlite", "outbox")} s; PostgreSQL ingest {spread("postgres", "ingest")} s, decide+commit
{spread("postgres", "decide+commit")} s, outbox {spread("postgres", "outbox")} s. Stored size: SQLite file + WAL
{a["size_mib"]:.1f} MiB, PostgreSQL tables with indexes and TOAST {b["size_mib"]:.1f} MiB. {rss}

Per store method (median seconds over the runs). Socket writes: the asyncpg client's writes to the
server; for single statements each is one round trip (the request, then a wait for the answer),
while `executemany` streams its rows in pipelined chunks, so for `commit` (and part of `ingest`) it
counts chunks, not round trips. The pool is created without asyncpg's reset on release (our pool
connections carry no session state), which saved one round trip per store call.

{method_table(s)}

**Equivalence.** In every repeat both backends logged the same {a["counts"]["decisions"]:,} decision
records in the same order (`await store.decisions()` compared record by record) and ended with equal
table counts (`counts()`: {", ".join(f"{k} {v:,}" for k, v in a["counts"].items())}) and an empty outbox;
the script exits non-zero otherwise.

**Reading.** Total over the three phases: SQLite {a["timed"]:.1f} s, PostgreSQL {b["timed"]:.1f} s
(**{b["timed"] / a["timed"]:.1f}×**). The pure-Python `decide` is the same work on both sides
({dec:.2f} s of SQLite's decide+commit). The phase that dominates: SQLite {dominant["sqlite"]}
({share["sqlite"]:.0%} of its time), PostgreSQL {dominant["postgres"]} ({share["postgres"]:.0%}).
PostgreSQL ingest costs about {ing_w:.0f} socket writes per page of {args.page_size} (BEGIN, the `FOR SHARE`
epoch fence, one `ANY($1)` look-up of the page's ids, two pipelined `executemany` upserts, COMMIT),
so its cost per page is a handful of round trips plus server work on the other core
(this process's CPU is {b["phases"]["ingest"]["cpu"]:.2f} s of its {b["phases"]["ingest"]["wall"]:.2f} s), not {args.page_size}
statements; SQLite runs three or four statements per Observation (a SELECT, the upsert, one or two
panel touches), but in-process, so its ingest is CPU in this process.
A backlog commit has one `Decided` per panel, {st["decided rows"]:,} rows for {st["patients"]:,} patients
(up to {st["most rows of one patient"]} for one patient); both stores write one episodes row per patient
(`store.base.episode_rows`: the last state, {st["state bytes, last per patient"] / 2**20:.1f} MiB) — encoding every
intermediate state, as the first version did, was {st["state bytes"] / 2**20:.1f} MiB and cost more than twice
the commit time on PostgreSQL.
The outbox is per entry on both sides, which is where PostgreSQL is furthest behind: each `mark_sent`
is its own fenced transaction, four round trips (BEGIN, fence, UPDATE, COMMIT; {ms_b:.2f} ms against
{ms_a:.3f} ms on SQLite), and the worker's `check_leader()` before it one more ({cl_b:.2f} ms), so {sent:,}
entries cost PostgreSQL {pc("postgres", "mark_sent")[1] + pc("postgres", "check_leader")[1]:.1f} s. Over
loopback a round trip is {pg["rtt_ms"]:.2f} ms; with the database across a network at, say, 0.5 ms, these
counts alone would add about {sent * 5 * 0.5 / 1000:.1f} s to the outbox and
{pages * ing_w * 0.5 / 1000:.1f} s to the ingest (an estimate from the write counts, not measured), still
small beside the FHIR requests each outbox entry stands for. `dirty_panels` took
{dp_a:.2f} s on SQLite (one query per dirty panel) and {dp_b:.2f} s on PostgreSQL (two queries).
"""  # noqa: E501 - Markdown written as is: wrapping would change its bytes


def child(args: argparse.Namespace) -> int:
    """One backend, one run, in its own process (so its peak RSS is its own); the result as JSON."""
    pop = population(args)
    out = asyncio.run(run_backend(args.child, pop["items"], args, Settings()))
    spec = pop["spec"]
    out["population"] = {
        "patients": spec.patients,
        "days": spec.days,
        "seed": spec.seed,
        "items": len(pop["items"]),
        "kinds": pop["kinds"],
        "rejected": pop["rejected"],
        "seconds": pop["seconds"],
    }
    sys.stdout.buffer.write(orjson.dumps(out))
    return 0


def run_child(backend: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        backend,
        "--observations",
        str(args.observations),
        "--patients",
        str(args.patients),
        "--seed",
        str(args.seed),
        "--page-size",
        str(args.page_size),
        "--dsn",
        args.dsn,
    ]
    proc = subprocess.run(cmd, capture_output=True, timeout=CHILD_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{backend} run failed (exit {proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    return orjson.loads(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--observations", type=int, default=20_000, help="about this many monitored Observations")
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--page-size", type=int, default=200, help="Observations per ingest() call (fhir.page_size default)"
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dsn",
        default=os.environ.get("NWBENCH_DSN", DEFAULT_DSN),
        help="PostgreSQL (a schema is created and dropped in it); default $NWBENCH_DSN or " + DEFAULT_DSN,
    )
    ap.add_argument("--write", type=Path, help="update this Markdown file")
    ap.add_argument("--revision", help="what code is measured (default: from git)")
    ap.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    nw_logging.configure("error", "console")
    if args.child:
        return child(args)
    began, t_all, load_before = datetime.now(UTC), time.perf_counter(), os.getloadavg()
    pg = asyncio.run(pg_facts(args.dsn))
    runs: list[dict[str, dict]] = []
    for i in range(args.repeat):
        order = BACKENDS if i % 2 == 0 else BACKENDS[::-1]
        got: dict[str, dict] = {}
        for backend in order:
            got[backend] = run_child(backend, args)
            ph = got[backend]["phases"]
            print(
                f"repeat {i + 1} {backend:8s}: "
                + ", ".join(f"{p} {ph[p]['wall']:.2f} s" for p in PHASES)
                + f"; peak RSS {got[backend]['peak_rss_kib'] / 1024:.0f} MiB",
                file=sys.stderr,
            )
        check_equivalent(got, i + 1)
        for backend in BACKENDS:  # the logs are equal: keep their length only
            got[backend]["n_decisions"] = len(got[backend].pop("decisions"))
        runs.append(got)
    pop = runs[0]["sqlite"]["population"]
    print(
        f"population: {pop['items']:,} Observations as Intake ({pop['kinds']}), "
        f"converted in {pop['seconds']:.1f} s",
        file=sys.stderr,
    )
    s = summarise(runs, pop["items"])
    print(table(s, pop["items"]))
    print()
    print(method_table(s))
    elapsed = time.perf_counter() - t_all
    section = render(
        args, pop, s, pg, args.revision or revision(), elapsed, (load_before, os.getloadavg()), began
    )
    print(f"\nwhole run {elapsed:.1f} s", file=sys.stderr)
    if args.write:
        write_section(args.write, section, "store-bench")
        print(f"wrote the section to {args.write}", file=sys.stderr)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
