"""Progress of a long replay on a terminal: one line on stderr, rewritten in place at most twice a
second, and nothing at all when stderr is not a terminal (a log file or a pipe gets only the
summary). Counts and stages only: no patient data."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """Called as `progress(stage, done, total)` by the replay engine after each unit of work."""

    def __init__(
        self, stream: TextIO | None = None, interval: float = 0.5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._shown = -interval
        self._width = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self._shown < self.interval and done < total:
            return
        self._shown = now
        line = f"replay: {stage} {done}/{total}  {now - self.started:.0f} s"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def close(self) -> None:
        """Clear the progress line (the summary table follows)."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
