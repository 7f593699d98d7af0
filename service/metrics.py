"""Prometheus metrics of the service (text exposition at /metrics). Labels carry codes and reasons,
never patient identifiers."""

from __future__ import annotations

import re
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

POLLS = Counter("neutrowatch_polls_total", "Poll cycles by outcome.", ["outcome"], registry=REGISTRY)
PAGES = Counter("neutrowatch_pages_total", "Search result pages read.", registry=REGISTRY)
OBSERVATIONS = Counter(
    "neutrowatch_observations_total",
    "Observation versions read, by what became of them.",
    ["outcome"],
    registry=REGISTRY,
)
PANELS = Counter("neutrowatch_panels_assessed_total", "Panels assessed.", registry=REGISTRY)
PANEL_FAILURES = Counter(
    "neutrowatch_panel_failures_total",
    "Panels quarantined because deciding them or building their writes failed, by exception class.",
    ["error"],
    registry=REGISTRY,
)
STALE_PANELS = Counter(
    "neutrowatch_stale_panels_total",
    "Panels collected before the newest panel already assessed for the patient (remembered, no event).",
    registry=REGISTRY,
)
UNASSESSED = Counter(
    "neutrowatch_unassessed_results_total",
    "Results that reached no assessment, by reason (service/core/undecided.py): code not monitored, "
    "status not assessed, panel without an ANC (WBC without a differential, differential without a "
    "WBC), unresolvable reference, not a lab result.",
    ["reason"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "neutrowatch_rejections_total", "Rejected inputs by reason.", ["reason"], registry=REGISTRY
)
DAMAGED_PAGES = Counter(
    "neutrowatch_damaged_pages_total",
    "Search pages a strict JSON parser refused, by what was done: salvaged (read entry by entry), "
    "retried (broken framing, maybe a truncated transfer), prefix (the same broken page again: the "
    "entries before the break were read, the rest is read from the cursor next cycle), refused "
    "(nothing readable, or the same broken page once more: the cycle fails, the cursor stays).",
    ["handling"],
    registry=REGISTRY,
)
OVERSIZED_RESPONSES = Counter(
    "neutrowatch_oversized_responses_total",
    "FHIR responses refused unread because their body exceeds fhir.max_response_bytes (by method); a search "
    "page so refused fails the cycle and the cursor stays.",
    ["method"],
    registry=REGISTRY,
)
ALERTS = Counter(
    "neutrowatch_alerts_total", "Alert events by event and grade.", ["event", "grade"], registry=REGISTRY
)
WRITES = Counter(
    "neutrowatch_fhir_writes_total",
    "Alert resources written, by type and result.",
    ["resource", "result"],
    registry=REGISTRY,
)
NONATOMIC_TRANSACTIONS = Counter(
    "neutrowatch_nonatomic_transactions_total",
    "Alert transactions the server answered entry by entry with mixed statuses (it processes a "
    "transaction as a batch); the entries that failed were posted again.",
    registry=REGISTRY,
)
FHIR_REQUESTS = Counter(
    "neutrowatch_fhir_requests_total",
    "FHIR requests by method and HTTP status (or error kind).",
    ["method", "status"],
    registry=REGISTRY,
)
FHIR_RETRIES = Counter(
    "neutrowatch_fhir_retries_total", "FHIR requests retried, by reason.", ["reason"], registry=REGISTRY
)
FHIR_RETRY_CAPS = Counter(
    "neutrowatch_fhir_retry_caps_total",
    "FHIR requests not retried because a backoff cap was reached: request "
    "(fhir.retry.max_request_retry_seconds) or cycle (the client's budget, "
    "fhir.retry.max_cycle_retry_seconds).",
    ["cap"],
    registry=REGISTRY,
)
FHIR_PACED_SECONDS = Counter(
    "neutrowatch_fhir_paced_seconds_total",
    "Seconds requests waited for the client-side rate limit (fhir.max_requests_per_minute).",
    registry=REGISTRY,
)
INCLUDES_REFUSED = Counter(
    "neutrowatch_includes_refused_total",
    "Searches the server refused with their _include/_revinclude and that were read again without "
    "them (their draws are grouped by specimen or collection instant, not by DiagnosticReport).",
    ["resource_type"],
    registry=REGISTRY,
)
UNSAFE_LINKS = Counter(
    "neutrowatch_refused_links_total",
    "Links or redirects to another origin that were refused.",
    ["kind"],
    registry=REGISTRY,
)
CONTEXT_FAILURES = Counter(
    "neutrowatch_context_lookup_failures_total",
    "Patient context or recipient look-ups that failed (fallback used).",
    ["lookup"],
    registry=REGISTRY,
)
POLL_LAG = Gauge(
    "neutrowatch_poll_lag_seconds",
    "Seconds between now and the newest meta.lastUpdated read.",
    registry=REGISTRY,
)
LAST_POLL_OK = Gauge(
    "neutrowatch_last_successful_poll_timestamp_seconds",
    "Unix time of the last successful poll.",
    registry=REGISTRY,
)
LEADER = Gauge(
    "neutrowatch_leader",
    "1 while this replica holds the leader lock (polls and posts), 0 as a standby.",
    registry=REGISTRY,
)
LEADER_CHANGES = Counter(
    "neutrowatch_leader_changes_total",
    "Times this replica took or lost the leader lock.",
    ["change"],
    registry=REGISTRY,
)
OUTBOX_PENDING = Gauge(
    "neutrowatch_outbox_pending",
    "Alert writes decided but not yet confirmed by the FHIR server.",
    registry=REGISTRY,
)
STEPS = Counter(
    "neutrowatch_steps_total",
    "Poll steps (at most poll.max_pages_per_step pages read, decided and posted), by "
    "outcome: committed (every write confirmed, the cursor moved) or undelivered (writes pending, the cursor "
    "stayed).",
    ["outcome"],
    registry=REGISTRY,
)
BACKLOG_PAGES = Gauge(
    "neutrowatch_backlog_pages",
    "Pages read so far by a cycle that has not yet reached the end of the search "
    "(a catch-up in progress); 0 once a cycle has read to the end.",
    registry=REGISTRY,
)
POLL_SECONDS = Histogram(
    "neutrowatch_poll_duration_seconds",
    "Duration of poll cycles.",
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


_QUOTED = re.compile(r"'[^']*'")
_AMOUNT = re.compile(r"[-+]?\d[\d.]*(?:e[-+]?\d+)?/uL")
# Positions in parser messages ("line 1 column 65", "char 64", "byte 12", "$.code.coding[3]",
# "after 120 entries"): they depend on the input, so they would make one label per input.
_POSITION = re.compile(r"\b(line|column|char|byte|after) \d+|\[\d+\]")


def reason_label(reason: str) -> str:
    """A bounded label value for a rejection reason: quoted units, amounts and positions are
    elided, so the label set stays small whatever the input (the full reason goes to the log and
    the store)."""
    reason = _AMOUNT.sub("N/uL", _QUOTED.sub("'…'", reason))
    reason = _POSITION.sub(lambda m: f"{m.group(1)} N" if m.group(1) else "[N]", reason)
    return reason.split(" (", 1)[0][:80]


def count_unassessed(reasons: Mapping[str, int] | str | None) -> None:
    """Add results that reached no assessment: one reason (a result), or counts by reason (a panel)."""
    if isinstance(reasons, str):
        UNASSESSED.labels(reasons).inc()
    elif reasons:
        for reason, n in reasons.items():
            UNASSESSED.labels(reason).inc(n)
