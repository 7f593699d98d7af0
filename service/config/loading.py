"""Loading: the YAML file (its path given, or $NEUTROWATCH_CONFIG), validated with the environment
over it; every problem reported as "field: reason", never quoting the value."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from service.config.settings import Settings
from service.errors import ConfigError

CONFIG_ENV = "NEUTROWATCH_CONFIG"


def read_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping (empty for an empty file); a ConfigError naming the file otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


class ConfigProblems(ConfigError):
    """Every problem pydantic found (not only the first), each "field: reason"; `str()` is one line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"config error{source}: {'; '.join(problems)}")


def field_problems(err: ValidationError) -> list[str]:
    """One "field: reason" per error. Never the input: it may be a secret (and hide_input_in_errors
    keeps it out of str(err) as well)."""
    found = []
    for error in err.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = (
            "unknown field"
            if error["type"] == "extra_forbidden"
            else error["msg"].removeprefix("Value error, ")
        )
        found.append(f"{field}: {message}")
    return found


def config_path(path: str | Path | None) -> Path | None:
    """The config file: `path`, else $NEUTROWATCH_CONFIG, else None (the built-in defaults)."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    return Path(path) if path is not None else None


def load_settings(path: str | Path | None = None) -> Settings:
    """Load and validate. `path` None means $NEUTROWATCH_CONFIG if set, else built-in defaults.
    Invalid: ConfigProblems listing every error, each naming its field."""
    config = config_path(path)
    data = read_yaml(config) if config is not None else {}
    try:
        return Settings(**data)
    except ValidationError as err:
        raise ConfigProblems(f" in {config}" if config is not None else "", field_problems(err)) from None
