"""Configuration: the shipped files are valid, env overrides the file, bad values name the field."""

from pathlib import Path

import pytest

from service.config import load_settings
from service.errors import ConfigError

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
        ("store:\n  backend: postgres\n", "store: backend 'postgres' needs dsn (NEUTROWATCH_STORE__DSN) or dsn_file"),
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
