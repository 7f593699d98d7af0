"""Python's json as the salvage path of `raw` reads a document that a strict parser refuses: NaN,
Infinity and out-of-range numbers become floats (not finite, for `observations.normalise` to
reject), no integer is too long, and nesting is bounded by a fixed depth. Bytes that are not UTF-8,
decoded with "surrogateescape", stay as lone surrogates that `has_surrogates` finds."""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["MAX_NESTING", "has_surrogates", "loads"]

# Python's json recurses once per nesting level against the interpreter's recursion limit, so how
# deep a document it reads depends on how deep the caller's stack already is (and on a test runner
# that raises the limit): the same bytes could be read in one place and refused in another. A fixed
# bound makes "nested too deeply" a property of the bytes alone. FHIR resources nest a few dozen
# levels at most (a Bundle entry's extension of an extension ...); 200 leaves room, well inside the
# default limit of 1000 wherever the salvage path is called from.
MAX_NESTING = 200
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(text: str) -> Any:
    """NaN, Infinity and out-of-range numbers become floats (not finite), no integer is too long.
    Raises ValueError or RecursionError (nested deeper than MAX_NESTING)."""
    if _too_deep(text):
        raise RecursionError("nested deeper than MAX_NESTING")
    return json.loads(text, parse_int=_int)


def _int(text: str) -> int | float:
    # JSON has no leading zeros: more than 309 digits is beyond any float. (int() of more than
    # 4300 digits raises; the value is not finite for our purposes anyway.)
    if len(text) <= 309:
        return int(text)
    return -math.inf if text[0] == "-" else math.inf


def _too_deep(text: str) -> bool:
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return False
    depth = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return True
        else:
            depth -= 1
    return False


def has_surrogates(obj: Any) -> bool:
    """True when a string in `obj` holds a lone surrogate (undecodable bytes, or an unpaired
    escape such as "\\ud800"): such text cannot be encoded as UTF-8 again."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
