"""The FHIR time grammar (FHIR R4 datatypes, https://hl7.org/fhir/R4/datatypes.html#primitive: the
regular expressions of date, dateTime and instant) and what it means for a collection time."""

from __future__ import annotations

import pytest

from service.fhir.fhirtime import (
    NO_TIME_OF_DAY,
    NO_TIMEZONE,
    NOT_A_TIME,
    TimeError,
    collection_time,
    instant_us,
    is_date_time,
    to_epoch_us,
)

Z = 1_768_204_800_000_000  # 2026-01-12T08:00:00Z

# (text, epoch microseconds or the reason it is not a collection time). Expected values: the dateTime
# regex of the FHIR R4 datatypes page ("If hours and minutes are specified, a timezone offset SHALL be
# populated"; seconds are required; the offset is Z or +/-hh:mm up to 14:00).
COLLECTION = [
    ("2026-01-12T08:00:00Z", Z),
    ("2026-01-12T09:00:00+01:00", Z),
    ("2026-01-12T03:00:00-05:00", Z),
    ("2026-01-12T08:00:00.5Z", Z + 500_000),
    ("2026-01-12T08:00:00.123456789Z", Z + 123_456),  # more digits than a microsecond: truncated
    ("2026-01-12T22:00:00+14:00", Z),  # the largest offset the regex allows
    ("2016-12-31T23:59:60Z", 1_483_228_800_000_000),  # a leap second: the next second's start
    ("2026-01-12T08:00:00", NO_TIMEZONE),
    ("2026-01-12T08:00Z", NOT_A_TIME),
    ("2026-01-12T08:00:00.Z", NOT_A_TIME),
    ("2026-01-12 08:00:00Z", NOT_A_TIME),
    ("2026-01-12T08:00:00+0100", NOT_A_TIME),
    ("2026-01-12T08:00:00+01", NOT_A_TIME),
    ("20260112T080000Z", NOT_A_TIME),
    ("2026-01-12T08", NOT_A_TIME),
    ("2026-01-12T08:00:00 Z", NOT_A_TIME),
    ("2026-01-12T08:00:00+14:30", NOT_A_TIME),
    ("2026-01-12T24:00:00Z", NOT_A_TIME),
    ("2026-02-30T08:00:00Z", NOT_A_TIME),  # matches the regex, is no day of the calendar
    ("2026-01", NO_TIME_OF_DAY),
    ("2026-01-12", NO_TIME_OF_DAY),
    ("2026", NO_TIME_OF_DAY),
    ("", NOT_A_TIME),
    ("2" * 100, NOT_A_TIME),
]


@pytest.mark.parametrize(("text", "expected"), COLLECTION)
def test_collection_time_grammar(text: str, expected: int | str) -> None:
    """A collection time is a FHIR dateTime down to the second with its offset; anything else is
    refused with the reason a rejection carries (never read as UTC)."""
    if isinstance(expected, int):
        assert collection_time(text).us == expected
        assert is_date_time(text)
    else:
        with pytest.raises(TimeError) as err:
            collection_time(text)
        assert str(err.value) == expected


@pytest.mark.parametrize(
    ("text", "zone", "us", "shown"),
    [
        # Europe/Berlin is UTC+1 in January, UTC+2 in July (IANA tz database)
        ("2026-01-12T09:00:00", "Europe/Berlin", Z, "2026-01-12T09:00:00+01:00"),
        ("2026-07-12T10:00:00", "Europe/Berlin", Z + 181 * 86_400_000_000, "2026-07-12T10:00:00+02:00"),
        ("2026-01-12T03:00:00", "America/New_York", Z, "2026-01-12T03:00:00-05:00"),
    ],
)
def test_local_timezone_converts_and_says_so(text: str, zone: str, us: int, shown: str) -> None:
    """With the site's timezone configured, a time without an offset is read in that zone; the
    converted text carries the offset (what writers use) and a note says it was assumed."""
    t = collection_time(text, zone)
    assert (t.us, t.text) == (us, shown)
    assert t.note is not None and zone in t.note
    assert is_date_time(t.text)


def test_a_time_with_an_offset_ignores_the_local_timezone() -> None:
    """An offset in the data always wins over the configured zone, and nothing is noted."""
    t = collection_time("2026-01-12T08:00:00Z", "Europe/Berlin")
    assert (t.us, t.note) == (Z, None)


def test_instants_need_a_full_time_and_an_offset() -> None:
    """meta.lastUpdated is an instant: no partial dates, no time without an offset."""
    assert instant_us("2026-01-12T08:00:00.000Z") == Z
    for text in ("2026-01-12", "2026-01-12T08:00:00", "2026-01-12T08:00Z"):
        with pytest.raises(TimeError):
            instant_us(text)


def test_dates_still_read_as_their_first_instant() -> None:
    """Birth dates and search bounds may be partial dates: their first instant in UTC."""
    assert to_epoch_us("1970-01-02") == 86_400_000_000
    assert to_epoch_us("1970") == 0
    with pytest.raises(TimeError):
        to_epoch_us("2026-01-12T08:00:00")
