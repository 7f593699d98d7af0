"""FHIR date/dateTime/instant strings to UTC epoch microseconds (pure, no clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_epoch_us(text: str) -> int:
    """Parse a FHIR date, dateTime or instant. Partial dates ("2024", "2024-03") mean their first
    instant; a time without an offset is read as UTC. Raises ValueError when it is not a date."""
    n = len(text)
    if n == 4 and text.isdigit():
        dt = datetime(int(text), 1, 1, tzinfo=UTC)
    elif n == 7 and text[4] == "-":
        dt = datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC)
    else:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_epoch_us(us: int) -> str:
    """Epoch microseconds to an ISO instant in UTC with millisecond precision and a Z."""
    dt = _EPOCH + timedelta(microseconds=us)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
