"""Configuration: the shipped files are valid, env overrides the file, bad values name the field;
the PostgreSQL DSN's two libpq forms; `check-config`: every error, warnings for unsafe settings."""

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from service.__main__ import main
from service.config import StoreSettings, load_settings
from service.config.pgdsn import parse
from service.errors import ConfigError
from service.live.store.postgres import describe_dsn

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "config").glob("*.yaml")))
def test_shipped_config_files_are_valid(name):
    load_settings(ROOT / "config" / name)


def test_env_overrides_file(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("alerts:\n  author: Device/from-file\n")
    assert load_settings(cfg).alerts.author == "Device/from-file"
    monkeypatch.setenv("NEUTROWATCH_ALERTS__AUTHOR", "Organization/from-env")
    assert load_settings(cfg).alerts.author == "Organization/from-env"


def test_config_path_from_env(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("logging:\n  level: warning\n")
    monkeypatch.setenv("NEUTROWATCH_CONFIG", str(cfg))
    assert load_settings().logging.level == "warning"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grading:\n  scheme: nope\n", "grading.scheme: unknown scheme 'nope'"),
        ("alerts:\n  author: Patient/1\n", "alerts.author: String should match pattern"),
        ("alerts:\n  recipients: [Patient/1]\n", "alerts.recipients: 'Patient/1' is not a Practitioner"),
        ("alerts:\n  canonical_base: ftp://x\n", "alerts.canonical_base"),
        ("logging:\n  level: loud\n", "logging.level: Input should be"),
        ("nonsense: 1\n", "nonsense: unknown field"),
        ("- a list\n", "top level must be a mapping"),
        ("grading: [\n", "not valid YAML (line"),
        (
            "store:\n  backend: postgres\n",
            "store: backend 'postgres' needs dsn (NEUTROWATCH_STORE__DSN) or dsn_file",
        ),
        ("store:\n  backend: mysql\n", "store.backend: Input should be 'sqlite' or 'postgres'"),
        ("store:\n  schema_name: Robert'); DROP\n", "store.schema_name: String should match pattern"),
        ("store:\n  pool_size: 1\n", "store.pool_size: Input should be greater than or equal to 2"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(tmp_path / "absent.yaml")


def test_the_dsn_comes_from_env_or_a_file_and_is_never_shown(tmp_path, monkeypatch, capsys):
    from service.__main__ import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("store:\n  backend: postgres\n")
    monkeypatch.setenv("NEUTROWATCH_STORE__DSN", "postgresql://nw:hunter2@db.example:5433/nw")
    monkeypatch.setenv("NEUTROWATCH_FHIR__BASE_URL", "https://fhir.example.org/r4")
    settings = load_settings(cfg)
    assert settings.store.postgres_dsn() == "postgresql://nw:hunter2@db.example:5433/nw"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert main(["check-config", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "postgres db.example:5433/nw schema neutrowatch" in out and "hunter2" not in out
    monkeypatch.delenv("NEUTROWATCH_STORE__DSN")
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://nw:from-file@db:5432/nw\n")
    cfg.write_text(f"store:\n  backend: postgres\n  dsn_file: {secret}\n")
    assert load_settings(cfg).store.postgres_dsn() == "postgresql://nw:from-file@db:5432/nw"
    cfg.write_text(f"store:\n  backend: postgres\n  dsn_file: {tmp_path / 'absent'}\n")
    with pytest.raises(ConfigError, match="store.dsn_file: No such file"):
        load_settings(cfg).store.postgres_dsn()


# -- the PostgreSQL DSN ----------------------------------------------------------------------------
# Forms: https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING (34.1.1).

PW = "Pw-s3cret-77"


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (f"postgresql://nw:{PW}@db.example:5433/nw", "db.example:5433/nw"),
        (f"postgres://nw:{PW}@db/nw?sslmode=require", "db:5432/nw"),
        ("postgresql://nw:p%40ss%2Fw%3Ard@db/nw", "db:5432/nw"),  # '@', '/', ':' percent-encoded
        (f"postgresql://nw:{PW}@h1:5432,h2:5433/nw?target_session_attrs=read-write", "h1:5432,h2:5433/nw"),
        (f"postgresql://nw:{PW}@[::1]:6432/nw", "[::1]:6432/nw"),
        ("postgresql:///nw?host=/var/run/postgresql", "/var/run/postgresql:5432/nw"),
        (f"host=db.example port=5433 user=nw password={PW} dbname=nw", "db.example:5433/nw"),
        (f"host=db user=nw password='{PW} with spaces and \\' a quote' dbname=nw", "db:5432/nw"),
        (f"host=/var/run/postgresql dbname=nw password={PW}", "/var/run/postgresql:5432/nw"),
    ],
)
def test_accepted_dsn_forms_are_shown_by_host_port_and_database_only(dsn, shown):
    """Both libpq forms are accepted; what is shown comes from the parsed host, port and database,
    never the user, password or options."""
    settings = StoreSettings(backend="postgres", dsn=dsn)
    assert describe_dsn(settings.postgres_dsn()) == describe_dsn(dsn) == shown
    assert PW not in shown and "nw:" not in shown


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql:/nw:{PW}@db/nw",  # one slash: no authority, the whole rest was the "path"
        f"postgresql:nw:{PW}@db/nw",
        f"postgresql://nw:{PW}@db@x/nw",  # an unencoded '@' in the password
        # an unencoded '/': "host" nw, "port" 1234, "database" the rest
        "postgresql://nw:1234/Pw-s3cret@db/nw",
        f"postgresql://nw:{PW}#x@db/nw",
        f"postgresql://nw:{PW}?x@db/nw",
        f"postgresql://nw:{PW}@/nw",  # no host
        f"postgresql://nw:{PW}@db:99999/nw",
        f"mysql://nw:{PW}@db/nw",
        f"host=db password={PW}'x",  # a stray quote
        f"host=db passwd={PW}",  # not a libpq keyword
        f"dbname=nw user=nw password={PW}",  # no host: a local socket, never the database in a container
        f"host=db port={PW}",
        PW,
        f"db.example:5432:nw:nw:{PW}",  # a .pgpass line
    ],
)
def test_a_dsn_of_neither_form_is_refused_naming_the_field_never_repeating_it(tmp_path, dsn, monkeypatch):
    """A malformed DSN is a config error naming store.dsn (or store.dsn_file), and no message, and no
    description of it, repeats any part of it."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("store:\n  backend: postgres\n")
    monkeypatch.setenv("NEUTROWATCH_STORE__DSN", dsn)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "store.dsn:" in str(err.value) and PW not in str(err.value) and "s3cret" not in str(err.value)
    monkeypatch.delenv("NEUTROWATCH_STORE__DSN")
    secret = tmp_path / "dsn"
    secret.write_text(dsn + "\n")
    cfg.write_text(f"store:\n  backend: postgres\n  dsn_file: {secret}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg).store.postgres_dsn()
    assert "store.dsn_file:" in str(err.value) and PW not in str(err.value) and "s3cret" not in str(err.value)
    assert describe_dsn(dsn) == "(unparseable DSN)"


def test_the_keyword_form_reaches_asyncpg_as_the_equivalent_url():
    """asyncpg reads only URLs: the keyword form is handed over as one with every keyword a query
    parameter (quoted values unescaped, then percent-encoded)."""
    dsn = parse("host=db port=5433 user=nw password='a b\\'c' dbname=nw sslmode=require")
    assert dsn.url == "postgresql://?host=db&port=5433&user=nw&password=a+b%27c&dbname=nw&sslmode=require"
    assert dsn.has_password and not parse("host=db dbname=nw").has_password


# -- check-config ----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NEUTROWATCH_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("text", "code", "errors", "warnings"),
    [
        ("store:\n  path: s.db\n", 2, ["fhir.base_url: required"], []),
        ("fhir:\n  base_url: https://f.example/r4\n", 0, [], []),
        (
            "fhir:\n  base_url: https://f.example/r4\n  verify_tls: false\n  auth:\n    method: bearer\n"
            "    bearer_token_file: TOKEN\n",
            0,
            [],
            ["fhir.verify_tls: false while fhir.auth.method is bearer"],
        ),
        (
            "fhir:\n  base_url: https://f.example/r4\n  verify_tls: false\n  auth:\n    method: smart\n"
            "    smart:\n      client_id: c\n      private_key_file: KEY\n",
            2,
            ["fhir.auth.smart.private_key_file: "],
            ["fhir.verify_tls: false while fhir.auth.method is smart"],
        ),
        (
            "fhir:\n  base_url: https://f.example/r4\n  verify_tls: false\n",
            0,
            [],
            [],
        ),  # no credential to leak
        (
            "fhir:\n  base_url: https://f.example/r4\n  auth:\n    method: bearer\n"
            "    bearer_token: tok-INLINE-9\n",
            0,
            [],
            [
                "fhir.auth.bearer_token is written in the config file…: set it from the environment "
                "(NEUTROWATCH_FHIR__AUTH__BEARER_TOKEN) or a mounted file (fhir.auth.bearer_token_file)"
            ],
        ),
        (
            f"fhir:\n  base_url: https://f.example/r4\nstore:\n  backend: postgres\n  dsn: postgresql://nw:{PW}@db/nw\n",
            0,
            [],
            [
                "store.dsn holds a password and is written in the config file…: set it from the environment "
                "(NEUTROWATCH_STORE__DSN) or a mounted file (store.dsn_file)"
            ],
        ),
        (
            "fhir:\n  base_url: https://f.example/r4\nstore:\n  backend: postgres\n  dsn: postgresql://nw@db/nw\n",
            0,
            [],
            [],
        ),
        (
            "fhir:\n  base_url: http://f.example/r4\n  allow_insecure_http: true\n"
            "  auth:\n    method: bearer\n"
            "    bearer_token_file: TOKEN\n",
            0,
            [],
            ["plain http:// to f.example while fhir.auth.method is bearer"],
        ),
        (
            "fhir:\n  page_size: 0\n  auth:\n    method: basic\n"
            f"store:\n  backend: postgres\n  dsn: postgresql:/nw:{PW}@db/nw\n"
            "grading:\n  scheme: nope\nnonsense: 1\n",
            2,
            [
                "fhir.page_size: Input should be greater than or equal to 1",
                "fhir.auth.method: Input should be",
                "store.dsn: is not a postgresql://",
                "grading.scheme: unknown scheme 'nope'",
                "nonsense: unknown field",
                "fhir.base_url: required",
            ],
            ["store.dsn holds a password"],
        ),
        (
            "fhir:\n  base_url: https://f.example/r4\n  auth:\n    method: bearer\n"
            "    bearer_token_file: ABSENT\n"
            "store:\n  backend: postgres\n  dsn_file: ABSENT\n",
            2,
            ["fhir.auth.bearer_token_file: cannot read", "store.dsn_file: No such file"],
            [],
        ),
    ],
    ids=[
        "no-base-url",
        "ok",
        "no-verify-bearer",
        "no-verify-smart",
        "no-verify-no-credential",
        "inline-token",
        "inline-dsn-password",
        "inline-dsn-no-password",
        "http-credential",
        "every-error",
        "secret-files",
    ],
)
def test_check_config_lists_every_error_and_warns_of_unsafe_settings(
    tmp_path, capsys, text, code, errors, warnings
):
    """check-config: no FHIR base URL is an error; credentials without TLS verification, over plain
    http to another host, or a secret written in the YAML file are warnings (stderr, exit 0); every
    error is listed, each on its own line naming its field (exit 2); nothing repeats a secret."""
    token = tmp_path / "token"
    token.write_text("tok-FILE-5\n")
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    key.chmod(0o600)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        text.replace("TOKEN", str(token)).replace("KEY", str(key)).replace("ABSENT", str(tmp_path / "absent"))
    )
    assert main(["check-config", "--config", str(cfg)]) == code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    for expected in errors:
        assert any(line.startswith("neutrowatch: config error: ") and expected in line for line in lines), (
            expected,
            err,
        )
    assert sum(line.startswith("neutrowatch: config error: ") for line in lines) == len(errors), err
    for expected in warnings:  # "…" separates parts expected in order on one line
        parts = expected.split("…")
        assert any(line.startswith("neutrowatch: warning: ") and _in_order(parts, line) for line in lines), (
            expected,
            err,
        )
    assert sum(line.startswith("neutrowatch: warning: ") for line in lines) == len(warnings), err
    assert ("configuration ok" in out) == (code == 0)
    for secret in (PW, "tok-INLINE-9", "tok-FILE-5"):
        assert secret not in out + err


def _in_order(parts: list[str], line: str) -> bool:
    at = 0
    for part in parts:
        at = line.find(part, at)
        if at < 0:
            return False
        at += len(part)
    return True


def test_run_and_once_fail_at_start_naming_every_bad_field(tmp_path, capsys, clean_env):
    """run and once stop before doing anything on a bad configuration: exit 2 and one line naming
    every invalid field (never the DSN's text)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "fhir:\n  base_url: https://f.example/r4\n  page_size: 0\n"
        f"store:\n  backend: postgres\n  dsn: host=db password={PW}'\n"
    )
    for command in ("run", "once"):
        assert main([command, "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert (
            len(err.splitlines()) == 1 and "fhir.page_size:" in err and "store.dsn:" in err and PW not in err
        )
    cfg.write_text(f"store:\n  path: {tmp_path / 's.db'}\n")
    proc = _cli("once", "--config", str(cfg))  # a process of its own: `once` configures logging
    assert proc.returncode == 2 and "fhir.base_url: required" in proc.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUTROWATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def html_proxy() -> Iterator[str]:
    """A server that answers every request as a login proxy would: 200, text/html."""
    started = threading.Event()
    state: dict[str, object] = {}

    async def page(_request: web.Request) -> web.Response:
        return web.Response(
            text="<!DOCTYPE html><html><body><form>Sign in</form></body></html>", content_type="text/html"
        )

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", page)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        state["port"], state["loop"] = site._server.sockets[0].getsockname()[1], loop  # type: ignore[union-attr]  # a started site has a server
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    yield f"http://127.0.0.1:{state['port']}/fhir"
    loop = state["loop"]
    loop.call_soon_threadsafe(loop.stop)  # type: ignore[attr-defined]  # state holds the server's loop
    thread.join(10)


def test_probe_says_an_html_page_is_a_proxy_or_login_page(tmp_path, html_proxy):
    """A proxy's login page (200, text/html) is reported as such, not as a JSON error."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"fhir:\n  base_url: {html_proxy}\n  allow_insecure_http: true\nstore:\n  path: {tmp_path / 's.db'}\n"
    )
    proc = _cli("check-config", "--probe", "--config", str(cfg))
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert (
        "FAIL /metadata: HTTP 200: the server answered with an HTML page, not FHIR JSON "
        "— a proxy or login page?" in out
    )
    assert "FAIL Observation search: HTTP 200: the server answered with an HTML page" in out


def test_probe_names_host_and_port_of_an_unreachable_server(tmp_path):
    """A connection failure says where it tried: host and port (a wrong port or name is then plain)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"fhir:\n  base_url: http://127.0.0.1:9/fhir\n  allow_insecure_http: true\n"
        f"  retry:\n    backoff_base_seconds: 0.01\nstore:\n  path: {tmp_path / 's.db'}\n"
    )
    proc = _cli("check-config", "--probe", "--config", str(cfg))
    assert proc.returncode == 1
    assert (
        "FAIL /metadata: cannot reach 127.0.0.1:9 (GET metadata: gave up after 2 attempts; last: connection)"
        in proc.stdout
    )


def test_once_logs_what_check_config_warns_of(tmp_path):
    """A service started without check-config still tells the operator: the warnings are logged at
    start (field and file named, never the secret)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "fhir:\n  base_url: https://127.0.0.1:9/fhir\n  verify_tls: false\n  retry:\n    max_attempts: 1\n"
        "  auth:\n    method: bearer\n    bearer_token: tok-INLINE-9\n"
        f"store:\n  path: {tmp_path / 's.db'}\nlogging:\n  format: json\n"
    )
    proc = _cli("once", "--config", str(cfg))
    assert proc.returncode == 1
    warnings = [line for line in proc.stderr.splitlines() if '"event": "unsafe configuration"' in line]
    assert (
        len(warnings) == 2
        and "fhir.verify_tls: false" in warnings[0]
        and "fhir.auth.bearer_token is written" in warnings[1]
    )
    assert "tok-INLINE-9" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "key", ["Patient/1/_history/2", "https://fhir.example.org/Patient/1", "1", "Patient/a b"]
)
def test_patient_threshold_keys_are_patient_identities(tmp_path, key):
    """A configured threshold is keyed by the identity the service uses (a relative, unversioned
    Patient reference): any other spelling would silently never match, so it is refused at start-up,
    naming the field and not repeating the key."""
    path = tmp_path / "c.yaml"
    path.write_text(f"clinical:\n  patient_thresholds:\n    '{key}': 1000\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "clinical.patient_thresholds" in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ("{not json", "not valid JSON"),
        ('{"resourceType": "ValueSet", "status": "active"}', "not a ConceptMap resource"),
        ('{"resourceType": "ConceptMap", "group": "x"}', "not a valid FHIR ConceptMap"),
    ],
)
def test_an_unusable_concept_map_file_fails_start_up_naming_the_field_and_file(tmp_path, content, message):
    """terminology.concept_maps is read and checked at start-up: the error names the field, the file
    and what is wrong with it (never its content)."""
    path = tmp_path / "map.json"
    if content is not None:
        path.write_text(content)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"terminology:\n  concept_maps: [{path}]\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert f"terminology.concept_maps: {path}: {message}" in str(err.value)


def test_terminology_settings_reach_the_read_policy_and_the_rules(tmp_path):
    """The project's MIMIC map and a unit mapping are in the read policy; the differential site rule
    is off unless set (reference §2), and reaches the rules when set."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"terminology:\n  concept_maps: [{ROOT / 'tests/data/mimic-iv-demo-cbc/conceptmap.json'}]\n"
        "  units: [{system: 'http://lab.example.org/units', unit: 'Kcells/uL', ucum: '10*3/uL'}]\n"
        "clinical:\n  differential:\n    neutrophil_percent_with_bands_is_segmented: true\n"
    )
    settings = load_settings(cfg)
    terminology = settings.read_policy.terminology
    assert (
        terminology.translate("http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-d-labitems", "51256").loinc
        == "770-8"
    )  # type: ignore[union-attr]  # the code is mapped
    assert (
        terminology.translate("http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-d-labitems", "51218") is None
    )
    assert terminology.ucum("http://lab.example.org/units", "Kcells/uL") == "10*3/uL"
    assert settings.rules.neutrophil_pct_with_bands_is_segmented is True
    assert load_settings(None).rules.neutrophil_pct_with_bands_is_segmented is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "terminology:\n  units: [{system: s, unit: u, ucum: furlong}]\n",
            "terminology.units.0.ucum: 'furlong' is not a unit the service converts",
        ),
        ("terminology:\n  units: [{system: s, unit: u}]\n", "terminology.units.0.ucum: Field required"),
        (
            "fhir:\n  max_search_url_length: 100\n",
            "fhir.max_search_url_length: Input should be greater than or equal to 256",
        ),
    ],
)
def test_bad_terminology_values_name_the_field(tmp_path, text, message):
    """A unit mapped to something the service cannot convert is refused at start-up, not at the first
    result."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert message in str(err.value)
