"""service.core.copies: which copy of an Observation is its version, which are held back.

Source of the rule: a FHIR version is immutable, meta.versionId "changes each time the content of
the resource changes" (https://hl7.org/fhir/R4/resource.html#Meta); two contents under one
(id, versionId, lastUpdated) cannot both be that version."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.copies import UNPLACED, content_key, one_version, placed, unplaced_rejection
from service.core.observations import Rejected
from tests.builders import observation, result


@pytest.mark.parametrize(
    ("updated_us", "version", "rejected", "stamped_read", "expected"),
    [
        (1_000, 2, False, True, True),  # lastUpdated and versionId: a version
        (1_000, -1, False, True, True),  # lastUpdated only (UUID versionIds): ordered by it
        (-1, 3, False, True, True),  # numeric versionId only
        (-1, -1, False, False, True),  # no meta, nothing else read with it: a version (input order)
        (-1, -1, False, True, False),  # no meta, a version with meta read: no version of it
        (-1, -1, True, False, False),  # a rejection without meta (an undecodable entry): never a version
        (1_000, 2, True, True, True),  # a stamped rejection: a rejected version (it supersedes)
    ],
)
def test_placed(updated_us, version, rejected, stamped_read, expected):
    """Whether a copy can be a version of its Observation."""
    assert placed(updated_us, version, rejected, stamped_read) is expected


def test_alike_copies_are_one_version_and_different_ones_conflict():
    """One content: the first copy is the version, the rest duplicates. Two contents: no version,
    one copy per content in order of content key, the rest duplicates."""
    assert one_version([(b"a", 1), (b"a", 2)]).kept == (b"a", 1)
    verdict = one_version([(b"b", 1), (b"a", 2), (b"b", 3)])
    assert (verdict.kept, verdict.conflicting, verdict.duplicates) == (
        None,
        ((b"a", 2), (b"b", 1)),
        ((b"b", 3),),
    )


@given(st.lists(st.sampled_from([b"x", b"y", b"z"]), min_size=1, max_size=6), st.randoms())
def test_the_verdict_does_not_depend_on_the_order_of_the_copies(keys, rng):
    """Which contents conflict, in which order, and how many duplicates: the same for every order."""
    copies = list(enumerate(keys))
    shuffled = list(copies)
    rng.shuffle(shuffled)
    a, b = one_version([(k, n) for n, k in copies]), one_version([(k, n) for n, k in shuffled])
    assert [k for k, _ in a.conflicting] == [k for k, _ in b.conflicting]
    assert (a.kept is None) is (b.kept is None) and len(a.duplicates) == len(b.duplicates)
    assert a.kept is None or a.kept[0] == b.kept[0]  # type: ignore[index]  # kept alike, checked above


def test_a_readable_copy_that_is_no_version_is_reported_as_unplaced_a_rejected_one_keeps_its_reason():
    """A readable copy says why it is not used; a rejected one keeps its own reason."""
    lab = result(observation("751-8", 0.3, id="x"))
    assert unplaced_rejection(lab).reason == UNPLACED and unplaced_rejection(lab).ref == lab.ref
    rejected = Rejected("invalid JSON", "Observation/x")
    assert unplaced_rejection(rejected) is rejected
    assert len(content_key(b"any")) == 16
