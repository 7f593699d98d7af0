"""Command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import structlog

from service import logging as nw_logging
from service.config import Settings, StoreSettings, load_settings, review_settings
from service.errors import ConfigError, NeutrowatchError
from service.fhir import model


def _logging(settings: Settings, *, service: bool = False) -> None:
    """Logging as configured; patient references pseudonymised unless the operator chose plain."""
    pseudonyms = None
    if settings.logging.patient_references == "pseudonymised":
        pseudonyms = nw_logging.Pseudonyms(settings.logging.pseudonym_key_bytes())
    nw_logging.configure(settings.logging.level, settings.logging.format, pseudonyms)
    if service and pseudonyms is not None and pseudonyms.ephemeral:
        structlog.get_logger("neutrowatch").warning(
            "patient references in logs are pseudonymised with a key of this process only: set "
            "logging.pseudonym_key or logging.pseudonym_key_file to correlate lines across restarts and "
            "replicas"
        )


def _pseudonym(args: argparse.Namespace) -> int:
    """Which pseudonym the logs use for a patient: for an operator who knows the patient
    and looks for its lines.
    """
    settings = load_settings(args.config)
    key = settings.logging.pseudonym_key_bytes()
    if key is None:
        raise NeutrowatchError(
            "no logging.pseudonym_key or logging.pseudonym_key_file configured: pseudonyms change with each "
            "process"
        )
    ref = args.patient if args.patient.startswith("Patient/") else f"Patient/{args.patient}"
    print(nw_logging.Pseudonyms(key).text(ref))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from service.replay.engine import Replay
    from service.replay.progress import Progress
    from service.replay.summary import summary_table

    if args.provenance and not args.alerts:
        raise NeutrowatchError("--provenance needs --alerts (the Provenance resources go to the alerts file)")
    settings = load_settings(args.config)
    _logging(settings)
    log = structlog.get_logger("neutrowatch.replay")
    with ExitStack() as stack:
        try:
            events = stack.enter_context(open(args.events, "wb"))
            alerts = stack.enter_context(open(args.alerts, "wb")) if args.alerts else None
        except OSError as err:
            raise NeutrowatchError(f"cannot write {err.filename}: {err.strerror}") from None
        replay = stack.enter_context(
            Replay(
                settings.rules, settings.alerts, provenance=args.provenance, read_policy=settings.read_policy
            )
        )
        replay.progress = progress = Progress()
        stats = replay.run(args.inputs, events, alerts)
        progress.close()
    log.info(
        "replay finished",
        documents=stats.documents,
        resources=stats.resources,
        observations=stats.observations,
        panels=stats.panels,
        stale_panels=stats.stale_panels,
        events=dict(stats.events),
        ignored=dict(stats.ignored),
        not_decided=stats.not_decided(),
    )
    if progress.enabled:  # people at a terminal; a log file or pipe keeps JSON lines only
        sys.stderr.write(summary_table(stats))
    return 0


def _survey(args: argparse.Namespace) -> int:
    """The survey report to stdout; --json and --draft-conceptmap to files. Read-only everywhere."""
    import orjson

    from service.survey import classifier, conceptmap, report, sources
    from service.survey.tally import Survey

    if bool(args.inputs) == args.server:
        raise NeutrowatchError("survey: give INPUT files or --server, not both and not neither")
    if args.max < 1 or (args.since and not args.server):
        raise NeutrowatchError("survey: --max must be at least 1, and --since goes with --server")
    settings = load_settings(args.config)
    _logging(settings)
    survey = Survey(policy=settings.read_policy, classify=classifier.site(settings.read_policy.terminology))
    items: Iterable[model.Resource | model.Undecodable]
    if args.server:
        since = sources.duration_seconds(args.since) if args.since else None
        items = asyncio.run(sources.server_resources(settings.fhir, since, args.max))
        source = f"{settings.fhir.base_url} (at most {args.max:,} Observations, newest first)"
    else:
        items, source = sources.file_resources(args.inputs), " ".join(args.inputs)
    for item in items:
        survey.add(item)
    survey.finish()
    sys.stdout.write(report.render_text(survey, source))
    outputs = [
        (args.json, report.survey_json(survey, "server" if args.server else "files")),
        (args.draft_conceptmap, conceptmap.draft_conceptmap(survey)),
    ]
    for path, document in outputs:
        if path is not None:
            try:
                path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
            except OSError as err:
                raise NeutrowatchError(f"cannot write {err.filename}: {err.strerror}") from None
    return 0


def _explain(args: argparse.Namespace) -> int:
    """The decision trail of one patient, to stdout (and a PNG). Nothing is logged: the trail is the
    patient's data, for the engineer's terminal only."""
    import orjson

    from service import explain

    settings = load_settings(args.config)
    _logging(settings)  # to stderr; explain itself logs nothing
    if args.png is not None:
        explain.plot_available()  # fail before the work when matplotlib is missing
    if args.inputs:
        trail = explain.explain_inputs(args.inputs, args.patient, settings)
    else:
        trail = explain.explain_server(settings, args.patient, history=not args.no_history)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(explain.trail_json(trail), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(explain.render_text(trail))
    if args.png is not None:
        explain.write_png(trail, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def describe_store(store: StoreSettings) -> str:
    if store.backend == "postgres":
        return f"postgres {store.parsed_dsn().describe()} schema {store.schema_name}"
    return f"sqlite {store.path}"


def _secret_files(settings: Settings) -> list[str]:
    """Problems of the files `run` would read at start-up (DSN, token, private key, CA bundle), each
    naming its field and never quoting the file's content."""
    from service.fhir.auth import load_signing_key, read_token_file
    from service.fhir.tls import ssl_option

    checks: list[Callable[[], object]] = [partial(ssl_option, settings.fhir)]
    if settings.store.backend == "postgres":
        checks.append(settings.store.parsed_dsn)
    auth = settings.fhir.auth
    if auth.method == "bearer" and auth.bearer_token is None and auth.bearer_token_file is not None:
        checks.append(partial(read_token_file, auth.bearer_token_file))
    if auth.method == "smart" and auth.smart.private_key_file is not None:
        checks.append(partial(load_signing_key, auth.smart.private_key_file, auth.smart.algorithm))
    problems = []
    for check in checks:
        try:
            check()
        except ConfigError as err:
            problems.append(str(err).removeprefix("config error: "))
    return problems


def _check_config(args: argparse.Namespace) -> int:
    """Every error (each naming its field) and every warning to stderr; "configuration ok" to
    stdout. Exit 2 on any error, 0 otherwise (warnings included)."""
    review = review_settings(args.config)
    errors = review.errors + (_secret_files(review.settings) if review.settings is not None else [])
    for warning in review.warnings:
        print(f"neutrowatch: warning: {warning}", file=sys.stderr)
    if errors or review.settings is None:
        for error in errors:
            print(f"neutrowatch: config error: {error}", file=sys.stderr)
        print(
            f"neutrowatch: configuration invalid ({len(errors)} error{'s' if len(errors) != 1 else ''})",
            file=sys.stderr,
        )
        return 2
    settings = review.settings
    print(f"configuration ok (scheme {settings.grading.scheme}, store {describe_store(settings.store)})")
    if args.probe:
        from service.live.probe import probe

        return asyncio.run(probe(settings))
    return 0


def _profiles_install(args: argparse.Namespace) -> int:
    """The project's StructureDefinitions, CodeSystems and ValueSets onto fhir.base_url (rebased on
    alerts.canonical_base), each created or updated on its canonical url + version; one line each."""
    from service.fhir.client import FhirClient
    from service.live import profiles

    settings = load_settings(args.config)
    _logging(settings)
    if not settings.fhir.base_url:
        raise NeutrowatchError("fhir.base_url is not set: nowhere to install the profiles")
    resources = profiles.definitions(args.source, settings.alerts.canonical_base)

    async def go() -> list[tuple[str, dict[str, object]]]:
        async with FhirClient(settings.fhir) as client:
            return await profiles.install(client, resources)

    done = asyncio.run(go())
    for what, resource in done:
        print(f"{what:<9} {resource['resourceType']} {resource['url']}|{resource['version']}")
    counts = {w: sum(1 for d, _ in done if d == w) for w in ("created", "updated", "unchanged")}
    print(f"profiles install: {', '.join(f'{n} {w}' for w, n in counts.items())} on {settings.fhir.base_url}")
    return 0


def _log_warnings(config: Path | None) -> None:
    """What check-config warns of, in the service's log too (field names and the file, no values)."""
    for warning in review_settings(config).warnings:
        structlog.get_logger("neutrowatch").warning("unsafe configuration", warning=warning)


def _run(args: argparse.Namespace) -> int:
    from service.live import app

    settings = load_settings(args.config)
    _logging(settings, service=True)
    _log_warnings(args.config)
    asyncio.run(app.run(settings))
    return 0


def _once(args: argparse.Namespace) -> int:
    from service.live import app

    settings = load_settings(args.config)
    _logging(settings, service=True)
    _log_warnings(args.config)
    report = asyncio.run(app.once(settings))
    if report is None:
        return 1
    return 0 if report.delivered_all else 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neutrowatch", description="Neutropenia monitoring for FHIR lab results."
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("replay", help="run the clinical core over FHIR files (NDJSON, Bundles, resources)")
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories")
    r.add_argument(
        "--events", required=True, type=Path, metavar="EVENTS.jsonl", help="decisions, one JSON object a line"
    )
    r.add_argument(
        "--alerts",
        type=Path,
        metavar="ALERTS.ndjson",
        help="the Flag and Communication resources it would write",
    )
    r.add_argument(
        "--provenance",
        action="store_true",
        help="also write each alert write's Provenance to ALERTS.ndjson (after its Flag and Communication)",
    )
    r.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML settings (default: built-in, or $NEUTROWATCH_CONFIG)",
    )
    r.set_defaults(func=_replay)

    sv = sub.add_parser(
        "survey",
        help="what a site's Observations look like to the service: codes "
        "monitored, local codes with a likely term, units, statuses, panels without an ANC "
        "(read-only)",
    )
    sv.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="files or directories, read as replay reads them"
    )
    sv.add_argument(
        "--server", action="store_true", help="a paged sample of Observations from fhir.base_url instead"
    )
    sv.add_argument(
        "--since", metavar="DURATION", help="with --server: updated within this long (30m, 12h, 7d)"
    )
    sv.add_argument(
        "--max", type=int, default=10_000, metavar="N", help="with --server: at most N Observations (10000)"
    )
    sv.add_argument("--json", type=Path, metavar="FILE", help="the survey as JSON (docs/survey.md)")
    sv.add_argument(
        "--draft-conceptmap",
        type=Path,
        metavar="FILE",
        help="a draft FHIR ConceptMap of the candidates, every element marked for review",
    )
    sv.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML settings (default: built-in, or $NEUTROWATCH_CONFIG)",
    )
    sv.set_defaults(func=_survey)

    e = sub.add_parser(
        "explain", help="the decision trail of one patient: inputs, ANC, grade, episode, events and rules"
    )
    e.add_argument("patient", metavar="PATIENT", help="Patient reference (Patient/123) or id")
    e.add_argument(
        "--input",
        dest="inputs",
        nargs="+",
        metavar="FILES",
        help="read these files as replay does (default: fetch the patient from fhir.base_url)",
    )
    e.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML settings (default: built-in, or $NEUTROWATCH_CONFIG)",
    )
    e.add_argument(
        "--png", type=Path, metavar="OUT.png", help="also draw the timeline (needs neutrowatch[explain])"
    )
    e.add_argument("--json", action="store_true", help="the trail as JSON, for machines")
    e.add_argument(
        "--no-history", action="store_true", help="from the server: current versions only, no _history reads"
    )
    e.set_defaults(func=_explain)

    c = sub.add_parser("check-config", help="validate the configuration and exit")
    c.add_argument("--config", type=Path, metavar="FILE")
    c.add_argument("--probe", action="store_true", help="also contact the FHIR server and say what works")
    c.set_defaults(func=_check_config)

    run = sub.add_parser("run", help="poll the FHIR server on an interval and post alerts (the service)")
    run.add_argument("--config", type=Path, metavar="FILE")
    run.set_defaults(func=_run)

    ps = sub.add_parser("pseudonym", help="the pseudonym a patient reference has in this deployment's logs")
    ps.add_argument("patient", metavar="PATIENT", help="Patient reference (Patient/123) or id")
    ps.add_argument("--config", type=Path, metavar="FILE")
    ps.set_defaults(func=_pseudonym)

    pr = sub.add_parser("profiles", help="the project's FHIR profiles and terminology on the server")
    prs = pr.add_subparsers(dest="action", required=True)
    pi = prs.add_parser(
        "install",
        help="create or update the StructureDefinitions, CodeSystems and ValueSets on "
        "fhir.base_url (conditional on canonical url + version; a second run changes nothing)",
    )
    pi.add_argument("--config", type=Path, metavar="FILE")
    pi.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="DIR",
        default=Path(__file__).resolve().parents[1] / "fhir_profiles" / "generated",
        help="the generated JSON (default: fhir_profiles/generated/ of the source tree)",
    )
    pi.set_defaults(func=_profiles_install)

    once = sub.add_parser("once", help="run one poll cycle and exit (cron-style use, tests)")
    once.add_argument("--config", type=Path, metavar="FILE")
    once.set_defaults(func=_once)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NeutrowatchError as err:
        print(f"neutrowatch: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
