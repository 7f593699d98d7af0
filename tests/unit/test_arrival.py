"""service.core.arrival: what the copies read of one Observation come to, next to the version a
store holds; the order of availability and an Observation's panel.

Source of the rule: a FHIR version is immutable, meta.versionId "changes each time the content of
the resource changes" (https://hl7.org/fhir/R4/resource.html#Meta); meta.lastUpdated orders
versions ("when the resource last changed"). Copies are plain (stamp, content, rejected, label)."""

from __future__ import annotations

import itertools

import pytest

from service.core.arrival import Copy, Ruling, Stored, availability_key, panel_key, rule


def _copy(updated_us: int, version: int, content: bytes, label: str, rejected: bool = False) -> Copy[str]:
    return Copy(updated_us, version, content, rejected, label)


def _summary(ruling: Ruling[str]) -> tuple[object, ...]:
    """The ruling with each copy as its label (the stored copy as "stored")."""
    versions = tuple(
        (v.stamp, v.kept.item if v.kept else None, tuple(c.item or "stored" for c in v.conflicting), v.new)
        for v in ruling.versions
    )
    return versions, tuple(c.item for c in ruling.unplaced), ruling.duplicates


@pytest.mark.parametrize(
    ("copies", "expected"),
    [
        # one copy: its version
        ([_copy(100, 1, b"a", "x")], ((((100, 1), "x", (), True),), (), 0)),
        # two versions: both, oldest first, whatever order they were read in
        (
            [_copy(200, 2, b"b", "new"), _copy(100, 1, b"a", "old")],
            ((((100, 1), "old", (), True), ((200, 2), "new", (), True)), (), 0),
        ),
        # one version read twice alike: the first copy, one duplicate
        (
            [_copy(100, 1, b"a", "first"), _copy(100, 1, b"a", "again")],
            ((((100, 1), "first", (), True),), (), 1),
        ),
        # one version read with two contents: a conflict, one copy per content by content key
        (
            [_copy(100, 1, b"b", "b"), _copy(100, 1, b"a", "a")],
            ((((100, 1), None, ("a", "b"), True),), (), 0),
        ),
        # a copy without lastUpdated or versionId next to a stamped one: no version, once per content
        (
            [_copy(100, 1, b"a", "stamped"), _copy(-1, -1, b"u", "u1"), _copy(-1, -1, b"u", "u2")],
            ((((100, 1), "stamped", (), True),), ("u1",), 1),
        ),
        # copies without meta alone: a version (ordered by input position elsewhere)
        ([_copy(-1, -1, b"u", "u")], ((((-1, -1), "u", (), True),), (), 0)),
        # a rejection without meta (an undecodable entry): never a version
        ([_copy(-1, -1, b"r", "r", rejected=True)], ((), ("r",), 0)),
    ],
)
def test_copies_read_together(copies, expected):
    """What the copies of one Observation read in one input (replay) or one batch come to."""
    assert _summary(rule(copies)) == expected


def test_the_ruling_does_not_depend_on_the_order_copies_are_read_in():
    """Every order of a mixed set of copies gives the same versions, conflicts and counts (up to
    which of two alike copies represents them: here alike copies carry one label)."""
    copies = [
        _copy(100, 1, b"a", "a"),
        _copy(100, 1, b"b", "b"),
        _copy(100, 1, b"a", "a"),
        _copy(200, 2, b"c", "c"),
        _copy(-1, -1, b"u", "u"),
    ]
    rulings = {_summary(rule(list(order))) for order in itertools.permutations(copies)}
    assert len(rulings) == 1


@pytest.mark.parametrize(
    ("stored", "copies", "expected"),
    [
        # older than the stored version: nothing
        (Stored(200, 2, b"s", False), [_copy(100, 1, b"a", "old")], ((), (), 0)),
        # the stored version read again alike (the overlap window re-reads): nothing
        (Stored(100, 1, b"a", False), [_copy(100, 1, b"a", "again")], ((), (), 1)),
        # the stored version read with other content: a conflict, the stored copy one of its contents
        (
            Stored(100, 1, b"b", False),
            [_copy(100, 1, b"a", "other")],
            ((((100, 1), None, ("other", "stored"), True),), (), 0),
        ),
        # a stored version whose copies conflicted: a further copy is held back, no new version
        (
            Stored(100, 1, b"!", True),
            [_copy(100, 1, b"a", "more")],
            ((((100, 1), None, ("more",), False),), (), 0),
        ),
        # a stored digest that cannot be compared (another release's): counts as read before
        (Stored(100, 1, None, False), [_copy(100, 1, b"a", "same?")], ((), (), 0)),
        # newer than the stored version: its version
        (Stored(100, 1, b"a", False), [_copy(200, 2, b"b", "new")], ((((200, 2), "new", (), True),), (), 0)),
        # a stamped version stored: a copy without meta is no version of it
        (Stored(100, 1, b"a", False), [_copy(-1, -1, b"u", "u")], ((), ("u",), 0)),
    ],
)
def test_copies_next_to_the_stored_version(stored, copies, expected):
    """What a batch of copies comes to next to the version a live store holds."""
    assert _summary(rule(copies, stored)) == expected


def test_order_of_availability():
    """Stamped versions by lastUpdated, then reference, versionId and input position; versions
    without lastUpdated after all of them, in input order."""
    keys = [
        availability_key("Observation/b", 100, 1, 5),
        availability_key("Observation/a", 100, 2, 9),
        availability_key("Observation/a", 100, 1, 7),
        availability_key("Observation/z", 50, 1, 8),
        availability_key("Observation/a", -1, 3, 2),
        availability_key(None, -1, -1, 1),
    ]
    assert sorted(keys) == [keys[3], keys[2], keys[1], keys[0], keys[5], keys[4]]


@pytest.mark.parametrize(
    ("specimen", "report", "collection", "expected"),
    [
        ("specimen:1", "report:1", "at:1", "specimen:1"),  # the specimen first
        (None, "report:1", "at:1", "report:1"),  # then the DiagnosticReport naming it
        (None, None, "at:1", "at:1"),  # then the collection instant
    ],
)
def test_panel_key_precedence(specimen, report, collection, expected):
    """An Observation's panel: its specimen, else its DiagnosticReport, else its collection instant
    (reference §1.2)."""
    assert panel_key(specimen, report, collection) == expected
