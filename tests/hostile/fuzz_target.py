"""One fuzz target for the read -> normalise -> panel path, shared by the hypothesis properties
(test_fuzz.py) and the atheris harness (`python tests/hostile/fuzz_target.py [libFuzzer flags]`).

`check(data)` raises AssertionError when an invariant breaks, and lets any other exception
through (an unexpected exception is a finding too):

* reading never raises; each item is a Resource or an Undecodable whose id is a FHIR id or None;
* the live loop's parse (`paging.read_page`) reads a complete Bundle exactly as replay's (`raw.read`;
  only a meta.lastUpdated beyond the server's clock is refused live), and otherwise only retries
  or refuses (never another exception);
* normalising never raises; a usable value is finite and not negative; whatever is kept of a
  rejection can be written out again (JSON) and is short;
* the panel of the usable results: an ANC only between 0 and 100 000 and never above the WBC;
  `decide` never raises, and alerts only with such an ANC, never when the ANC was refused.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by atheris
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.config import load_settings  # noqa: E402 - after the sys.path line above
from service.core.anc import ANC_MAX, Anc, PanelRejected, compute_anc  # noqa: E402 - after sys.path
from service.core.episodes import PatientState  # noqa: E402 - after the sys.path line above
from service.core.observations import (  # noqa: E402 - after the sys.path line above
    LabResult,
    Rejected,
    normalise,
    undecodable_rejection,
)
from service.core.panels import decide  # noqa: E402 - after the sys.path line above
from service.fhir import model, raw  # noqa: E402 - after the sys.path line above
from service.fhir.errors import FhirError  # noqa: E402 - after the sys.path line above
from service.fhir.paging import BrokenPages, read_page, without_future_stamps  # noqa: E402 - after sys.path
from service.fhir.transport import Response, Retry  # noqa: E402 - after the sys.path line above
from service.output.encoding import to_json  # noqa: E402 - after the sys.path line above
from service.output.events import rejected_record  # noqa: E402 - after the sys.path line above

RULES = load_settings(None).rules


def check(data: bytes) -> None:
    doc = raw.read(data)
    items = doc.items + ([doc.remainder] if doc.remainder is not None else [])
    results: list[LabResult] = []
    for item in items:
        if isinstance(item, model.Undecodable):
            assert item.id is None or raw.fhir_id(item.id) == item.id
            check_rejection(undecodable_rejection(item))
            continue
        assert isinstance(item, model.Resource)
        outcome = normalise(item)
        if isinstance(outcome, Rejected):
            check_rejection(outcome)
        elif isinstance(outcome, LabResult):
            assert outcome.value is None or (math.isfinite(outcome.value) and outcome.value >= 0)
            results.append(outcome)
    check_page(data, doc)
    if results:
        check_panel(results)


def check_rejection(rejected: Rejected) -> None:
    record = rejected_record(rejected)
    to_json(record)  # never text that cannot be written out again
    assert rejected.reason and len(rejected.reason) <= 300
    assert all(
        v is None or len(v) <= 600
        for v in (rejected.ref, rejected.patient, rejected.effective, rejected.version)
    )


def check_page(data: bytes, doc: raw.Document) -> None:
    try:
        entries, _next = read_page(Response(200, {}, data, False), BrokenPages())
        items = entries.items
    except (Retry, FhirError):
        assert not (doc.complete and doc.resource_type == "Bundle")
        return
    if (
        doc.complete
    ):  # the live loop reads what replay reads (but for stamps beyond the server's clock: no cursor there)
        assert items == without_future_stamps(doc.items, {})


def check_panel(results: list[LabResult]) -> None:
    anc = compute_anc(results)
    if isinstance(anc, Anc):
        assert 0 <= anc.value <= ANC_MAX
        assert anc.wbc is None or anc.value <= anc.wbc * (1 + 1e-6)
    patient = results[0].patient
    decision = decide(PatientState(), patient, "fuzz-panel", results, RULES)
    for event in decision.events:
        a = event.assessment
        if a is None:
            continue
        assert isinstance(anc, Anc), "an alert from a panel whose ANC was refused"
        assert 0 <= a.anc <= ANC_MAX and (a.wbc is None or a.anc <= a.wbc * (1 + 1e-6))
    if isinstance(anc, PanelRejected) or anc is None:
        assert not [e for e in decision.events if e.assessment is not None]


def main() -> None:
    import logging

    import atheris
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL)
    )  # no log per input

    def one_input(data: bytes) -> None:
        check(data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
