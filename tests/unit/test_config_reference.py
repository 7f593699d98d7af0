"""docs/configuration.md is generated from the settings model (scripts/config_reference.py) and must not
drift from it: every section and field is there with its environment variable, and secrets show no value."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "config_reference.py"


def _generator():
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_up_to_date():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\nrun: python scripts/config_reference.py"


def test_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(
        (ROOT / "docs" / "configuration.md").read_text().replace("poll.interval_seconds", "poll.interval")
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--output", str(stale)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "is stale" in done.stderr


def test_every_field_is_documented_with_its_env_var_and_a_description():
    gen = _generator()
    doc = (ROOT / "docs" / "configuration.md").read_text()
    count = 0
    for path, _model, leaves in gen.sections():
        for name, field in leaves:
            dotted = ".".join((*path, name))
            env = "NEUTROWATCH_" + "__".join(p.upper() for p in (*path, name))
            assert f"| `{dotted}` | `{env}` |" in doc, dotted
            assert field.description, f"{dotted} has no description in service/config/"
            count += 1
    assert count >= 50


def test_secrets_say_where_they_come_from_and_show_no_value(monkeypatch):
    monkeypatch.setenv("NEUTROWATCH_STORE__DSN", "postgresql://nw:hunter2@db/nw")
    monkeypatch.setenv("NEUTROWATCH_FHIR__AUTH__BEARER_TOKEN", "tok-s3cret")
    text = _generator().render()
    assert "hunter2" not in text and "tok-s3cret" not in text
    for field in ("fhir.auth.bearer_token", "store.dsn"):
        (row,) = [line for line in text.splitlines() if line.startswith(f"| `{field}` |")]
        assert "secret: from the environment or a file" in row


@pytest.mark.parametrize("rule", range(len(_generator().CROSS_FIELD)))
def test_the_cross_field_rules_documented_are_enforced(rule):
    _text, refused = _generator().CROSS_FIELD[rule]
    with pytest.raises(ValidationError):
        Settings(**refused)
