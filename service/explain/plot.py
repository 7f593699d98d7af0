"""The trail as a PNG timeline (matplotlib, an optional dependency imported only when a PNG is
asked for): ANC on a log axis over the scheme's shaded bands, events marked and labelled,
corrections (superseded values hollow, joined to what replaced them), rejected inputs, and body
temperatures with the fever thresholds below."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.core.grading import Band, Scheme
from service.core.rules import HOUR_US, Rules
from service.explain.model import Event, ExplainError, Step, Trail, band_range, fmt
from service.fhir.fhirtime import to_epoch_us
from service.output.events import RetractedAlert, TemperatureReading

NORMAL_COLOUR = "#e5f5e0"
CORRECTION_COLOUR = "#2171b5"
FEVER_COLOUR = "#cc4c02"
EVENT_STYLE = {
    "new": ("#b30000", "s"),
    "worsening": ("#67000d", "v"),
    "resolved": ("#238b45", "^"),
    "febrile": (FEVER_COLOUR, "*"),
    "chronic": ("#54278f", "D"),
    "retracted": ("#525252", "X"),
}


def _dt(us: int) -> Any:
    """A datetime, typed Any: matplotlib draws datetimes, its type stubs name only numbers."""
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


def _us(when: Any) -> int | None:
    try:
        return to_epoch_us(when) if isinstance(when, str) and when else None
    except ValueError:
        return None


def plot_available() -> None:
    """Raise the one-line ExplainError when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401 - imported only to learn whether it is installed
    except ImportError:
        raise ExplainError("--png needs matplotlib: pip install 'neutrowatch[explain]'") from None


@dataclass(frozen=True, slots=True)
class _Timeline:
    """What is drawn, taken from the trail: the current ANC of each panel (its newest judgement),
    the values corrections superseded, the rejected steps, the temperatures, and the axes' extent."""

    current: list[Step]
    superseded: list[tuple[Step, Step]]  # (the superseded judgement, the panel's newest)
    rejected: list[Step]
    temperatures: list[tuple[int, float]]  # (collection time, Celsius), in time order
    start: int
    end: int
    low: float
    high: float

    @classmethod
    def of(cls, trail: Trail) -> _Timeline:
        latest = {(s.patient, s.panel): s for s in trail.steps if s.kind == "panel"}
        current = sorted(
            (s for s in latest.values() if s.anc is not None and s.effective_us is not None),
            key=lambda s: s.effective_us or 0,
        )
        superseded = [
            (s, latest[(s.patient, s.panel)])
            for s in trail.steps
            if s.kind == "panel"
            and s.anc is not None
            and s.effective_us is not None
            and latest[(s.patient, s.panel)] is not s
        ]
        temps = {
            i.ref: (i.effective_us, i.value)
            for s in trail.steps
            for i in s.inputs
            if i.kind == "temperature" and i.value is not None and i.effective_us is not None
        }
        times = [s.effective_us for s in trail.steps if s.effective_us is not None]
        times += [t for t, _ in temps.values()]
        if not times:
            raise ExplainError(f"nothing with a collection time to plot for {trail.patient}")
        values = [s.anc["value"] for s in current + [old for old, _ in superseded] if s.anc] or [1000.0]
        bounds = [b.below for b in trail.scheme.bands if b.below is not None]
        rejected = [
            s
            for s in trail.steps
            if s.outcome in ("rejected-input", "rejected") and s.effective_us is not None
        ]
        return cls(
            current,
            superseded,
            rejected,
            sorted(temps.values()),
            min(times),
            max(times),
            max(10.0, min(min(values) / 2, min(bounds) / 2)),
            max(max(values) * 2, max(bounds) * 4),
        )

    def floor(self, anc: float) -> float:
        """An ANC raised just above the axis' bottom, so that a value below it stays visible."""
        return max(anc, self.low * 1.05)


def _bands(ax: Any, scheme: Scheme, line: _Timeline) -> list[Any]:
    """Shade the scheme's grade bands, coloured by rank (an LLN band: hatched up to the highest LLN
    reported); returns their legend entries."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    ranks = max(b.rank for b in scheme.bands)
    palette = colormaps["YlOrRd"]

    def colour(band: Band) -> Any:
        return NORMAL_COLOUR if band.rank == 0 else palette(0.15 + 0.7 * (band.rank - 1) / max(ranks - 1, 1))

    llns = [s.anc["lln"] for s in line.current if s.anc and s.anc.get("lln")]
    lln = max(llns) if llns else None
    lower, legend = line.low, []
    for band in scheme.bands:
        label = f"{band.label} ({band_range(scheme, band, lln)})"
        if band.below_lln:
            hatched = {"facecolor": colour(band), "edgecolor": "#b2182b", "alpha": 0.6, "hatch": "///"}
            if lln is not None and lln > lower:
                ax.axhspan(lower, lln, lw=0, zorder=1, **hatched)
            legend.append(Patch(label=label, **hatched))
            continue
        top = band.below if band.below is not None else line.high
        ax.axhspan(lower, top, facecolor=colour(band), alpha=0.5, lw=0, zorder=0)
        if band.below is not None:
            ax.axhline(band.below, color="#969696", lw=0.6, ls="--", zorder=1)
        legend.append(Patch(facecolor=colour(band), alpha=0.5, label=label))
        lower = top
    return legend


def _anc(ax: Any, line: _Timeline) -> None:
    """The current ANC of each panel (filled; "at most" a downward caret, stale grey), and each
    superseded value hollow with a dotted arrow to what replaced it (a cross: withdrawn)."""
    ax.plot(
        [_dt(s.effective_us or 0) for s in line.current],
        [s.anc["value"] for s in line.current if s.anc],
        color="#2b2b2b",
        lw=1.2,
        zorder=3,
    )
    for s in line.current:
        assert s.anc is not None and s.effective_us is not None
        at_most, stale = s.anc["at_most"], s.outcome == "stale"
        ax.plot(
            [_dt(s.effective_us)],
            [line.floor(s.anc["value"])],
            ls="none",
            zorder=6,
            marker=7 if at_most else "o",
            ms=7 if at_most else (5 if stale else 6),
            mfc="#bdbdbd" if stale else "#2b2b2b",
            mec="#2b2b2b",
        )
    for old, new in line.superseded:
        assert old.anc is not None and old.effective_us is not None
        p = (_dt(old.effective_us), line.floor(old.anc["value"]))
        ax.plot(
            [p[0]], [p[1]], marker="o", ms=9, mfc="white", mec=CORRECTION_COLOUR, mew=1.6, ls="none", zorder=5
        )
        if new.anc is not None and new.effective_us is not None:
            ax.annotate(
                "",
                xy=(_dt(new.effective_us), new.anc["value"]),
                xytext=p,
                zorder=5,
                arrowprops={
                    "arrowstyle": "->",
                    "color": CORRECTION_COLOUR,
                    "ls": ":",
                    "lw": 1.4,
                    "shrinkA": 4,
                    "shrinkB": 4,
                },
            )
        else:
            ax.plot([p[0]], [p[1]], marker="x", ms=8, color=CORRECTION_COLOUR, ls="none", zorder=6)
            ax.annotate(
                "withdrawn",
                p,
                xytext=(6, -12),
                textcoords="offset points",
                fontsize=7,
                color=CORRECTION_COLOUR,
            )


def _event_label(e: Event) -> str:
    rec, withdrawn = e.record, e.record.retracted
    if isinstance(withdrawn, RetractedAlert):
        label = f"retracted: {withdrawn.event} {withdrawn.grade_label or ''}".rstrip()
    else:
        grade = rec.grade_label if e.kind != "resolved" else None
        label = e.kind + (f" {grade}" if grade else "")
    if rec.anc is not None and e.kind != "retracted":
        label += f" ({'≤' if rec.anc_at_most else ''}{fmt(rec.anc, 0)})"
    return label + (" [correction]" if e.correction else "")


def _events(ax: Any, tx: Any, trail: Trail, line: _Timeline) -> None:
    """Each event marked on the ANC (a retraction over the announcement it withdraws), labelled,
    labels stacked where they would collide; a febrile event's fever starred on the temperatures."""
    placed: list[float] = []
    span = max(line.end - line.start, 1)
    for s in trail.steps:
        for e in s.events:
            withdrawn = e.record.retracted if isinstance(e.record.retracted, RetractedAlert) else None
            t_us = _us((withdrawn.effective if withdrawn else None) or e.record.effective)
            t_us = s.effective_us if t_us is None else t_us
            if t_us is None:
                continue
            colour, marker = EVENT_STYLE.get(e.kind, ("black", "o"))
            withdrawn_anc = withdrawn.anc if withdrawn else None
            at = (_dt(t_us), line.floor(float(withdrawn_anc or e.record.anc or line.low * 1.5)))
            ax.plot(
                [at[0]],
                [at[1]],
                marker=marker,
                ms=11,
                color=colour,
                mec="white",
                mew=0.8,
                ls="none",
                zorder=7,
            )
            frac = (t_us - line.start) / span
            level = sum(1 for f in placed if abs(f - frac) < 0.06)
            placed.append(frac)
            ax.annotate(
                _event_label(e),
                at,
                xytext=(6, 14 + 13 * level),
                textcoords="offset points",
                fontsize=8,
                color=colour,
                fontweight="bold",
                zorder=8,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": colour, "lw": 0.6, "alpha": 0.85},
                arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6},
            )
            for axis in (ax, tx):
                axis.axvline(at[0], color=colour, lw=0.5, alpha=0.35, zorder=2)
            _fever_star(tx, e, colour)


def _fever_star(tx: Any, e: Event, colour: str) -> None:
    fever = e.record.temperature
    f_us = _us(fever.effective) if e.kind == "febrile" and isinstance(fever, TemperatureReading) else None
    if f_us is None or not isinstance(fever, TemperatureReading):
        return
    at = (_dt(f_us), fever.celsius)
    tx.plot([at[0]], [at[1]], marker="*", ms=14, color=colour, mec="white", mew=0.8, ls="none", zorder=7)
    tx.annotate(
        "febrile",
        at,
        xytext=(8, -4),
        textcoords="offset points",
        fontsize=8,
        color=colour,
        fontweight="bold",
        va="top",
    )


def _temperatures(tx: Any, r: Rules, points: list[tuple[int, float]]) -> None:
    """The readings (those >= the sustained threshold in orange) and the two fever thresholds."""
    if points:
        tx.plot(
            [_dt(t) for t, _ in points], [c for _, c in points], color="#6a51a3", lw=0.8, marker=".", ms=5
        )
        hot = [(t, c) for t, c in points if c >= r.fever_sustained_c]
        if hot:
            tx.plot(
                [_dt(t) for t, _ in hot], [c for _, c in hot], ls="none", marker="o", ms=5, color=FEVER_COLOUR
            )
        tx.set_ylim(
            min(min(c for _, c in points) - 0.3, 36.0),
            max(max(c for _, c in points) + 0.3, r.fever_single_c + 0.5),
        )
    else:
        tx.set_ylim(35.5, r.fever_single_c + 0.7)
        tx.text(
            0.5,
            0.5,
            "no body temperatures",
            transform=tx.transAxes,
            ha="center",
            va="center",
            color="#737373",
        )
    sustained = f"{r.fever_sustained_c:.1f} for {r.fever_sustained_us / HOUR_US:g} h"
    for celsius, colour, ls, label in (
        (r.fever_single_c, FEVER_COLOUR, "--", f"{r.fever_single_c:.1f} once"),
        (r.fever_sustained_c, "#fd8d3c", ":", sustained),
    ):
        tx.axhline(celsius, color=colour, lw=0.9, ls=ls)
        tx.text(
            1.005, celsius, label, transform=tx.get_yaxis_transform(), fontsize=7, va="center", color=colour
        )
    tx.set_ylabel("temperature (°C)")
    tx.grid(axis="y", color="#d9d9d9", lw=0.5)


def _marks(trail: Trail, line: _Timeline) -> list[Any]:
    from matplotlib.lines import Line2D

    marks = [
        Line2D([], [], color="#2b2b2b", marker="o", ls="-", label="ANC (current value)"),
        Line2D([], [], color="#2b2b2b", marker=7, ls="none", label='ANC at most ("<")'),
        Line2D(
            [],
            [],
            mfc="white",
            mec=CORRECTION_COLOUR,
            marker="o",
            ls="none",
            label="superseded by a correction",
        ),
    ]
    if any(s.outcome == "stale" for s in line.current):
        marks.append(
            Line2D(
                [], [], mfc="#bdbdbd", mec="#2b2b2b", marker="o", ls="none", label="stale (collected earlier)"
            )
        )
    if line.rejected:
        marks.append(Line2D([], [], color="#737373", marker="x", ls="none", label="rejected input/panel"))
    kinds = {e.kind for e in trail.events}
    return marks + [
        Line2D([], [], color=colour, marker=marker, ls="none", ms=9, label=f"event: {k}")
        for k, (colour, marker) in EVENT_STYLE.items()
        if k in kinds
    ]


def plot(trail: Trail) -> Any:
    """The timeline as a matplotlib Figure (Agg)."""
    plot_available()
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    line = _Timeline.of(trail)
    fig = Figure(figsize=(12, 7.2), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=(3.2, 1))
    ax = fig.add_subplot(grid[0])
    tx = fig.add_subplot(grid[1], sharex=ax)
    legend = _bands(ax, trail.scheme, line)
    pad = max((line.end - line.start) // 30, 6 * HOUR_US)
    ax.set_yscale("log")
    ax.set_ylim(line.low, line.high)
    ax.set_xlim(_dt(line.start - pad), _dt(line.end + pad))
    ax.set_ylabel("ANC (cells/µL, log scale)")
    _anc(ax, line)
    _events(ax, tx, trail, line)
    if line.rejected:  # rejected inputs and panels: a grey cross at the bottom of the ANC axis
        ax.plot(
            [_dt(s.effective_us or 0) for s in line.rejected],
            [line.low * 1.25] * len(line.rejected),
            marker="x",
            ms=7,
            color="#737373",
            ls="none",
            zorder=4,
        )
    _temperatures(tx, trail.rules, line.temperatures)
    locator = mdates.AutoDateLocator(  # type: ignore[no-untyped-call]  # mdates: no stubs
        minticks=5, maxticks=12
    )
    tx.xaxis.set_major_locator(locator)
    concise = mdates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]  # mdates: no stubs
    tx.xaxis.set_major_formatter(concise)
    ax.tick_params(labelbottom=False)
    tx.set_xlabel("collection time (UTC)")
    ax.legend(
        handles=legend[::-1] + _marks(trail, line),
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
        title=f"scheme {trail.scheme.name}",
        title_fontsize=9,
    )
    kinds = [e.kind for e in trail.events]
    counts = ", ".join(f"{k} {kinds.count(k)}" for k in EVENT_STYLE if k in kinds) or "no events"
    fig.suptitle(
        f"{trail.patient} - neutrowatch decision trail, scheme {trail.scheme.name}",
        fontsize=12,
        fontweight="bold",
    )
    ax.set_title(
        f"{len(line.current)} panels assessed, {len(line.superseded)} superseded, "
        f"{len(line.rejected)} rejected; {counts}",
        fontsize=9,
        color="#525252",
    )
    return fig


def write_png(trail: Trail, path: str | Path) -> None:
    fig = plot(trail)
    try:
        fig.savefig(path, format="png")
    except OSError as err:
        raise ExplainError(f"cannot write {path}: {err.strerror or err}") from None
