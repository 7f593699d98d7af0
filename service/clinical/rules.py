"""The clinical rules in force: one value built from the configuration at the edge and handed to
the core, so replay and the live loop decide with the same rules."""

from __future__ import annotations

from dataclasses import dataclass

from .episodes import CHRONIC_AFTER_US, HISTORY_LIMIT
from .grading import DEFAULT, Scheme


@dataclass(frozen=True, slots=True)
class Rules:
    scheme: Scheme = DEFAULT
    # Pancytopenia cut-offs (issue 4 defaults; one operational definition, the Danish KIP value set
    # "Cytopeni": Hb < 6.2 mmol/L (about 10 g/dL), platelets < 100 x 10^9/L — reference §3).
    hemoglobin_below_g_dl: float = 10.0
    platelets_below_per_ul: float = 100_000.0
    chronic_after_us: int = CHRONIC_AFTER_US
    history_limit: int = HISTORY_LIMIT
