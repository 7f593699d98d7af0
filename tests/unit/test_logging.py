"""Logs: one JSON object per line (ours and the libraries'), PHI keys redacted."""

import json
import logging

import structlog

from service import logging as nw_logging


def test_json_lines_and_phi_redaction(capsys):
    nw_logging.configure("info", "json")
    structlog.get_logger("t").info(
        "observation rejected", observation="Observation/1", name="Jane Doe", birthDate="1970-01-01"
    )
    logging.getLogger("apscheduler.scheduler").warning(
        "Execution of job skipped: maximum number of running instances reached"
    )
    lines = capsys.readouterr().err.strip().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON, the library's too
    assert records[0]["observation"] == "Observation/1"
    assert records[0]["name"] == records[0]["birthDate"] == "[redacted]"
    assert "Jane" not in lines[0] and "1970" not in lines[0]
    assert records[1]["level"] == "warning" and "skipped" in records[1]["event"]
