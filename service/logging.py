"""structlog set-up, done once at the edge. Processors are plain functions in a pipeline.

No PHI in logs: resource ids and codes are fine; names, birth dates, free text and values tied to a
person are not. `drop_phi` removes keys that could carry them, whatever a caller passes.

Patient references are pseudonymised by default (`Pseudonyms`): a log line that says "alert decided,
grade severe" for `Patient/123` would tie a clinical value to a person, so every `Patient/<id>` in a
logged value becomes `Patient/~<keyed hash>`. The hash is HMAC-SHA-256 under a key from the
environment or a mounted file, so it is stable within a deployment (an operator correlates lines, and
`python -m service pseudonym Patient/123` tells which pseudonym a known patient has) but cannot be
reversed or recomputed by whoever reads the logs alone. Without a configured key, a random key per
process is used (lines still correlate within one process lifetime) and a warning says so.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

PHI_KEYS = frozenset(
    {
        "name",
        "names",
        "given",
        "family",
        "birthdate",
        "birth_date",
        "address",
        "telecom",
        "text",
        "payload",
        "content",
        "contentstring",
        "note",
        "comment",
        "value_string",
        "valuestring",
        "display",
        # free text of the other resources read (DiagnosticReport, narrative), and contact details
        "conclusion",
        "interpretation",
        "div",
        "narrative",
        "phone",
        "email",
        "dob",
        "body",
    }
)


def drop_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if isinstance(key, str) and key.lower() in PHI_KEYS:
            event_dict[key] = "[redacted]"
        elif isinstance(value, dict | list | tuple):
            event_dict[key] = _redacted(value, 4)
    return event_dict


def _redacted(value: Any, depth: int) -> Any:
    """The same for a value that nests (a resource passed whole): PHI keys at any depth."""
    if depth <= 0:
        return value
    if isinstance(value, dict):
        return {
            k: "[redacted]" if isinstance(k, str) and k.lower() in PHI_KEYS else _redacted(v, depth - 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redacted(v, depth - 1) for v in value]
    return value


# A Patient reference inside any logged text: relative, versioned or absolute.
_PATIENT = re.compile(
    r"(?:https?://[!-~]{1,400}?/)?Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)


class Pseudonyms:
    """`Patient/<id>` -> `Patient/~<16 hex digits of HMAC-SHA-256(key, id)>`."""

    def __init__(self, key: bytes | None):
        self.ephemeral = key is None
        self._key = key if key is not None else secrets.token_bytes(32)

    def of(self, patient_id: str) -> str:
        return "~" + hmac.new(self._key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]

    def text(self, value: str) -> str:
        if "Patient/" not in value:
            return value
        return _PATIENT.sub(lambda m: "Patient/" + self.of(m.group(1)), value)

    def processor(self) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
        def pseudonymise(
            _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
        ) -> MutableMapping[str, Any]:
            for key, value in list(event_dict.items()):
                event_dict[key] = self._value(value, 4)
            return event_dict

        return pseudonymise

    def _value(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if depth <= 0:
            return value
        if isinstance(value, dict):
            return {k: self._value(v, depth - 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._value(v, depth - 1) for v in value]
        return value


class _Stderr:
    """Whatever `sys.stderr` is when a line is written, not when logging was configured (a caller,
    such as a test harness, may have swapped and closed the stream since)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "info", fmt: str = "auto", pseudonyms: Pseudonyms | None = None) -> None:
    """`pseudonyms`: how patient references are logged (None: as they are; the operator's choice,
    `logging.patient_references: plain`, which makes the logs PHI)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    privacy: list[Any] = [drop_phi] + ([pseudonyms.processor()] if pseudonyms is not None else [])
    # Libraries that log through the standard library (APScheduler, aiohttp) get the same format.
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                *privacy,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(logging.getLevelNamesMapping()[level.upper()], logging.INFO))
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *privacy,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(
            file=_Stderr()  # type: ignore[arg-type]  # has the write and flush PrintLogger calls
        ),
        cache_logger_on_first_use=True,
    )
