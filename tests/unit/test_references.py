"""One canonical spelling of a reference (service/fhir/references.py, through
observations.canonical_reference): one patient is one key however its results write it, and a
subject that names no patient on the service's server is refused with a reason.

Sources: FHIR R4 references.html#literal (relative references are relative to the service base URL;
"/_history/<version>" makes a version-specific reference to the same resource; contained "#id"),
bundle.html#references (urn:uuid: names an entry of the Bundle being processed), RFC 3986 §6.2.2.1
and §6.2.3 (scheme and host are case-insensitive; the path is not; an empty path and a default port
are the same URL)."""

from __future__ import annotations

import msgspec
import pytest

from service.config import Settings
from service.core.observations import (
    LabResult,
    ReadPolicy,
    Rejected,
    canonical_reference,
    literal_reference,
    normalise,
    undecodable_rejection,
)
from service.fhir import model
from service.fhir.references import Resolved, base_key, patient_reference
from tests.builders import observation

BASE = "https://fhir.example.org/fhir/R4"
PARTNER = "https://partner.example.net/fhir"
POLICY = ReadPolicy(base_url=BASE, accepted_foreign_bases=(PARTNER,))
OTHER = "is on another server"
NOT_PATIENT = "is not a Patient reference"
CONTAINED = "is a contained reference, which names no resource on the server"
URN_UUID = "is a urn:uuid: reference, which names no resource on the server"

# (subject as written, the patient key or the reason it is refused). Base with a path prefix
# (https://h/fhir/R4) and an accepted foreign base, as configured above.
CASES = [
    ("Patient/h20", "Patient/h20"),  # relative: relative to the service base
    ("Patient/h20/_history/1", "Patient/h20"),  # versioned: the same resource
    (f"{BASE}/Patient/h20", "Patient/h20"),  # absolute under the base: the relative reference
    (f"{BASE}/Patient/h20/_history/7", "Patient/h20"),  # ... and versioned
    ("HTTPS://FHIR.Example.ORG/fhir/R4/Patient/h20", "Patient/h20"),  # scheme and host case-insensitive
    ("https://fhir.example.org:443/fhir/R4/Patient/h20", "Patient/h20"),  # the default port
    ("https://fhir.example.org/FHIR/r4/Patient/h20", OTHER),  # the path is case-sensitive: another base
    ("http://fhir.example.org/fhir/R4/Patient/h20", OTHER),  # http and https are two bases
    ("https://fhir.example.org/Patient/h20", OTHER),  # the same host without the base's path
    ("https://fhir.example.org/fhir/R4/extra/Patient/h20", OTHER),  # a longer path
    ("https://evil.example.com/Patient/x", OTHER),  # another server
    ("https://evil.example.com/Patient/x/_history/2", OTHER),
    (f"{PARTNER}/Patient/x", f"{PARTNER}/Patient/x"),  # an accepted foreign base: the absolute key
    (f"{PARTNER}/Patient/x/_history/3", f"{PARTNER}/Patient/x"),  # ... without its version
    ("https://PARTNER.example.net/fhir/Patient/x", f"{PARTNER}/Patient/x"),  # ... host case normalised
    ("#p1", CONTAINED),  # contained: names a resource inside the Observation only
    ("urn:uuid:5f2d8c1e-3a0b-4c7d-9e8f-1a2b3c4d5e6f", URN_UUID),  # a Bundle entry, not a server resource
    ("URN:UUID:5f2d8c1e-3a0b-4c7d-9e8f-1a2b3c4d5e6f", URN_UUID),
    ("urn:oid:1.2.3", "is a urn:oid: reference, which names no resource on the server"),
    ("Group/ward-7", NOT_PATIENT),  # not a Patient
    (f"{BASE}/Group/ward-7", NOT_PATIENT),
    ("Patient/", NOT_PATIENT),
    ("Patient/h20/", NOT_PATIENT),
    ("Patient/a b", NOT_PATIENT),  # not a FHIR id
    ("ftp://fhir.example.org/fhir/R4/Patient/h20", NOT_PATIENT),  # not an http(s) base
    ("https://fhir.example.org/fhir/R4?x=1/Patient/h20", NOT_PATIENT),  # a base has no query
    ("Patient/" + "p" * 600, NOT_PATIENT),  # longer than any reference
    ("", NOT_PATIENT),
    (None, NOT_PATIENT),
]


@pytest.mark.parametrize(("ref", "want"), CASES)
def test_a_subject_is_one_canonical_key_or_a_reason(ref, want):
    """Each spelling of one patient on the service's server is "Patient/<id>"; an accepted foreign
    base keeps the absolute reference (normalised, unversioned); anything else is a reason."""
    got = canonical_reference(ref, "Patient", POLICY)
    assert (got.key if isinstance(got, Resolved) else got) == want


@pytest.mark.parametrize(
    "base", [BASE, BASE + "/", BASE + "//", "HTTPS://FHIR.EXAMPLE.ORG/fhir/R4", " " + BASE + " "]
)
def test_the_configured_base_matches_with_a_trailing_slash_and_in_any_host_case(base):
    """The configured base is matched after normalising a trailing slash and scheme/host case."""
    got = canonical_reference(f"{BASE}/Patient/h20/_history/1", "Patient", ReadPolicy(base_url=base))
    assert isinstance(got, Resolved) and (got.key, got.foreign, got.local_id) == ("Patient/h20", False, "h20")


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://H.example/fhir/R4/", "https://h.example/fhir/R4"),
        ("http://h.example:80", "http://h.example"),
        ("https://h.example:8443/x", "https://h.example:8443/x"),
        ("https://h.example?x=1", None),
        ("h.example/fhir", None),
        ("https://", None),
    ],
)
def test_base_keys(url, key):
    """Two spellings of one base have one key (RFC 3986 §6.2.2.1, §6.2.3); a non-URL has none."""
    assert base_key(url) == key


def test_without_a_base_every_absolute_reference_is_foreign_unless_accepted():
    """Replay without fhir.base_url has no server: an absolute reference names one it does not know."""
    none = ReadPolicy()
    assert canonical_reference(f"{BASE}/Patient/h20", "Patient", none) == OTHER
    assert canonical_reference("Patient/h20/_history/2", "Patient", none).key == "Patient/h20"  # type: ignore[union-attr]  # a same-server reference
    accepted = ReadPolicy(accepted_foreign_bases=(BASE + "/",))
    got = canonical_reference(f"{BASE}/Patient/h20", "Patient", accepted)
    assert (
        isinstance(got, Resolved)
        and got.foreign
        and got.local_id is None
        and got.key == f"{BASE}/Patient/h20"
    )


def test_the_patient_key_of_an_observation_is_canonical_and_a_foreign_subject_is_rejected():
    """normalise: the three spellings of one patient give one key; a subject on another server, a
    contained or a urn:uuid: subject is a rejection with its reason (never a result that could alert)."""

    def read(subject: str) -> LabResult | Rejected:
        out = normalise(msgspec.convert(observation("751-8", 0.3, patient=subject), model.Resource), POLICY)
        assert isinstance(out, LabResult | Rejected)
        return out

    keys = {read(s).patient for s in ("Patient/h20", "Patient/h20/_history/1", f"{BASE}/Patient/h20")}
    assert keys == {"Patient/h20"}
    assert isinstance(read("Patient/h20"), LabResult)
    for subject, reason in [
        ("https://evil.example.com/Patient/x", "subject is on another server"),
        ("#p1", "subject " + CONTAINED),
        ("urn:uuid:5f2d8c1e-3a0b-4c7d-9e8f-1a2b3c4d5e6f", "subject " + URN_UUID),
    ]:
        out = read(subject)
        assert isinstance(out, Rejected) and (out.reason, out.patient) == (reason, None), subject
    assert read(f"{PARTNER}/Patient/x/_history/1").patient == f"{PARTNER}/Patient/x"


def test_orders_and_specimens_are_canonical_and_foreign_ones_are_left_out():
    """basedOn and specimen get the same treatment: a version or the local base does not make another
    order or specimen (panels join on the specimen), and another server's are not the local ones."""
    obs = observation(
        "751-8",
        0.3,
        specimen=f"{BASE}/Specimen/s1/_history/2",
        basedOn=[
            {"reference": "ServiceRequest/o1/_history/1"},
            {"reference": f"{BASE}/ServiceRequest/o2"},
            {"reference": "https://evil.example.com/ServiceRequest/o3"},
            {"reference": "#o4"},
            {"reference": f"{PARTNER}/ServiceRequest/o5"},
        ],
    )
    out = normalise(msgspec.convert(obs, model.Resource), POLICY)
    assert isinstance(out, LabResult)
    assert out.specimen == "Specimen/s1"
    assert out.based_on == ("ServiceRequest/o1", "ServiceRequest/o2", f"{PARTNER}/ServiceRequest/o5")
    foreign = normalise(
        msgspec.convert(
            observation("751-8", 0.3, specimen="https://evil.example.com/Specimen/s1"), model.Resource
        ),
        POLICY,
    )
    assert isinstance(foreign, LabResult) and foreign.specimen is None
    assert literal_reference("https://evil.example.com/Specimen/s1", POLICY) is None


def test_an_undecodable_entry_keeps_the_canonical_patient_only():
    """An entry that could not be decoded keeps its subject as the patient's key, or none."""

    def patient(subject: str) -> str | None:
        return undecodable_rejection(
            model.Undecodable("malformed", "Observation", "x", subject), POLICY
        ).patient

    assert patient(f"{BASE}/Patient/h20/_history/1") == "Patient/h20"
    assert patient("https://evil.example.com/Patient/h20") is None
    assert patient("#p1") is None
    assert patient(f"{PARTNER}/Patient/x") == f"{PARTNER}/Patient/x"
    assert (
        patient_reference("https://evil.example.com/Patient/h20") == "https://evil.example.com/Patient/h20"
    )  # kept to be resolved
    assert patient_reference("Group/1") is None


def test_settings_hand_the_bases_to_the_core():
    """fhir.base_url and fhir.accepted_foreign_bases reach the ReadPolicy; a foreign base that is not
    a base URL, or that is the service's own base, is a configuration error."""
    s = Settings(fhir={"base_url": BASE + "/", "accepted_foreign_bases": [PARTNER + "/"]})
    assert (s.read_policy.base_url, s.read_policy.accepted_foreign_bases) == (BASE, (PARTNER,))
    assert Settings().read_policy.base_url is None
    with pytest.raises(ValueError, match="accepted_foreign_bases"):
        Settings(fhir={"base_url": BASE, "accepted_foreign_bases": ["partner.example.net"]})
    with pytest.raises(ValueError, match="lists base_url itself"):
        Settings(fhir={"base_url": BASE, "accepted_foreign_bases": ["HTTPS://fhir.example.org/fhir/R4/"]})
