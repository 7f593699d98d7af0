"""Secrets never leave through the side doors. Table-driven over (secret, surface): the bearer token
(environment or mounted file), the database password (a postgresql:// URL or the libpq keyword
form, from the environment or a mounted file, and malformed DSNs that must be refused without being
repeated) and the SMART private key appear in no `check-config` output, no JSON log line at debug
level of `once` or `run`, no /readyz, /healthz or /metrics body and no error or exit line — on the
good path and the failure paths (FHIR server unreachable, database unreachable).

The FHIR engine here requires the bearer token (its --bearer-token-file), so a good path proves the
token really travelled; PostgreSQL trusts loopback, so a password is accepted and ignored, and still
travels through every layer of the service.

Also here: the bearer token file re-read after a 401 (a rotated Kubernetes secret), and the SQLite
state file created 0600 (it holds patient references and results)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service.config import AuthSettings, FhirSettings
from service.fhir.client import FhirClient
from service.fhir.errors import FhirHttpError
from service.live.store.sqlite import SqliteStore
from service.metrics import REGISTRY
from tests.fhir_server.engine import FhirEngine, engine_available
from tests.fhir_server.load import put_all
from tests.integration.live import population, postgres_store, settings_for
from tests.postgres_plugin import _drop

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-5ecret-b3arer-9f1c2a"
PASSWORD = "pw-5ecret-db-77aa"
DOWN = "127.0.0.1:9"  # nothing listens on port 9


@dataclass(frozen=True)
class Scenario:
    auth: str  # "token-env" | "token-file" | "smart"
    dsn: str  # "url" | "keyword" | a malformed DSN ({pw} for the password, {host} for host:port, {db})
    dsn_via: str  # "env" | "file"

    @property
    def malformed(self) -> bool:
        return self.dsn not in ("url", "keyword")


SCENARIOS = {
    "token in env, URL DSN in env": Scenario("token-env", "url", "env"),
    "token file, keyword DSN file": Scenario("token-file", "keyword", "file"),
    "SMART key, keyword DSN in env": Scenario("smart", "keyword", "env"),
    "DSN postgresql:/ (one slash)": Scenario("token-env", "postgresql:/postgres:{pw}@{host}/{db}", "env"),
    "DSN with an unencoded '/' in the password": Scenario(
        "token-env", "postgresql://postgres:1234/{pw}@{host}/{db}", "env"
    ),
    "DSN with an unencoded '@' in the password, in a file": Scenario(
        "token-file", "postgresql://postgres:{pw}@x@{host}/{db}", "file"
    ),
    "keyword DSN with a stray quote": Scenario(
        "token-env", "host=127.0.0.1 user=postgres password={pw}' dbname={db}", "env"
    ),
    "keyword DSN with an unknown keyword": Scenario(
        "token-env", "host=127.0.0.1 user=postgres pasword={pw} dbname={db}", "env"
    ),
}
GOOD_PATH = (
    "check-config",
    "check-config --probe",
    "once",
    "run: log",
    "run: /readyz",
    "run: /healthz",
    "run: /metrics",
)
FAILURE_PATHS = (
    "once, FHIR server down",
    "once, database down",
    "run, database down: log",
    "run, database down: /readyz",
)
REFUSED = ("check-config", "once", "run")
CASES = [
    (name, surface)
    for name, s in SCENARIOS.items()
    for surface in (REFUSED if s.malformed else GOOD_PATH + FAILURE_PATHS)
]


def _evidence(s: Scenario, surface: str) -> str:
    """What each surface must show, so that no case passes because its output was empty."""
    if s.malformed:
        return r"neutrowatch: (config error: )?.*store\.dsn(_file)?: "
    smart = s.auth == "smart"
    return {
        "check-config": r"configuration ok \(scheme default, "
        r"store postgres 127\.0\.0\.1:5432/\w+ schema nws_",
        "check-config --probe": r"FAIL /metadata: SMART discovery"
        if smart
        else r"ok   /metadata: FHIR 4\.0\.1",
        "once": r'SMART discovery.*"event": "poll cycle failed"' if smart else r'"level": ?"debug"',
        "run: log": r'SMART discovery.*"event": "poll cycle failed"' if smart else r'"level": ?"debug"',
        "run: /readyz": r"not ready: SMART discovery" if smart else r"^ready: last successful poll",
        "run: /healthz": r"^ok$",
        "run: /metrics": r"neutrowatch_fhir_requests_total"
        if smart
        else r'neutrowatch_fhir_writes_total\{resource="Flag",result="ok"\}',
        "once, FHIR server down": r"poll cycle failed|connection failed",
        "once, database down": re.escape(DOWN) + r"/\w+",
        "run, database down: log": r"state store unavailable",
        "run, database down: /readyz": r"not ready: state store unavailable: state store postgres "
        + re.escape(DOWN),
    }[surface]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, OSError):
        return None, ""


class Harness:
    """Runs the service's commands for one scenario and keeps what each surface showed."""

    def __init__(self, tmp: Path, engine: FhirEngine, pg_dsn: str, key_file: Path) -> None:
        self.tmp, self.engine, self.key_file = tmp, engine, key_file
        parts = urlsplit(pg_dsn)
        self.user, self.host, self.db = (
            parts.username or "postgres",
            f"{parts.hostname}:{parts.port or 5432}",
            parts.path.strip("/"),
        )
        self.pg_dsn = pg_dsn
        self.schemas: list[str] = []
        self.outputs: dict[str, dict[str, str]] = {}

    def dsn(self, s: Scenario, host: str | None = None) -> str:
        host = host or self.host
        if s.dsn == "url":
            return f"postgresql://{self.user}:{PASSWORD}@{host}/{self.db}"
        if s.dsn == "keyword":
            name, port = host.split(":")
            return f"host={name} port={port} user={self.user} password='{PASSWORD}' dbname={self.db}"
        return s.dsn.format(pw=PASSWORD, host=host, db=self.db)

    def config(self, s: Scenario, name: str, base_url: str, dsn: str) -> tuple[Path, dict[str, str]]:
        schema = f"nws_{uuid.uuid4().hex[:10]}"
        self.schemas.append(schema)
        name = f"{re.sub(r'[^A-Za-z0-9]+', '-', name)}-{schema}"
        settings = settings_for(
            base_url,
            postgres_store("postgresql://placeholder@127.0.0.1/x", schema, failover_check_seconds=0.5),
            interval_seconds=0.5,
        )
        data = settings.model_dump(mode="json", exclude_none=True)
        data["store"].pop("dsn")  # secrets come from the environment or mounted files, as in a deployment
        data["logging"] = {"level": "debug", "format": "json"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEUTROWATCH_")}
        if s.auth == "token-env":
            data["fhir"]["auth"] = {"method": "bearer"}
            env["NEUTROWATCH_FHIR__AUTH__BEARER_TOKEN"] = TOKEN
        elif s.auth == "token-file":
            token_file = self.tmp / f"{name}.token"
            token_file.write_text(TOKEN + "\n")
            data["fhir"]["auth"] = {"method": "bearer", "bearer_token_file": str(token_file)}
        else:
            data["fhir"]["auth"] = {
                "method": "smart",
                "smart": {"client_id": "neutrowatch", "private_key_file": str(self.key_file)},
            }
        if s.dsn_via == "env":
            env["NEUTROWATCH_STORE__DSN"] = dsn
        else:
            dsn_file = self.tmp / f"{name}.dsn"
            dsn_file.write_text(dsn + "\n")
            data["store"]["dsn_file"] = str(dsn_file)
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path, env

    def command(self, *args: str, config: Path, env: dict[str, str]) -> tuple[int, str]:
        proc = subprocess.run(
            [sys.executable, "-m", "service", *args, "--config", str(config)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return proc.returncode, proc.stdout + proc.stderr

    def run(
        self, config: Path, env: dict[str, str], until: Callable[[int | None, str], bool]
    ) -> tuple[int, dict[str, str]]:
        """`run` until /readyz answers as `until` wants (at most 60 s); then every endpoint, SIGTERM."""
        port = _free_port()
        log = self.tmp / f"{config.stem}-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service", "run", "--config", str(config)],
                cwd=ROOT,
                env={**env, "NEUTROWATCH_WEB__PORT": str(port)},
                stdout=out,
                stderr=out,
            )
            try:
                deadline = time.monotonic() + 60
                while (
                    time.monotonic() < deadline
                    and proc.poll() is None
                    and not until(*_get(f"http://127.0.0.1:{port}/readyz"))
                ):
                    time.sleep(0.2)
                bodies = {
                    f"/{name}": _get(f"http://127.0.0.1:{port}/{name}")[1]
                    for name in ("readyz", "healthz", "metrics")
                }
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=20)
        return code, {**bodies, "log": log.read_text()}

    def reload_engine(self) -> None:
        self.engine.reset()
        put_all(self.engine.base_url, population(patients=4, days=28, seed=8), token=TOKEN)

    def surfaces(self, name: str) -> dict[str, str]:
        if name in self.outputs:
            return self.outputs[name]
        s = SCENARIOS[name]
        base = self.engine.base_url
        out: dict[str, str] = {}
        config, env = self.config(s, name, base, self.dsn(s))
        if s.malformed:
            for command in REFUSED:  # refused at start-up: exit 2, the field named
                code, out[command] = self.command(command, config=config, env=env)
                assert code == 2, out[command]
            self.outputs[name] = out
            return out
        self.reload_engine()
        for args in (["check-config"], ["check-config", "--probe"]):
            code, out[" ".join(args)] = self.command(*args, config=config, env=env)
            assert code == (1 if s.auth == "smart" and args[-1] == "--probe" else 0), out[" ".join(args)]
        code, out["once"] = self.command("once", config=config, env=env)
        assert code == (1 if s.auth == "smart" else 0), out["once"]
        self.reload_engine()
        config, env = self.config(s, name + "-run", base, self.dsn(s))
        settled = (
            (lambda status, body: "SMART discovery" in body)
            if s.auth == "smart"
            else (lambda status, body: status == 200 and "last successful poll" in body)
        )
        code, run = self.run(config, env, settled)
        assert code == 0, run["log"][-2000:]
        out.update({f"run: {k}": v for k, v in run.items()})

        config, env = self.config(s, name + "-fhir-down", f"http://{DOWN}/fhir", self.dsn(s))
        code, out["once, FHIR server down"] = self.command("once", config=config, env=env)
        assert code != 0
        config, env = self.config(s, name + "-db-down", base, self.dsn(s, DOWN))
        code, out["once, database down"] = self.command("once", config=config, env=env)
        assert code != 0
        code, run = self.run(config, env, lambda status, body: "state store unavailable" in body)
        out["run, database down: log"], out["run, database down: /readyz"] = run["log"], run["/readyz"]
        self.outputs[name] = out
        return out


@pytest.fixture(scope="module")
def harness(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    ok, reason = engine_available()
    if not ok:
        if os.environ.get("CI", "").strip().lower() in {"true", "1"}:
            pytest.fail(reason)
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("secrets")
    server_token = tmp / "engine-token"
    server_token.write_text(TOKEN)
    key_file = tmp / "smart-key.pem"
    key_file.write_bytes(KEY_PEM)
    key_file.chmod(0o600)
    with FhirEngine(bearer_token_file=server_token) as engine:
        h = Harness(tmp, engine, pg_dsn, key_file)
        yield h
    for schema in h.schemas:
        asyncio.run(_drop(pg_dsn, schema))


KEY_PEM = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)


def _secrets() -> list[str]:
    """Each secret, and pieces of it (a message that cut or re-wrapped a secret still leaks it)."""
    body = "".join(KEY_PEM.decode().splitlines()[1:-1])
    return [
        TOKEN,
        TOKEN[4:14],
        TOKEN[-10:],
        PASSWORD,
        PASSWORD[3:13],
        PASSWORD[-8:],
        *(body[i : i + 24] for i in range(0, len(body) - 24, 300)),
    ]


@pytest.mark.parametrize(("scenario", "surface"), CASES, ids=[f"{n} | {s}" for n, s in CASES])
def test_no_secret_in_any_output(harness: Harness, scenario: str, surface: str) -> None:
    """For each way of giving a secret (and each malformed DSN), the named output shows what it
    should (host, port, database; the field of a refused value) and no secret, nor a piece of one."""
    text = harness.surfaces(scenario)[surface]
    assert re.search(_evidence(SCENARIOS[scenario], surface), text, re.MULTILINE), (
        f"{surface} did not show what it should:\n{text[-3000:]}"
    )
    for secret in _secrets():
        assert secret not in text, f"a secret (or a piece of one) appeared in {surface}"


# -- the bearer token file, rotated -----------------------------------------------------------------


def _retries_401() -> float:
    return REGISTRY.get_sample_value("neutrowatch_fhir_retries_total", {"reason": "401"}) or 0.0


async def test_a_rotated_bearer_token_file_is_re_read_on_a_401(tmp_path: Path) -> None:
    """Kubernetes rotates a mounted secret in place. Once the server accepts only the new token, the
    next request's 401 makes the client re-read fhir.auth.bearer_token_file and retry once with the
    new token: no restart, no failed cycle. A token the file does not hold is still a 401 after that
    one retry."""
    ok, reason = engine_available()
    if not ok:
        pytest.skip(reason)
    server_token, client_token = tmp_path / "server-token", tmp_path / "token"
    server_token.write_text("token-one")
    client_token.write_text("token-one\n")
    with FhirEngine(bearer_token_file=server_token) as engine:
        settings = FhirSettings(
            base_url=engine.base_url,
            allow_insecure_http=True,
            auth=AuthSettings(method="bearer", bearer_token_file=client_token),
        )
        async with FhirClient(settings) as client:
            assert (await client.metadata())["fhirVersion"] == "4.0.1"
            server_token.write_text("token-two")  # the server side rotates first ...
            staged = tmp_path / "token.new"
            staged.write_text("token-two\n")
            staged.replace(client_token)  # ... and the kubelet swaps the mounted file
            before = _retries_401()
            assert (await client.metadata())["fhirVersion"] == "4.0.1"
            assert _retries_401() == before + 1
            assert (await client.metadata())["fhirVersion"] == "4.0.1"  # the new token is kept
            assert _retries_401() == before + 1
            server_token.write_text("token-three")  # the file is not updated: one retry, then the 401
            with pytest.raises(FhirHttpError) as caught:
                await client.metadata()
            assert caught.value.status == 401 and _retries_401() == before + 2


# -- the SQLite state file ---------------------------------------------------------------------------


async def test_sqlite_state_file_is_created_0600(tmp_path: Path) -> None:
    """The state file holds patient references and results: it and its -wal and -shm files are
    created readable by the owner only, whatever the umask; a file an older release left readable
    by others is restricted on open."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "state" / "neutrowatch.sqlite3"
        store = SqliteStore(path)
        await store.open()
        try:
            assert await store.lead()
            files = [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
            assert Path(f"{path}-wal") in files
            assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
        finally:
            await store.close()
        path.chmod(0o644)
        store = SqliteStore(path)
        await store.open()
        await store.close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)
