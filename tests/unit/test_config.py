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
