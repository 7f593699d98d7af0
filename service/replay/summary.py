"""The human-readable table a replay ends with (beside its JSON log line): decisions by event and
results that reached no assessment by reason. Counts only."""

from __future__ import annotations

from service.replay.engine import ReplayStats


def summary_table(stats: ReplayStats) -> str:
    rows: list[tuple[str, int]] = [
        ("resources read", stats.resources),
        ("observations read", stats.observations),
        ("panels judged", stats.panels),
        ("stale panels (collected before the newest assessed)", stats.stale_panels),
    ]
    decisions = [(f"  {event}", n) for event, n in sorted(stats.events.items())]
    undecided = [(f"  {reason}", n) for reason, n in stats.not_decided().items()]
    lines = _block("replay summary", rows)
    lines += _block("decisions (events written)", decisions or [("  none", 0)])
    lines += _block("results that reached no assessment", undecided or [("  none", 0)])
    return "\n".join(lines) + "\n"


def _block(title: str, rows: list[tuple[str, int]]) -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [title] + [f"{label.ljust(width)}  {n:>10,}" for label, n in rows] + [""]
