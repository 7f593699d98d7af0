"""The decision records and outbox writes as structs: the JSON they are written as is the replay
contract's (CONTRIBUTING.md: fields in their order, present only when they apply, numbers in
orjson's form), and what a store kept, by this version or an older one, reads back whole."""

import msgspec
import orjson
import pytest

from service.output.encoding import to_json
from service.output.events import (
    EventRecord,
    MappedCode,
    NotAssessedRecord,
    QuarantinedRecord,
    RejectedRecord,
    RetractedAlert,
    StaleRecord,
    decode_decision,
)
from service.output.transaction import Delivery, OutboxWrites, decode_outbox_writes

EVENT = EventRecord(
    patient="Patient/a",
    event="new",
    grade="severe",
    anc=300,
    effective="2026-01-05T09:00:00Z",
    observations=["Observation/anc"],
    episode="e1",
    scheme="ctcae-v5",
    grade_label="grade 4",
    method="reported-absolute",
    anc_at_most=False,
    wbc=1.5,
    previous_anc=None,
    previous_effective=None,
    cytopenia=None,
    hemoglobin=None,
    platelets=None,
    chronic=False,
    febrile=False,
    threshold_rule="scheme",
    picture=None,
    recipients=[],
    recipient_rule="pool",
)
OTHERS = [
    NotAssessedRecord(patient="Patient/a", effective="2026-01-05", observations=[], reason="no ANC"),
    RejectedRecord(
        patient=None,
        effective=None,
        observations=["Observation/x"],
        reason="unit",
        code="751-8",
        mapped_codes=[MappedCode("Observation/x", "urn:lab|ANC", "https://lab.example.org/cm")],
    ),
    StaleRecord(
        patient="Patient/a",
        grade=None,
        anc=2500,
        effective="2026-01-04",
        observations=["Observation/y"],
        reason="collected before the newest panel already assessed",
        newest_effective="2026-01-05",
    ),
    QuarantinedRecord(
        patient="Patient/a", effective=None, observations=[], reason="could not be decided: X", panel="p"
    ),
]


def test_an_event_record_keeps_the_contract_order_and_omits_what_does_not_apply():
    """Keys in the contract's order; `recipients` present (empty), `temperature` and the other
    sometimes-present keys absent, the keys present with no value null."""
    data = orjson.loads(to_json(EVENT))
    assert list(data)[:6] == ["patient", "event", "grade", "anc", "effective", "observations"]
    assert list(data)[-3:] == ["picture", "recipients", "recipient_rule"]
    assert "temperature" not in data and "retracted" not in data and data["previous_anc"] is None


@pytest.mark.parametrize("record", [EVENT, *OTHERS], ids=lambda r: type(r).__name__)
def test_a_record_reads_back_as_the_struct_of_its_kind(record):
    """Encoded and decoded whole: the same struct, and the same bytes again."""
    data = to_json(record)
    assert decode_decision(data) == record
    assert to_json(decode_decision(data)) == data


def test_a_record_reads_back_in_any_key_order():
    """PostgreSQL's jsonb keeps keys in an order of its own."""
    shuffled = orjson.dumps(dict(reversed(list(orjson.loads(to_json(EVENT)).items()))))
    assert decode_decision(shuffled) == EVENT


def test_a_record_stored_before_the_later_fields_still_reads():
    """An event record of the contract's first release (no cytopenia, chronic, picture, ...)."""
    old = {
        k: v
        for k, v in orjson.loads(to_json(EVENT)).items()
        if k
        not in ("cytopenia", "hemoglobin", "platelets", "chronic", "febrile", "threshold_rule", "picture")
    }
    record = decode_decision(orjson.dumps(old))
    assert isinstance(record, EventRecord) and record.picture is None and record.chronic is False


def test_numbers_are_written_as_orjson_writes_them():
    """The exponent's sign of a large float stays (`1e+16`, as every EVENTS.jsonl so far), an int
    stays an int."""
    retracted = msgspec.structs.replace(
        EVENT, retracted=RetractedAlert("new", "severe", "grade 4", 1e16, "2026-01-01"), anc=1e-7
    )
    data = to_json(retracted)
    assert (
        b'"anc":1e-7' in data
        and b'"anc":1e+16' in data
        and data == orjson.dumps(msgspec.to_builtins(retracted))
    )


def test_an_outbox_write_is_stored_as_the_json_it_always_was():
    """Identifiers as arrays, every key written (null when absent), in the stored order."""
    writes = OutboxWrites(
        event="new",
        flag={"resourceType": "Flag"},
        communication=None,
        flag_identifier=("urn:x", "e1"),
        communication_identifier=None,
        flag_full_url="urn:uuid:1",
        communication_full_url=None,
        provenance={"resourceType": "Provenance"},
        provenance_tag=("urn:t", "k"),
        provenance_full_url="urn:uuid:2",
    )
    assert to_json(writes) == orjson.dumps(
        {
            "event": "new",
            "flag": {"resourceType": "Flag"},
            "communication": None,
            "flag_identifier": ["urn:x", "e1"],
            "communication_identifier": None,
            "flag_full_url": "urn:uuid:1",
            "communication_full_url": None,
            "provenance": {"resourceType": "Provenance"},
            "provenance_tag": ["urn:t", "k"],
            "provenance_full_url": "urn:uuid:2",
        }
    )
    assert decode_outbox_writes(to_json(writes)) == writes


def test_an_outbox_row_from_before_provenance_reads_without_one():
    old = {"event": "new", "flag": {}, "communication": None, "flag_identifier": ["s", "v"]}
    old["communication_identifier"] = None
    writes = decode_outbox_writes(orjson.dumps(old))
    assert writes.provenance is None and writes.flag_full_url is None and writes.flag_identifier == ("s", "v")


def test_a_delivery_is_stored_as_the_json_it_always_was():
    delivery = Delivery(["201 Created"], ["Flag/1"], {"Flag": "1"})
    assert to_json(delivery) == b'{"statuses":["201 Created"],"locations":["Flag/1"],"ids":{"Flag":"1"}}'
