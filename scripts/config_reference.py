#!/usr/bin/env python3
"""Generate docs/configuration.md: every section and field of service.config.Settings — its dotted
name, environment variable, type, default, constraints and description — from the model itself, so the
reference cannot drift from the code.

    python scripts/config_reference.py           # write the file
    python scripts/config_reference.py --check   # exit 1 (with a diff) if the committed file is stale

Secret fields (type SecretStr) are documented as "secret: from the environment or a file"; no value of
them is ever read. tests/unit/test_config_reference.py runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"

sys.path.insert(0, str(ROOT))

import annotated_types as at  # noqa: E402 - after the sys.path line above
from pydantic import BaseModel, SecretStr  # noqa: E402 - after the sys.path line above
from pydantic.fields import FieldInfo  # noqa: E402 - after the sys.path line above
from pydantic_core import PydanticUndefined  # noqa: E402 - after the sys.path line above

from service.config import ENV_PREFIX, Settings  # noqa: E402 - after the sys.path line above
from service.core.grading import BUILT_IN  # noqa: E402 - after the sys.path line above

SECRET = "secret: from the environment or a file"
# Choices a field validator enforces (not visible in the field's type), by dotted name.
VALIDATED_CHOICES: dict[str, list[str]] = {"grading.scheme": sorted(BUILT_IN)}
# Rules the model validators enforce across fields, each with a configuration it refuses
# (tests/unit/test_config_reference.py checks that every example is still refused).
CROSS_FIELD: list[tuple[str, dict[str, Any]]] = [
    (
        "`fhir.base_url` must start with `https://`; `http://` only with `fhir.allow_insecure_http: true`.",
        {"fhir": {"base_url": "http://fhir.example.org/r4"}},
    ),
    (
        "`fhir.auth.method: bearer` needs `fhir.auth.bearer_token` (environment) or "
        "`fhir.auth.bearer_token_file`.",
        {"fhir": {"auth": {"method": "bearer"}}},
    ),
    (
        "`fhir.auth.method: smart` needs `fhir.auth.smart.client_id` and `fhir.auth.smart.private_key_file`.",
        {"fhir": {"auth": {"method": "smart"}}},
    ),
    (
        "`store.backend: postgres` needs `store.dsn` (environment) or `store.dsn_file`.",
        {"store": {"backend": "postgres"}},
    ),
    (
        "`alerts.recipients` must be Practitioner, PractitionerRole, CareTeam, Organization or Group "
        "references.",
        {"alerts": {"recipients": ["Patient/1"]}},
    ),
]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _args(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation)


def _is_union(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union


def is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(is_secret(a) for a in _args(annotation))


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type."""
    if annotation is type(None):
        return "null"
    if _is_union(annotation):
        return " or ".join(type_name(a) for a in _args(annotation))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "string"
    if origin in (tuple, list):
        return f"list of {type_name(_args(annotation)[0])}s (JSON in the environment)"
    if origin is dict:
        key, value = _args(annotation)
        return f"mapping of {type_name(key)} to {type_name(value)} (JSON in the environment)"
    names = {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        Path: "file path",
        SecretStr: "secret string",
    }
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "string"
    return getattr(annotation, "__name__", str(annotation))


def _literal_values(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(_args(annotation))
    if _is_union(annotation):
        return [v for a in _args(annotation) for v in _literal_values(a)]
    return []


def _value(value: Any) -> str:
    """A default as it would be written in the YAML file."""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (tuple, list)):
        return "`[]`" if not value else "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    if isinstance(value, str):
        return '`""`' if value == "" else f"`{value}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def default(field: FieldInfo) -> str:
    if is_secret(field.annotation):
        return SECRET
    if field.default is not PydanticUndefined:
        return _value(field.default)
    if field.default_factory is not None:
        return _value(field.default_factory())  # type: ignore[call-arg]  # a factory without arguments
    return "(required)"


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def constraints(name: str, field: FieldInfo) -> str:
    found: list[str] = []
    for m in field.metadata:
        if isinstance(m, at.Gt):
            found.append(f"> {_number(m.gt)}")
        elif isinstance(m, at.Ge):
            found.append(f">= {_number(m.ge)}")
        elif isinstance(m, at.Lt):
            found.append(f"< {_number(m.lt)}")
        elif isinstance(m, at.Le):
            found.append(f"<= {_number(m.le)}")
        elif isinstance(m, at.MinLen):
            found.append(f"at least {m.min_length} long")
        elif isinstance(m, at.MaxLen):
            found.append(f"at most {m.max_length} long")
        elif getattr(m, "pattern", None):
            found.append(f"pattern `{m.pattern}`")
    choices = _literal_values(field.annotation) or VALIDATED_CHOICES.get(name, [])
    if choices:
        found.append("one of " + ", ".join(f"`{c}`" for c in choices))
    return "; ".join(found) or "-"


def env_var(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(p.upper() for p in path)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def sections(
    model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], type[BaseModel], list[tuple[str, FieldInfo]]]]:
    """(path, model, its leaf fields) for the model and each nested section, depth first."""
    leaves: list[tuple[str, FieldInfo]] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is None:
            leaves.append((field.alias or name, field))
        else:
            nested.append((field.alias or name, sub))
    out = [(prefix, model, leaves)] if leaves else []
    for name, sub in nested:
        out.extend(sections(sub, (*prefix, name)))
    return out


HEADER = (
    "<!-- GENERATED by scripts/config_reference.py from service.config.Settings; do not edit by hand\n"
    "     (python scripts/config_reference.py rewrites it; --check compares; "
    "tests/unit/test_config_reference.py). -->\n"
    """\

# Configuration reference

Every setting of neutrowatch, generated from the settings model (`service/config/`).
`config/default.yaml` is the same set of fields as a commented file.

**Where values come from.** Built-in defaults, overridden by a YAML file (`--config FILE`, or the file
named by `NEUTROWATCH_CONFIG`), overridden by the environment: every field is
`NEUTROWATCH_<SECTION>__<FIELD>`, nested with `__` (e.g. `NEUTROWATCH_FHIR__RETRY__MAX_ATTEMPTS=3`).
Lists and mappings are given as JSON in the environment
(`NEUTROWATCH_ALERTS__RECIPIENTS='["CareTeam/oncology"]'`). Unknown fields are refused.

**Validation.** Every value is checked at start-up; an invalid one stops `run`, `once`, `replay` and
`explain` with exit code 2 and one line naming the field. `python -m service check-config --config FILE
[--probe]` checks a file without starting anything.

**Secrets** (the bearer token, the PostgreSQL DSN) are never written in the YAML file: set them in the
environment or point the `*_file` field at a mounted file. The SMART private key is always a file.
"""
)


def render() -> str:
    out = [HEADER]
    for path, model, leaves in sections():
        title = ".".join(path) if path else "(top level)"
        out.append(f"## `{title}`\n")
        doc = (model.__doc__ or "").strip()
        if doc and not doc.startswith(model.__name__ + "("):
            out.append(" ".join(doc.split()) + "\n")
        out.append("| field | environment variable | type | default | constraints | description |")
        out.append("|---|---|---|---|---|---|")
        for name, field in leaves:
            dotted = ".".join((*path, name))
            description = field.description or ""
            if is_secret(field.annotation):
                description = f"{description} Never shown in logs, errors or `check-config`."
            out.append(
                "| "
                + " | ".join(
                    _cell(c)
                    for c in (
                        f"`{dotted}`",
                        f"`{env_var((*path, name))}`",
                        type_name(field.annotation),
                        default(field),
                        constraints(dotted, field),
                        description,
                    )
                )
                + " |"
            )
        out.append("")
    out.append("## Rules across fields\n")
    out.extend(f"- {text}" for text, _example in CROSS_FIELD)
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--check", action="store_true", help="exit 1 if the committed file differs from the generated one"
    )
    p.add_argument("--output", type=Path, default=DOC)
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current == text:
            print(f"{args.output} is up to date")
            return 0
        diff = difflib.unified_diff(
            current.splitlines(), text.splitlines(), "committed", "generated", lineterm="", n=1
        )
        print("\n".join(list(diff)[:80]))
        print(f"{args.output} is stale: run python scripts/config_reference.py", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
