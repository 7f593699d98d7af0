"""The one JSON encoding of the records the service writes: decision records (the replay contract,
EVENTS.jsonl and the store's decisions) and outbox writes. A struct is turned into plain values
(`msgspec.to_builtins`: UNSET fields left out, fields in declaration order), then written by orjson,
whose number forms are the contract's: msgspec's own JSON encoder writes large floats without the
exponent's sign (`1e16` where orjson, and every EVENTS.jsonl so far, has `1e+16`)."""

from __future__ import annotations

import msgspec
import orjson


def to_json(value: msgspec.Struct) -> bytes:
    """`value` as compact JSON, as EVENTS.jsonl and the store have it."""
    return orjson.dumps(msgspec.to_builtins(value))
