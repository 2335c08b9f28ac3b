"""The matplotlib renderer: one function per plot, drawn on matplotlib's Agg canvas (no pyplot state)."""

from __future__ import annotations

import textwrap
from functools import singledispatch
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ranksearch.results.plots.layers import LayersInfo
from ranksearch.results.plots.pareto import ParetoInfo
from ranksearch.results.plots.progress import ProgressInfo
from ranksearch.results.plots.rows import PlotInfo
from ranksearch.results.plots.style import COLORS, FONT_SIZE

LABEL_WIDTH = 90
"""Characters on one line of the Pareto plot's axis label (its 10-inch width at the house font size)."""


@singledispatch
def figure(info: PlotInfo) -> Figure:
    """``info`` drawn by the function registered for its plot."""
    raise TypeError(f"no {type(info).__name__} figure in this backend")


@figure.register
def pareto_figure(info: ParetoInfo) -> Figure:
    """The Pareto plot as a matplotlib figure."""
    fig, ax = _axes((10, 6.5))
    groups, legend = info.groups(), info.legend()
    style = {
        "feasible": {"marker": "o", "s": 36, "color": COLORS["trial"], "alpha": 0.75, "edgecolors": "none"},
        "infeasible": {"marker": "x", "s": 40, "color": COLORS["infeasible"], "linewidths": 1.5},
        "front": {"marker": "o", "s": 110, "color": COLORS["front"], "edgecolors": "black", "linewidths": 0.8},
        "baseline": {"marker": "*", "s": 240, "color": COLORS["baseline"], "edgecolors": "white"},
        "anchors": {"marker": "D", "s": 45, "color": COLORS["anchor"], "edgecolors": "white"},
    }
    if info.front:
        front = groups["front"]
        ax.step(
            [p.latency for p in front],
            [100 * p.accuracy for p in front],
            where="post",
            color=COLORS["front"],
            linewidth=1.5,
            alpha=0.8,
            zorder=2,
        )
    for key, points in groups.items():
        if points:
            ax.scatter(
                [p.latency for p in points],
                [100 * p.accuracy for p in points],
                label=legend[key],
                zorder=3 + list(groups).index(key),
                **style[key],
            )
    labelled = [(i, p) for key in ("baseline", "anchors") for i, p in enumerate(groups[key])]
    for i, p in labelled:
        vertical, side = info.label_position(p, i).split()
        ax.annotate(
            p.label(),
            (p.latency, 100 * p.accuracy),
            xytext=(9 if side == "right" else -9, 8 if vertical == "top" else -14),
            textcoords="offset points",
            ha="left" if side == "right" else "right",
            fontsize=FONT_SIZE - 2,
            color=COLORS["anchor"] if p.anchor != "baseline" else COLORS["baseline"],
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            zorder=10,
        )
    for p in groups["front"]:
        if p.anchor == "baseline":  # labelled above with its name
            continue
        ax.annotate(
            f"#{p.trial}",
            (p.latency, 100 * p.accuracy),
            xytext=(-6, 7),
            textcoords="offset points",
            fontsize=FONT_SIZE - 3,
            ha="right",
            color=COLORS["front"],
            zorder=10,
        )
    if info.accuracy_floor is not None:
        ax.axhline(100 * info.accuracy_floor, color=COLORS["budget"], linestyle="--", linewidth=1)
        ax.annotate(
            "accuracy budget",
            (0.0, 100 * info.accuracy_floor),
            xycoords=("axes fraction", "data"),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=FONT_SIZE - 2,
            color=COLORS["budget"],
        )
    if info.failed:
        ax.scatter([], [], marker="s", color="none", edgecolors="none", label=legend["failed"])
    if not info.points:
        _empty(ax, "no complete trial yet")
    ax.set_xlabel(textwrap.fill(info.latency_label, width=LABEL_WIDTH))
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(info.title(), fontsize=FONT_SIZE + 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=FONT_SIZE - 1, framealpha=0.9)
    return fig


@figure.register
def layers_figure(info: LayersInfo) -> Figure:
    """The per-layer heatmap as a matplotlib figure."""
    width = 3.2 + 1.05 * max(len(info.trials), 3)
    fig, ax = _axes((width, 1.9 + 0.36 * max(len(info.layers), 4)))
    if not info.trials or not info.layers:
        _empty(ax, "no feasible trial on the front yet")
        ax.set_title(info.title(), fontsize=FONT_SIZE + 1)
        return fig
    cmap = colormaps["YlGnBu"].with_extremes(bad="#d9d9d9")
    grid = [[float("nan") if v is None else v for v in row] for row in info.value]
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.grid(False)
    for i, row in enumerate(info.text):
        for j, text in enumerate(row):
            value = info.value[i][j]
            dark = value is not None and value > 0.55
            ax.text(j, i, text, ha="center", va="center", fontsize=FONT_SIZE - 3, color="white" if dark else "black")
    ax.set_xticks(range(len(info.columns)), info.columns, fontsize=FONT_SIZE - 2)
    ax.set_yticks(range(len(info.layers)), info.layers, fontsize=FONT_SIZE - 2)
    ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False, length=0)
    ax.set_xticks([x - 0.5 for x in range(1, len(info.columns))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(info.layers))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(info.measure, fontsize=FONT_SIZE - 1)
    key = textwrap.fill(info.key(), width=max(40, int(9 * width)))  # ~9 characters an inch at this size
    ax.set_xlabel(f"front member (trial, speedup), fastest first\n{key}", fontsize=FONT_SIZE - 1)
    ax.set_title(textwrap.fill(info.title(), width=int(7 * width)), fontsize=FONT_SIZE + 1, pad=12)
    return fig


@figure.register
def progress_figure(info: ProgressInfo) -> Figure:
    """The search progress as a matplotlib figure."""
    if not info.trials:
        fig, ax = _axes((10, 7))
        _empty(ax, "no complete trial yet")
        ax.set_title(info.title(), fontsize=FONT_SIZE + 1)
        return fig
    fig = Figure(figsize=(10, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    fig.suptitle(info.title(), fontsize=FONT_SIZE + 1)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=FONT_SIZE - 1)
    top.step(info.trials, info.hypervolume, where="post", color=COLORS["front"], linewidth=2)
    top.plot(info.trials, info.hypervolume, "o", color=COLORS["front"], markersize=3)
    top.set_ylabel(info.hypervolume_label().replace(" (", "\n("), fontsize=FONT_SIZE)
    top.set_ylim(bottom=0)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title(info.reference_label(), fontsize=FONT_SIZE - 1)
    inside = [(t, s) for t, s, w in zip(info.trials, info.speedup, info.within_budget) if s is not None and w]
    outside = [(t, s) for t, s, w in zip(info.trials, info.speedup, info.within_budget) if s is not None and not w]
    if outside:
        bottom.scatter(*zip(*outside), marker="o", facecolors="none", edgecolors="#969696", label="over budget")
    if inside:
        bottom.scatter(*zip(*inside), marker="o", color=COLORS["trial"], label="within budget")
    best = [(t, s) for t, s in zip(info.trials, info.best_speedup) if s is not None]
    if best:
        bottom.step(*zip(*best), where="post", color=COLORS["front"], linewidth=2, label=info.speedup_label())
    bottom.axhline(1.0, color=COLORS["budget"], linestyle=":", linewidth=1)
    bottom.set_ylabel("speedup vs baseline (x)", fontsize=FONT_SIZE)
    bottom.set_xlabel("trial number", fontsize=FONT_SIZE)
    # one row above the axes: inside, it hid the warm starts' points at the fast end
    bottom.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=3, fontsize=FONT_SIZE - 1, frameon=False)
    return fig


def _axes(size: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure with one gridded axes, the house font sizes."""
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=FONT_SIZE - 1)
    ax.xaxis.label.set_size(FONT_SIZE)
    ax.yaxis.label.set_size(FONT_SIZE)
    return fig, ax


def _empty(ax: Any, message: str) -> None:
    """``message`` in the middle of empty axes."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=FONT_SIZE + 2, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])
