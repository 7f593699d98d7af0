"""FHIR date, dateTime and instant: one grammar for every time the service reads or writes (pure, no
clock).

The grammar is the one the FHIR R4 datatypes page gives as regular expressions
(https://hl7.org/fhir/R4/datatypes.html#primitive): a dateTime is a year, a year-month, a date, or a
date with a time of day, and a time of day always carries its offset (`Z` or `±hh:mm`, up to 14:00).
An instant is a full date and time with its offset. Anything else (`2026-01-12T08:00:00`,
`2026-01-12T08:00Z`, `2026-01-12 08:00:00Z`, `+0100`, `+01`, a basic-format `20260112T080000Z`) is not a
FHIR time, whatever a permissive ISO parser would make of it.

A collection time (`collection_time`) must name an instant: a date or partial date is rejected, and
a time of day without an offset is rejected unless the site has configured the timezone its
sources write local times in; then it is read in that zone and the decision says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The FHIR R4 regular expressions, split into groups so that one match also yields the fields.
_YEAR = r"(?P<y>[0-9](?:[0-9](?:[0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH = r"(?P<m>0[1-9]|1[0-2])"
_DAY = r"(?P<d>0[1-9]|[1-2][0-9]|3[0-1])"
_TIME = r"(?P<H>[01][0-9]|2[0-3]):(?P<M>[0-5][0-9]):(?P<S>[0-5][0-9]|60)(?:\.(?P<f>[0-9]+))?"
_ZONE = r"(?P<z>Z|[+-](?:(?:0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_DATE_TIME = re.compile(rf"{_YEAR}(?:-{_MONTH}(?:-{_DAY}(?:T{_TIME}{_ZONE})?)?)?")
_INSTANT = re.compile(rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_ZONE}")
# A date and a time of day with no offset: not a FHIR dateTime, but a site may say whose clock it is.
_LOCAL = re.compile(rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}")

NO_TIMEZONE = "effective time has no timezone"
NOT_A_TIME = "effective time is not a FHIR dateTime"
NO_TIME_OF_DAY = "effective time is a date without a time of day"


class TimeError(ValueError):
    """Text that is not the FHIR time asked for; `str(err)` is the reason (never the text itself)."""


@dataclass(frozen=True, slots=True)
class CollectionTime:
    us: int  # epoch microseconds (UTC)
    text: str  # a FHIR dateTime with an offset: as given, or the local time converted
    note: str | None = None  # set when the time had no offset and was read in the site's timezone


def _fields(m: re.Match[str]) -> tuple[int, int, int, int, int, int, int]:
    second = int(m["S"] or 0)
    micro = int(((m["f"] or "") + "000000")[:6])
    return int(m["y"]), int(m["m"] or 1), int(m["d"] or 1), int(m["H"] or 0), int(m["M"] or 0), second, micro


def _build(fields: tuple[int, int, int, int, int, int, int], tz: tzinfo) -> datetime:
    y, mo, d, h, mi, s, us = fields
    leap = s == 60  # a leap second: the spec allows it, datetime does not; it is the next second's start
    dt = datetime(y, mo, d, h, mi, 59 if leap else s, us, tzinfo=tz)  # ValueError: 30 February
    return dt + timedelta(seconds=1) if leap else dt


def _offset(zone: str) -> timedelta:
    if zone == "Z":
        return timedelta(0)
    sign = -1 if zone[0] == "-" else 1
    return sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))


def _us(dt: datetime) -> int:
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _zoned(m: re.Match[str]) -> int:
    try:
        return _us(_build(_fields(m), timezone(_offset(m["z"]))))
    except (ValueError, OverflowError):
        raise TimeError(NOT_A_TIME) from None


def to_epoch_us(text: str) -> int:
    """A FHIR date or dateTime (an instant is one too) as epoch microseconds. A partial date means
    its first instant in UTC (birth dates, search bounds); a time of day must carry its offset.
    Raises TimeError (a ValueError) otherwise."""
    m = _DATE_TIME.fullmatch(text) if len(text) <= 64 else None
    if m is None:
        raise TimeError(NOT_A_TIME)
    if m["z"] is None:
        try:
            return _us(_build(_fields(m), UTC))
        except (ValueError, OverflowError):
            raise TimeError(NOT_A_TIME) from None
    return _zoned(m)


def instant_us(text: str) -> int:
    """A FHIR instant (meta.lastUpdated, effectiveInstant) as epoch microseconds; TimeError otherwise."""
    m = _INSTANT.fullmatch(text) if len(text) <= 64 else None
    if m is None:
        raise TimeError("not a FHIR instant")
    return _zoned(m)


def is_instant(text: str) -> bool:
    """Whether `text` is a FHIR instant (what a writer may put in an instant element)."""
    try:
        instant_us(text)
    except TimeError:
        return False
    return True


def is_date_time(text: str) -> bool:
    """Whether `text` is a FHIR dateTime (what a writer may put in a dateTime element)."""
    return len(text) <= 64 and _DATE_TIME.fullmatch(text) is not None


@lru_cache(maxsize=64)
def local_zone(name: str) -> ZoneInfo:
    """The IANA zone `name`; ValueError naming the problem when the zone database does not know it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {name!r}") from None


def collection_time(text: str, local_timezone: str | None = None) -> CollectionTime:
    """When a specimen was collected: a FHIR dateTime down to the second with its offset. A time of
    day with no offset is read in `local_timezone` when the site configured one (an ambiguous or
    skipped wall time at a daylight-saving change takes the earlier offset, as `fold=0` does), else
    rejected. A date, or a partial date, is not a collection time. Raises TimeError with the reason."""
    m = _DATE_TIME.fullmatch(text) if len(text) <= 64 else None
    if m is not None:
        if m["H"] is None:
            raise TimeError(NO_TIME_OF_DAY)
        return CollectionTime(_zoned(m), text)
    local = _LOCAL.fullmatch(text) if len(text) <= 64 else None
    if local is None:
        raise TimeError(NOT_A_TIME)
    if local_timezone is None:
        raise TimeError(NO_TIMEZONE)
    try:
        dt = _build(_fields(local), local_zone(local_timezone))
    except (ValueError, OverflowError):
        raise TimeError(NOT_A_TIME) from None
    converted = dt.isoformat()
    return CollectionTime(
        _us(dt), converted, f"no offset given: read as {local_timezone} local time ({converted})"
    )


def from_epoch_us(us: int) -> str:
    """Epoch microseconds to an ISO instant in UTC with millisecond precision and a Z."""
    dt = _EPOCH + timedelta(microseconds=us)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
