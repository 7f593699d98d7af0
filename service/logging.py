"""structlog set-up, done once at the edge. Processors are plain functions in a pipeline.

No PHI in logs: resource ids and codes are fine; names, birth dates, free text and values tied to a
person are not. `drop_phi` removes keys that could carry them, whatever a caller passes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

PHI_KEYS = frozenset(
    {"name", "names", "given", "family", "birthdate", "birth_date", "address", "telecom", "text",
     "payload", "content", "contentstring", "note", "comment", "value_string", "valuestring", "display",
     # free text of the other resources read (DiagnosticReport, narrative), and contact details
     "conclusion", "interpretation", "div", "narrative", "phone", "email", "dob", "body"}
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
        return {k: "[redacted]" if isinstance(k, str) and k.lower() in PHI_KEYS else _redacted(v, depth - 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, depth - 1) for v in value]
    return value


def configure(level: str = "info", fmt: str = "auto") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    # Libraries that log through the standard library (APScheduler, aiohttp) get the same format.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True), drop_phi],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(logging.getLevelNamesMapping()[level.upper()], logging.INFO))
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_phi,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
