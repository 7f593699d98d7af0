"""What the worker takes from a transaction-response entry: the id of the resource it wrote (the
Provenance names it) and the version (the next versioned PUT's If-Match). Source of the forms:
FHIR R4 http.html#transaction-response (`response.location` "the location header created by
processing this operation", relative or absolute, with or without `_history/<vid>`; `response.etag`
the ETag header, `W/"<vid>"`) and the test engine's answers (tests/fhir_server/README.md: relative,
without `_history`, the resource returned)."""

import pytest

from service.output.transaction import answered_id, answered_version


@pytest.mark.parametrize(
    ("location", "resource", "expected"),
    [
        ("Flag/abc-1", None, "abc-1"),  # the engine's form
        ("Flag/abc-1/_history/2", None, "abc-1"),  # http.html#transaction-response, versioned
        ("https://fhir.example.org/r4/Flag/abc-1/_history/2", None, "abc-1"),  # absolute
        ("https://fhir.example.org/r4/Flag/abc-1/", None, "abc-1"),  # trailing slash
        ("Communication/abc-1", None, None),  # another type's location names no Flag
        ("Flag/has space", None, None),  # not a FHIR id (datatypes.html#id)
        (None, {"resourceType": "Flag", "id": "r-9"}, "r-9"),  # no location: the resource returned
        (None, {"resourceType": "OperationOutcome", "id": "x"}, None),
        (None, None, None),  # neither: the worker searches by identifier
        ("Flag/abc-1", {"resourceType": "Flag", "id": "other"}, "abc-1"),  # the location first
    ],
)
def test_answered_id(location, resource, expected):
    """The Flag's server id from an entry's location, else from the resource answered, else none."""
    assert answered_id("Flag", location, resource) == expected


@pytest.mark.parametrize(
    ("result", "resource", "expected"),
    [
        ({"etag": 'W/"3"', "location": "Flag/a/_history/2"}, None, "3"),  # the ETag first
        ({"location": "Flag/a/_history/2"}, None, "2"),
        (
            {"location": "https://x.org/Flag/a/_history/7f1c-aa"},
            None,
            "7f1c-aa",
        ),  # UUID-style versionIds (Medplum)
        (
            {"location": "Flag/a"},
            {"resourceType": "Flag", "id": "a", "meta": {"versionId": "5"}},
            "5",
        ),  # the engine's form
        ({"location": "Flag/a"}, None, None),  # no version known: the Flag is not remembered
    ],
)
def test_answered_version(result, resource, expected):
    """The version an entry wrote: response.etag, else the location's _history, else meta.versionId."""
    assert answered_version(result, resource) == expected
