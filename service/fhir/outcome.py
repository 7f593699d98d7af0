"""What a server's OperationOutcome says, read without keeping its free text: a one-line summary of
its codes and element paths for logs and errors, and whether it reports a database serialization
failure (a refusal that succeeds when sent again)."""

from __future__ import annotations

import re
from typing import Any

import orjson

__all__ = ["outcome_summary", "serialization_failure"]

_SERIALIZATION = re.compile(r"\b40001\b|could not serialize access", re.IGNORECASE)
_CODE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_PATH = re.compile(r"^[A-Za-z][A-Za-z0-9_.\[\]()]{0,120}$")


def outcome_summary(body: bytes) -> str:
    """One line from an OperationOutcome, at most 200 characters: per issue its code, the codes of
    its `details` and the element paths (`expression`) it names. Never `diagnostics` or
    `details.text`: servers put free text there, often echoing the resource they refused (a name,
    a value), and this line goes to logs, errors and /readyz."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in doc.get("issue") or ():
        if not isinstance(issue, dict):
            continue
        details = issue.get("details")
        codings = details.get("coding") if isinstance(details, dict) else None
        codes = [c.get("code") for c in codings if isinstance(c, dict)] if isinstance(codings, list) else []
        expression = issue.get("expression")
        paths = expression if isinstance(expression, list) else []
        words = [_token(issue.get("code")), *map(_token, codes), *(f"at {p}" for p in map(_path, paths) if p)]
        parts.append(" ".join(w for w in words if w))
    return "; ".join(p for p in parts if p)[:200]


def _token(value: Any) -> str:
    return value if isinstance(value, str) and _CODE.match(value) else ""


def _path(value: Any) -> str:
    return value if isinstance(value, str) and _PATH.match(value) else ""


def serialization_failure(outcome: Any) -> bool:
    """True when `outcome` (an OperationOutcome as a dict, or a body as bytes) says the server's
    database could not serialize the transaction (PostgreSQL SQLSTATE 40001, "could not serialize
    access"). The free text is searched for the marker only, never kept."""
    if isinstance(outcome, bytes | bytearray):
        try:
            outcome = orjson.loads(outcome) if outcome.strip() else None
        except (orjson.JSONDecodeError, RecursionError):
            return False
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return False
    for issue in outcome.get("issue") or ():
        if not isinstance(issue, dict):
            continue
        found = issue.get("details")
        details = found if isinstance(found, dict) else {}
        listed = details.get("coding")
        codings = listed if isinstance(listed, list) else []
        texts = [
            issue.get("diagnostics"),
            details.get("text"),
            *(c.get("code") for c in codings if isinstance(c, dict)),
        ]
        if any(isinstance(t, str) and _SERIALIZATION.search(t[:2000]) for t in texts):
            return True
    return False
