"""Capture every log line the service writes in-process (structlog and the standard library), as
the service's own configuration renders them (JSON, debug).

structlog caches a module's logger on first use (`cache_logger_on_first_use`), with the renderer and
output file of the configuration at that moment; a test that configures logging later would not
see those modules' lines. So the modules' `log` proxies are swapped for fresh ones for the
duration, and everything is put back afterwards.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from service import logging as nw_logging


@contextmanager
def captured_logs(level: str = "debug") -> Iterator[io.StringIO]:
    saved_config = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buffer = io.StringIO()
    swapped: list[tuple[object, object]] = []
    try:
        nw_logging.configure(level, "json")
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer))
        for handler in root.handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(buffer)
        for name, module in list(sys.modules.items()):
            proxy = getattr(module, "log", None) if name.startswith("service") else None
            args = getattr(proxy, "_logger_factory_args", None)
            if proxy is not None and args is not None:
                swapped.append((module, proxy))
                module.log = structlog.get_logger(*args)  # type: ignore[attr-defined]  # modules with a module-level log
        yield buffer
    finally:
        for module, proxy in swapped:
            module.log = proxy  # type: ignore[attr-defined]  # modules with a module-level log
        structlog.configure(**saved_config)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
