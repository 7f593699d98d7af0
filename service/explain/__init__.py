"""`explain`: the decision trail of one patient — why neutrowatch decided what it decided.

The inputs are read by replay's own reader and judged by replay's own loop (the same
`panels.decide` the live loop runs); `explain` only listens and turns each judged panel into a
step: its inputs as received and as normalised, the ANC and its method, the grade, the episode
before and after, the events with the rule that fired, or why nothing was announced — the reasons
the core returns with its decisions (service/core/reasons.py), put in words. The events it lists
are therefore exactly what replay emits for the patient (the tests hold it to that).

- trail.py: replay's traces -> Trail (`build_trail`), over files (`explain_inputs`);
- prose.py: the core's reasons in words (`rule_for`, the notes);
- fetch.py: one patient read from the live server (`fetch_patient`, `explain_server`);
- text.py: the trail as text (`render_text`) and JSON (`trail_json`);
- plot.py: the PNG timeline (matplotlib, imported only when a PNG is asked for).

Nothing here logs: the trail holds the patient's data and goes only to the engineer's terminal or
the files they named.
"""

from service.explain.fetch import explain_server, fetch_patient
from service.explain.model import ExplainError, Trail, patient_reference
from service.explain.plot import plot, plot_available, write_png
from service.explain.prose import rule_for
from service.explain.text import render_text, trail_json
from service.explain.trail import build_trail, explain_inputs, read_given

__all__ = [
    "ExplainError",
    "Trail",
    "build_trail",
    "explain_inputs",
    "explain_server",
    "fetch_patient",
    "patient_reference",
    "plot",
    "plot_available",
    "read_given",
    "render_text",
    "rule_for",
    "trail_json",
    "write_png",
]
