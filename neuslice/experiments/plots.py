"""Grouped bar charts with error bars for the reproduction reports (RQ2–RQ4).

The reproducers (:mod:`neuslice.reproduce`, :mod:`neuslice.reproduce_rq3`,
:mod:`neuslice.reproduce_rq4`) turn their rows into :class:`Panel` objects — one per subplot:
groups along the x axis, one bar per series in each group, mean ± std over seeds — and
:func:`bar_panels` draws them side by side into one PNG with matplotlib's Agg canvas (no
pyplot, no global backend switch, no display needed).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Panel", "mean_std", "seeds_note", "bar_panels"]


@dataclass
class Panel:
    """One subplot: ``series[name] = (means, stds)`` with one entry per group (``None`` where
    a series has no value for a group: no bar there)."""

    title: str
    ylabel: str
    groups: list[str]
    series: dict[str, tuple[list[float | None], list[float | None]]] = field(default_factory=dict)
    hline: float | None = None  # a dashed reference line (e.g. the original model)
    hline_label: str | None = None
    ylim: tuple[float, float] | None = None
    zoom: bool = False  # y axis from just below the lowest bar (for accuracies close together)


def seeds_note(n: int) -> str:
    """ "mean ± std over 3 seeds" / "1 seed" for plot titles."""
    return f"mean ± std over {n} seeds" if n > 1 else "1 seed"


def mean_std(values: Sequence[float], scale: float = 1.0) -> tuple[float | None, float | None]:
    """(mean, sample std) of ``values`` times ``scale``; std 0 for one value, both None for
    none."""
    values = [float(v) * scale for v in values]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def bar_panels(
    panels: Sequence[Panel],
    path: str | os.PathLike,
    title: str = "",
    panel_width: float | None = None,
    height: float = 3.6,
    columns: int | None = None,
    colors: dict[str, str] | None = None,
) -> str:
    """Draw ``panels`` as grouped bars with std error bars, ``columns`` per row (default: all
    in one row); write a PNG to ``path`` and return it. A series keeps one colour in every
    panel (``colors[name]`` where given); the legend lists series in ``colors`` order, then
    in order of appearance. Needs matplotlib (``pip install 'neuslice[plot]'``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is in the plot/test extras
        raise ImportError("plotting needs matplotlib: pip install 'neuslice[plot]'") from exc
    panels = list(panels)
    if not panels:
        raise ValueError("bar_panels needs at least one panel")
    if panel_width is None:
        panel_width = max(
            3.5,
            0.55
            * max(len(p.groups) for p in panels)
            * max(1.0, max(len(p.series) for p in panels) / 2.5),
        )
    cols = len(panels) if columns is None else max(1, min(int(columns), len(panels)))
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(panel_width * cols, height * nrows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes = axes[: len(panels)]
    palette = [
        "tab:grey",
        "tab:blue",
        "tab:orange",
        "tab:red",
        "tab:green",
        "tab:purple",
        "tab:brown",
    ]
    color_of = dict(colors or {})
    for panel in panels:
        for name in panel.series:
            if name not in color_of:
                unused = [c for c in palette if c not in color_of.values()] or palette
                color_of[name] = unused[0]
    for ax, panel in zip(axes, panels):
        n = max(1, len(panel.series))
        width = 0.8 / n
        for i, (name, (means, stds)) in enumerate(panel.series.items()):
            if len(means) != len(panel.groups) or len(stds) != len(panel.groups):
                raise ValueError(
                    f"series {name!r} of panel {panel.title!r} needs one value "
                    f"per group ({len(panel.groups)})"
                )
            xs = [g + (i - (n - 1) / 2) * width for g, m in enumerate(means) if m is not None]
            ms = [m for m in means if m is not None]
            ss = [s or 0.0 for m, s in zip(means, stds) if m is not None]
            ax.bar(
                xs,
                ms,
                width * 0.92,
                yerr=ss,
                capsize=2,
                label=name,
                color=color_of[name],
                error_kw={"elinewidth": 0.8},
            )
        if panel.hline is not None:
            ax.axhline(panel.hline, color="black", lw=0.8, ls="--", label=panel.hline_label)
        ax.set_xticks(range(len(panel.groups)))
        ax.set_xticklabels(
            panel.groups,
            rotation=30 if len(panel.groups) > 4 else 0,
            ha="right" if len(panel.groups) > 4 else "center",
            fontsize=8,
        )
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        elif panel.zoom:
            lows = [
                m - (s or 0.0)
                for ms, ss in panel.series.values()
                for m, s in zip(ms, ss)
                if m is not None
            ]
            highs = [
                m + (s or 0.0)
                for ms, ss in panel.series.values()
                for m, s in zip(ms, ss)
                if m is not None
            ]
            if lows:
                span = max(highs) - min(lows)
                ax.set_ylim(min(lows) - max(0.5, 0.3 * span), max(highs) + 0.15 * span + 0.1)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    legend: dict[str, Any] = {}
    for ax in axes:  # panels may have series or a reference line the first one lacks
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    rank = {name: i for i, name in enumerate(colors or {})}
    labels = sorted(legend, key=lambda lab: rank.get(lab, len(rank)))  # stable sort
    handles = [legend[lab] for lab in labels]
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=min(len(labels), 6),
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    return os.fspath(path)
