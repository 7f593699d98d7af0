"""Launcher for the in-memory FHIR test engine (``tests/fhir_server/server.mjs``).

The engine is a Node.js process wrapping Medplum's FhirRouter + MemoryRepository. This module
starts it on a free port, waits for its ``LISTENING <url>`` line and stops it again. It only uses
the standard library and never needs an event loop, so it works from sync and async tests alike::

    with FhirEngine() as engine:
        engine.reset()
        ...  # talk FHIR to engine.base_url

Prerequisites: ``node`` (>= 20) on PATH (or in ``$NEUTROWATCH_NODE``) and
``tests/fhir_server/node_modules`` installed with ``make install`` (``npm ci --prefix tests/fhir_server``).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["EngineError", "EngineUnavailable", "FhirEngine", "engine_available"]

ENGINE_DIR = Path(__file__).resolve().parent
SERVER_SCRIPT = ENGINE_DIR / "server.mjs"
NODE_MODULES = ENGINE_DIR / "node_modules"
# One package whose presence shows that `npm ci` ran; the server imports all three.
_SENTINEL_PACKAGE = NODE_MODULES / "@medplum" / "fhir-router" / "package.json"
MIN_NODE_MAJOR = 20
_LISTENING = re.compile(r"^LISTENING (http://\S+)$")
_INSTALL_HINT = "run `make install` (it runs `npm ci --prefix tests/fhir_server`)"


class EngineError(RuntimeError):
    """The engine's prerequisites are present but it failed to start, answer or stop."""


class EngineUnavailable(EngineError):
    """Node.js or the engine's npm packages are missing, so the engine cannot run here."""


def _node_executable() -> str | None:
    return os.environ.get("NEUTROWATCH_NODE") or shutil.which("node")


def _node_major(node: str) -> int | None:
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"v(\d+)\.", out.strip())
    return int(match.group(1)) if match else None


def engine_available() -> tuple[bool, str]:
    """Return ``(True, "")`` if the engine can be started, else ``(False, reason)``."""
    node = _node_executable()
    if node is None:
        return (
            False,
            "FHIR test engine unavailable: `node` not found on PATH; "
            f"install Node.js >= {MIN_NODE_MAJOR}, then {_INSTALL_HINT}",
        )
    major = _node_major(node)
    if major is None:
        return (
            False,
            f"FHIR test engine unavailable: could not run `{node} --version`; "
            f"install Node.js >= {MIN_NODE_MAJOR}, then {_INSTALL_HINT}",
        )
    if major < MIN_NODE_MAJOR:
        return (
            False,
            f"FHIR test engine unavailable: Node.js v{major} at {node} is too old (need >= {MIN_NODE_MAJOR})",
        )
    if not _SENTINEL_PACKAGE.is_file():
        return (
            False,
            f"FHIR test engine unavailable: {NODE_MODULES} is missing or incomplete; {_INSTALL_HINT}",
        )
    return True, ""


class FhirEngine:
    """A running (or startable) FHIR test engine process."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        batch_transactions: bool = False,
        bearer_token_file: Path | None = None,
        quota_points_per_minute: int | None = None,
        quota_window_seconds: float | None = None,
        conflict_every: int | None = None,
    ) -> None:
        """`batch_transactions`: process a `transaction` Bundle as a batch (mixed entry statuses,
        the successful entries kept), as Medplum does for a project without transaction bundles."""
        self.host = host
        self.port = port
        self.verbose = verbose
        self.batch_transactions = batch_transactions
        self.bearer_token_file = (
            bearer_token_file  # requests must carry this file's token (re-read each request)
        )
        # Medplum-style quota: points per window (write 100, search 20, read 10), 429 without Retry-After
        self.quota_points_per_minute = quota_points_per_minute
        self.quota_window_seconds = quota_window_seconds  # the quota's window; 60 s unless given
        self.conflict_every = (
            conflict_every  # every Nth conditional create answers 409 (serialization failure)
        )
        self.base_url: str = ""
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._log_file: tempfile._TemporaryFileWrapper[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> str:
        """Start the engine and return its base URL once it accepts requests."""
        if self._proc is not None and self._proc.poll() is None:
            return self.base_url
        ok, reason = engine_available()
        if not ok:
            raise EngineUnavailable(reason)
        node = _node_executable()
        assert node is not None

        args = [node, str(SERVER_SCRIPT), "--port", str(self.port), "--host", self.host, "--exit-with-stdin"]
        if self.verbose:
            args.append("--verbose")
        if self.batch_transactions:
            args.append("--batch-transactions")
        if self.bearer_token_file is not None:
            args += ["--bearer-token-file", str(self.bearer_token_file)]
        if self.quota_points_per_minute is not None:
            args += ["--quota-points-per-minute", str(self.quota_points_per_minute)]
        if self.quota_window_seconds is not None:
            args += ["--quota-window-seconds", str(self.quota_window_seconds)]
        if self.conflict_every is not None:
            args += ["--conflict-every", str(self.conflict_every)]
        # stderr goes to a file, never to an undrained pipe (a full pipe would block the server).
        self._log_file = tempfile.NamedTemporaryFile(prefix="fhir-engine-", suffix=".log", delete=False)
        started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                args,
                cwd=ENGINE_DIR,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log_file,
                text=True,
            )
        except OSError as exc:
            self._cleanup_log()
            raise EngineUnavailable(f"FHIR test engine unavailable: cannot run {node}: {exc}") from exc

        line = self._read_first_line(timeout)
        match = _LISTENING.match(line.strip()) if line else None
        if match is None:
            exited = self._proc.poll()
            log = self.log_tail()
            self.stop()
            what = (
                f"exited with code {exited}"
                if exited is not None
                else f"did not report LISTENING within {timeout:.0f}s"
            )
            raise EngineError(f"FHIR test engine {what}; stdout: {line!r}; stderr:\n{log}")
        self.base_url = match.group(1)
        self.startup_seconds = time.monotonic() - started
        atexit.register(self.stop)
        return self.base_url

    def _read_first_line(self, timeout: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue(maxsize=1)
        stdout = self._proc.stdout
        threading.Thread(
            target=lambda: lines.put(stdout.readline()), name="fhir-engine-stdout", daemon=True
        ).start()
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            return ""

    def stop(self) -> None:
        """Stop the engine: SIGTERM, then SIGKILL if it has not exited after 5 seconds."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        self._cleanup_log()

    def _cleanup_log(self) -> None:
        log_file, self._log_file = self._log_file, None
        if log_file is not None:
            log_file.close()
            try:
                os.unlink(log_file.name)
            except OSError:
                pass

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, max_chars: int = 4000) -> str:
        """The last part of the engine's stderr (request log with ``verbose=True``, errors always)."""
        if self._log_file is None:
            return ""
        try:
            text = Path(self._log_file.name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-max_chars:]

    # -- admin -------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Discard every resource (``POST /$reset``): a fresh, empty repository."""
        if not self.running:
            raise EngineError("FHIR test engine is not running; call start() first")
        request = urllib.request.Request(f"{self.base_url}/$reset", data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise EngineError(f"FHIR test engine reset failed: {exc}\n{self.log_tail()}") from exc

    def fault(self, resource_type: str, *, times: int | str = 1, contains: str | None = None) -> None:
        """Make the next `times` ("always": every) creates or updates of `resource_type` whose JSON
        holds `contains` fail for real with 409 (``POST /$fault``); ``reset()`` or
        ``clear_faults()`` disarms them."""
        body = {"resourceType": resource_type, "times": times, **({"contains": contains} if contains else {})}
        self._admin("POST", "/$fault", json.dumps(body).encode())

    def clear_faults(self) -> None:
        self._admin("DELETE", "/$fault", None)

    def _admin(self, method: str, path: str, data: bytes | None) -> None:
        if not self.running:
            raise EngineError("FHIR test engine is not running; call start() first")
        request = urllib.request.Request(
            f"{self.base_url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise EngineError(f"FHIR test engine {method} {path} failed: {exc}\n{self.log_tail()}") from exc

    def stats(self) -> dict[str, Any]:
        """Counters since start or the last reset (``GET /$stats``): ``requests`` (FHIR requests, not
        the admin endpoints or /metadata), ``throttled`` (answered 429 by the quota), ``conflicts``
        (answered 409 by ``conflict_every``), ``conditionalCreates``, ``points`` (quota points spent)."""
        if not self.running:
            raise EngineError("FHIR test engine is not running; call start() first")
        try:
            with urllib.request.urlopen(f"{self.base_url}/$stats", timeout=10) as response:
                return dict(json.loads(response.read()))
        except (urllib.error.URLError, OSError) as exc:
            raise EngineError(f"FHIR test engine stats failed: {exc}\n{self.log_tail()}") from exc

    # -- context manager ---------------------------------------------------------------------------

    def __enter__(self) -> FhirEngine:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self.base_url}" if self.running else "stopped"
        state += ", transactions as batches" if self.batch_transactions else ""
        return f"<FhirEngine {state}>"
