"""A study's plots, each computed once and rendered twice (the Optuna way).

``plot_infos(study)`` derives what every plot shows from the rows ``trials.csv`` and ``pareto.csv``
are written from (:func:`~ranksearch.results.trial_rows`, :func:`~ranksearch.results.front_rows`),
so tables and plots never disagree. Each :class:`PlotInfo` renders to PNG (matplotlib's Agg
canvas, no pyplot state) and to a plotly figure, written as self-contained interactive HTML (the
plotly JavaScript is inlined, so the page works offline).
"""

from __future__ import annotations

import abc
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import optuna

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import RanksearchError
from ranksearch.results import (
    MODEL_KEY,
    SETTINGS_KEY,
    STORAGE_FILE,
    baseline,
    front_configs,
    front_rows,
    load_study,
    trial_rows,
)
from ranksearch.util import atomic_open, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from plotly.graph_objects import Figure as PlotlyFigure
    from rich.console import Console

DEFAULT_ACCURACY_BUDGET_PP = 1.0
"""The accuracy budget of "best speedup within budget" when the study set no ``--max-accuracy-drop``."""

SHORT_NAMES = {
    "keep": "keep",
    "svd": "SVD",
    "spatial_svd": "sSVD",
    "tucker2": "TK2",
    "cp": "CP",
    "depthwise_separable": "DW",
    "grouped_svd": "gSVD",
    "spatial_tucker2": "sTK2",
}
"""Heatmap cell text per technique; a technique not listed shows its own name."""

HTML_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"scale": 2}}
FONT_SIZE = 12
COLORS = {
    "trial": "#6baed6",
    "front": "#e6550d",
    "infeasible": "#cb181d",
    "baseline": "#252525",
    "anchor": "#6a51a3",
    "budget": "#737373",
}


@dataclass(frozen=True)
class StudyRows:
    """What every plot of a study is computed from, read once."""

    study_name: str
    trials: list[dict[str, Any]]
    """:func:`trial_rows` with every configured layer as a ``layer:<name>`` column, as in ``trials.csv``."""
    front: list[dict[str, Any]]
    """:func:`front_rows`, fastest first, as in ``pareto.csv``."""
    layer_names: list[str]
    configs: dict[int, CompressionConfig]
    """The config of each front member."""
    settings: dict[str, Any]
    baseline: dict[str, float]
    model_spec: dict[str, Any] | None
    """How the study's model is rebuilt (``build_model`` arguments), when recorded."""

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRows:
        layer_names = layer_order(study)
        return cls(
            study_name=study.study_name,
            trials=trial_rows(study, layer_names),
            front=front_rows(study),
            layer_names=layer_names,
            configs=front_configs(study),
            settings=dict(study.user_attrs.get(SETTINGS_KEY, {})),
            baseline=baseline(study),
            model_spec=study.user_attrs.get(MODEL_KEY),
        )

    def complete(self) -> list[dict[str, Any]]:
        return [r for r in self.trials if r["state"] == "COMPLETE" and r["accuracy"] is not None]

    def accuracy_budget_pp(self) -> float:
        budget = self.settings.get("max_accuracy_drop")
        return DEFAULT_ACCURACY_BUDGET_PP if budget is None else float(budget)


def layer_order(study: optuna.Study) -> list[str]:
    """Every layer a trial configured, in model order (configs list layers in module order)."""
    names: dict[str, None] = {}
    for trial in study.get_trials(deepcopy=False):
        names.update(dict.fromkeys(trial.user_attrs.get("config", {}).get("layers", {})))
    return list(names)


class PlotInfo(abc.ABC):
    """What one plot shows, computed once; rendered to a matplotlib figure and a plotly figure."""

    name: ClassVar[str]

    @abc.abstractmethod
    def to_matplotlib(self) -> Figure: ...

    @abc.abstractmethod
    def to_plotly(self) -> PlotlyFigure: ...


# ---------------------------------------------------------------- Pareto plot


@dataclass(frozen=True)
class Point:
    """One complete trial in the accuracy/latency plane."""

    trial: int
    accuracy: float
    latency_ms: float
    feasible: bool
    anchor: str
    hover: tuple[str, ...]

    def label(self) -> str:
        """The anchor's name beside its marker (``svd@0.5``; the legend says "uniform")."""
        return self.anchor.removeprefix("uniform ")


@dataclass(frozen=True)
class ParetoInfo(PlotInfo):
    """Validation accuracy vs measured latency of every complete trial, the feasible front highlighted.

    Anchors (the baseline and the uniform configurations) are labelled; infeasible trials (a
    constraint > 0) are crosses; failed trials have no values and are counted in the legend.
    """

    name: ClassVar[str] = "pareto"
    study_name: str
    points: tuple[Point, ...]
    front: tuple[int, ...]
    """Trial numbers of the feasible Pareto front, fastest first."""
    failed: int
    accuracy_floor: float | None
    """Baseline accuracy minus ``--max-accuracy-drop``, when the study has that constraint."""
    latency_label: str

    def point(self, trial: int) -> Point:
        return next(p for p in self.points if p.trial == trial)

    def groups(self) -> dict[str, list[Point]]:
        """Disjoint marker groups, drawn in this order (later on top)."""
        front = set(self.front)
        plain = [p for p in self.points if p.trial not in front and not p.anchor]
        return {
            "feasible": [p for p in plain if p.feasible],
            "infeasible": [p for p in plain if not p.feasible],
            "front": [self.point(t) for t in self.front],
            "baseline": [p for p in self.points if p.anchor == "baseline"],
            "anchors": [p for p in self.points if p.anchor and p.anchor != "baseline"],
        }

    def _label_position(self, point: Point, index: int) -> str:
        """Above or below (alternating), to the left of points in the slowest quarter."""
        latencies = [p.latency_ms for p in self.points]
        low, high = min(latencies), max(latencies)
        side = "left" if high > low and point.latency_ms > low + 0.75 * (high - low) else "right"
        return f"{'top' if index % 2 == 0 else 'bottom'} {side}"

    def title(self) -> str:
        infeasible = sum(not p.feasible for p in self.points)
        parts = [f"{len(self.points)} complete", f"{len(self.front)} on the front"]
        parts += [f"{infeasible} infeasible"] if infeasible else []
        parts += [f"{self.failed} failed"] if self.failed else []
        return f"Pareto front of {self.study_name} ({', '.join(parts)})"

    def legend(self) -> dict[str, str]:
        return {
            "feasible": "trial",
            "infeasible": "infeasible trial (constraint violated)",
            "front": "feasible Pareto front",
            "baseline": "baseline (no compression)",
            "anchors": "uniform anchor",
            "failed": f"failed trials: {self.failed} (no values)",
        }

    def to_matplotlib(self) -> Figure:
        fig, ax = _mpl_axes((10, 6.5))
        groups, legend = self.groups(), self.legend()
        style = {
            "feasible": {"marker": "o", "s": 36, "color": COLORS["trial"], "alpha": 0.75, "edgecolors": "none"},
            "infeasible": {"marker": "x", "s": 40, "color": COLORS["infeasible"], "linewidths": 1.5},
            "front": {"marker": "o", "s": 110, "color": COLORS["front"], "edgecolors": "black", "linewidths": 0.8},
            "baseline": {"marker": "*", "s": 240, "color": COLORS["baseline"], "edgecolors": "white"},
            "anchors": {"marker": "D", "s": 45, "color": COLORS["anchor"], "edgecolors": "white"},
        }
        if self.front:
            front = groups["front"]
            ax.step(
                [p.latency_ms for p in front],
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
                    [p.latency_ms for p in points],
                    [100 * p.accuracy for p in points],
                    label=legend[key],
                    zorder=3 + list(groups).index(key),
                    **style[key],
                )
        labelled = [(i, p) for key in ("baseline", "anchors") for i, p in enumerate(groups[key])]
        for i, p in labelled:
            vertical, side = self._label_position(p, i).split()
            ax.annotate(
                p.label(),
                (p.latency_ms, 100 * p.accuracy),
                xytext=(9 if side == "right" else -9, 8 if vertical == "top" else -14),
                textcoords="offset points",
                ha="left" if side == "right" else "right",
                fontsize=FONT_SIZE - 2,
                color=COLORS["anchor"] if p.anchor != "baseline" else COLORS["baseline"],
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
                zorder=10,
            )
        for p in groups["front"]:
            ax.annotate(
                f"#{p.trial}",
                (p.latency_ms, 100 * p.accuracy),
                xytext=(-6, 7),
                textcoords="offset points",
                fontsize=FONT_SIZE - 3,
                ha="right",
                color=COLORS["front"],
                zorder=10,
            )
        if self.accuracy_floor is not None:
            ax.axhline(100 * self.accuracy_floor, color=COLORS["budget"], linestyle="--", linewidth=1)
            ax.annotate(
                "accuracy budget",
                (0.0, 100 * self.accuracy_floor),
                xycoords=("axes fraction", "data"),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=FONT_SIZE - 2,
                color=COLORS["budget"],
            )
        if self.failed:
            ax.scatter([], [], marker="s", color="none", edgecolors="none", label=legend["failed"])
        if not self.points:
            _mpl_empty(ax, "no complete trial yet")
        ax.set_xlabel(self.latency_label)
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(self.title(), fontsize=FONT_SIZE + 1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=FONT_SIZE - 1, framealpha=0.9)
        return fig

    def to_plotly(self) -> PlotlyFigure:
        import plotly.graph_objects as go

        fig = go.Figure()
        groups, legend = self.groups(), self.legend()
        markers = {
            "feasible": {"symbol": "circle", "size": 8, "color": COLORS["trial"], "opacity": 0.8},
            "infeasible": {"symbol": "x", "size": 8, "color": COLORS["infeasible"]},
            "front": {"symbol": "circle", "size": 14, "color": COLORS["front"], "line": {"width": 1, "color": "black"}},
            "baseline": {"symbol": "star", "size": 18, "color": COLORS["baseline"]},
            "anchors": {"symbol": "diamond", "size": 9, "color": COLORS["anchor"]},
        }
        if self.front:
            front = groups["front"]
            fig.add_trace(
                go.Scatter(
                    x=[p.latency_ms for p in front],
                    y=[100 * p.accuracy for p in front],
                    mode="lines",
                    line={"shape": "hv", "color": COLORS["front"], "width": 2},
                    hoverinfo="skip",
                    showlegend=False,
                )
            )
        for key, points in groups.items():
            if not points:
                continue
            labelled = key in ("baseline", "anchors")
            fig.add_trace(
                go.Scatter(
                    x=[p.latency_ms for p in points],
                    y=[100 * p.accuracy for p in points],
                    mode="markers+text" if labelled else "markers",
                    text=[p.label() for p in points] if labelled else None,
                    textposition=[self._label_position(p, i) for i, p in enumerate(points)],
                    cliponaxis=False,
                    textfont={"color": markers[key]["color"]},
                    marker=markers[key],
                    name=legend[key],
                    hovertext=["<br>".join(p.hover) for p in points],
                    hoverinfo="text",
                )
            )
        if self.failed:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker={"opacity": 0}, name=legend["failed"]))
        if self.accuracy_floor is not None:
            fig.add_hline(
                y=100 * self.accuracy_floor,
                line={"dash": "dash", "color": COLORS["budget"], "width": 1},
                annotation_text="accuracy budget",
                annotation_position="bottom right",
            )
        if not self.points:
            _plotly_empty(fig, "no complete trial yet")
        _plotly_layout(fig, self.title(), self.latency_label, "validation accuracy (%)")
        return fig


def pareto_info(rows: StudyRows) -> ParetoInfo:
    settings = rows.settings
    threads = settings.get("threads")
    latency_label = (
        f"measured latency (ms; {settings.get('device', 'cpu')}, batch {settings.get('latency_batch', 1)}, "
        f"{threads if threads else 'default'} thread{'s' if threads != 1 else ''})"
    )
    drop = settings.get("max_accuracy_drop")
    floor = None
    if drop is not None and "accuracy" in rows.baseline:
        floor = rows.baseline["accuracy"] - drop / 100
    return ParetoInfo(
        study_name=rows.study_name,
        points=tuple(
            Point(
                trial=r["trial"],
                accuracy=r["accuracy"],
                latency_ms=r["latency_ms"],
                feasible=bool(r["feasible"]),
                anchor=r["anchor"] or "",
                hover=_hover(r, rows.layer_names),
            )
            for r in rows.complete()
        ),
        front=tuple(r["trial"] for r in rows.front),
        failed=sum(r["state"] == "FAIL" for r in rows.trials),
        accuracy_floor=floor,
        latency_label=latency_label,
    )


def _hover(row: Mapping[str, Any], layer_names: Sequence[str]) -> tuple[str, ...]:
    """Trial, metrics and the layers it compresses (keep layers counted, not listed)."""
    head = f"trial {row['trial']}" + (f" ({row['anchor']})" if row["anchor"] else "")
    lines = [
        head + ("" if row["feasible"] else " · infeasible"),
        f"val accuracy {100 * row['accuracy']:.2f}% · latency {row['latency_ms']:.3f} ms",
        f"speedup {_num(row['speedup'], '{:.2f}x')} · drop {_num(row['accuracy_drop_pp'], '{:+.2f} pp')}"
        f" · params {_num(row['params'], '{:,.0f}')}",
    ]
    labels = {name: row[f"layer:{name}"] for name in layer_names}
    changed = [f"{name}: {label}" for name, label in labels.items() if label != "keep"]
    kept = len(labels) - len(changed)
    return (*lines, *changed, f"{'all' if not changed else kept} {'other ' if changed else ''}layers keep")


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


# ---------------------------------------------------------------- per-layer heatmap


@dataclass(frozen=True)
class LayersInfo(PlotInfo):
    """What each front member does to each searched layer.

    Rows are the searched layers in model order, columns the front members fastest first. The
    colour is the share of the dense layer's parameters its replacement keeps (``keep`` = 1),
    from the cost model on the architecture the study's model spec rebuilds: parameter counts
    depend on layer shapes only, so a freshly built model (no weights, no data) is enough and
    techniques compare on one scale (``tucker2`` at rank 0.25 keeps about 12% of a 3x3 conv).
    Where the model cannot be rebuilt here (no spec recorded, a custom model not importable),
    the colour falls back to the *rank fraction* in the config (the mean over rank dimensions;
    an absolute int rank has none and is grey), and ``measure`` says which one is shown. Cell
    text is the technique's short name and the config's rank, then ``int8`` for int8 layers.
    """

    name: ClassVar[str] = "layers"
    study_name: str
    layers: tuple[str, ...]
    trials: tuple[int, ...]
    columns: tuple[str, ...]
    value: tuple[tuple[float | None, ...], ...]
    """``value[layer][member]``: the colour, a fraction in [0, 1] (``None``: unknown)."""
    measure: str
    text: tuple[tuple[str, ...], ...]
    labels: tuple[tuple[str, ...], ...]
    """The choice labels, as in the ``layer:<name>`` columns of ``trials.csv``."""

    def title(self) -> str:
        return f"Per-layer choices of the {len(self.trials)} front members of {self.study_name}"

    def key(self) -> str:
        """What the short names in the cells stand for (those that appear)."""
        shown = {text.split()[0] for row in self.text for text in row}
        return " · ".join(
            f"{short} = {name}" for name, short in SHORT_NAMES.items() if short in shown and short != name
        )

    def to_matplotlib(self) -> Figure:
        from matplotlib import colormaps

        width = 3.2 + 1.05 * max(len(self.trials), 3)
        fig, ax = _mpl_axes((width, 1.9 + 0.36 * max(len(self.layers), 4)))
        if not self.trials or not self.layers:
            _mpl_empty(ax, "no feasible trial on the front yet")
            ax.set_title(self.title(), fontsize=FONT_SIZE + 1)
            return fig
        cmap = colormaps["YlGnBu"].with_extremes(bad="#d9d9d9")
        grid = [[float("nan") if v is None else v for v in row] for row in self.value]
        image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.grid(False)
        for i, row in enumerate(self.text):
            for j, text in enumerate(row):
                value = self.value[i][j]
                dark = value is not None and value > 0.55
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=FONT_SIZE - 3, color="white" if dark else "black"
                )
        ax.set_xticks(range(len(self.columns)), self.columns, fontsize=FONT_SIZE - 2)
        ax.set_yticks(range(len(self.layers)), self.layers, fontsize=FONT_SIZE - 2)
        ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False, length=0)
        ax.set_xticks([x - 0.5 for x in range(1, len(self.columns))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(self.layers))], minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label(self.measure, fontsize=FONT_SIZE - 1)
        key = textwrap.fill(self.key(), width=max(40, int(9 * width)))  # ~9 characters an inch at this size
        ax.set_xlabel(f"front member (trial, speedup), fastest first\n{key}", fontsize=FONT_SIZE - 1)
        ax.set_title(self.title(), fontsize=FONT_SIZE + 1, pad=12)
        return fig

    def to_plotly(self) -> PlotlyFigure:
        import plotly.graph_objects as go

        fig = go.Figure()
        if self.trials and self.layers:
            fig.add_trace(
                go.Heatmap(
                    z=[list(row) for row in self.value],
                    x=list(self.columns),
                    y=list(self.layers),
                    text=[[t.replace("\n", "<br>") for t in row] for row in self.text],
                    texttemplate="%{text}",
                    textfont={"size": FONT_SIZE - 1},
                    customdata=[list(row) for row in self.labels],
                    hovertemplate=f"%{{y}}<br>%{{x}}<br>%{{customdata}}<br>{self.measure}: %{{z:.3f}}<extra></extra>",
                    colorscale="YlGnBu",
                    zmin=0.0,
                    zmax=1.0,
                    xgap=2,
                    ygap=2,
                    colorbar={"title": {"text": "<br>".join(textwrap.wrap(self.measure, 14)), "side": "top"}},
                )
            )
            fig.update_yaxes(autorange="reversed")
        else:
            _plotly_empty(fig, "no feasible trial on the front yet")
        _plotly_layout(fig, self.title(), f"front member (trial, speedup), fastest first<br>{self.key()}", "")
        fig.update_layout(
            plot_bgcolor="#d9d9d9" if self.trials else "white",
            height=260 + 30 * max(len(self.layers), 4),
        )
        return fig


PARAMS_MEASURE = "parameters kept (share of the dense layer)"
RANK_MEASURE = "kept rank fraction (keep = 1)"


def layers_info(rows: StudyRows) -> LayersInfo:
    members = [r["trial"] for r in rows.front]
    by_number = {r["trial"]: r for r in rows.trials}
    kept = layer_param_shares(rows.model_spec, {t: rows.configs[t] for t in members})
    value, text, labels = [], [], []
    for name in rows.layer_names:
        choices = [rows.configs[t].layers.get(name, LayerChoice("keep")) for t in members]
        if kept is None:
            value.append(tuple(kept_fraction(c) for c in choices))
        else:
            value.append(tuple(kept[t].get(name, 1.0) for t in members))
        text.append(tuple(cell_text(c) for c in choices))
        labels.append(tuple(by_number[t][f"layer:{name}"] for t in members))
    return LayersInfo(
        study_name=rows.study_name,
        layers=tuple(rows.layer_names),
        trials=tuple(members),
        columns=tuple(f"#{r['trial']} · {_num(r['speedup'], '{:.2f}x')}" for r in rows.front),
        value=tuple(value),
        measure=RANK_MEASURE if kept is None else PARAMS_MEASURE,
        text=tuple(text),
        labels=tuple(labels),
    )


def layer_param_shares(
    spec: Mapping[str, Any] | None, configs: Mapping[int, CompressionConfig]
) -> dict[int, dict[str, float]] | None:
    """Per trial and configured layer, the replacement's parameters over the dense layer's.

    Counted by the cost model on the architecture ``spec`` (the study's model spec) rebuilds;
    ``None`` when there is no spec or the model cannot be rebuilt here.
    """
    if not spec or not configs:
        return None
    import torch

    from ranksearch.compress import cost_report
    from ranksearch.models import build_model
    from ranksearch.search import record_input_shapes

    try:
        size, channels = int(spec["image_size"]), int(spec["in_channels"])
        model = build_model(spec["name"], num_classes=int(spec["num_classes"]), in_channels=channels, image_size=size)
        shapes = record_input_shapes(model, torch.zeros(1, channels, size, size))
        modules = dict(model.named_modules())
        return {
            trial: {
                name: cost_report(
                    modules[name],
                    c.technique,
                    c.rank,
                    shapes[name],
                    rank_multiple=config.rank_multiple,
                    **c.options,
                ).param_ratio
                for name, c in config.layers.items()
            }
            for trial, config in configs.items()
        }
    except (RanksearchError, KeyError):  # no such model or layer here: the caller falls back to rank fractions
        return None


def cell_text(choice: LayerChoice) -> str:
    """``keep``, ``TK2 .25`` (rank fraction), ``SVD r64`` (absolute rank); then a line ``int8`` if int8."""
    text = SHORT_NAMES.get(choice.technique, choice.technique)
    if choice.rank is not None:
        ranks = choice.rank if isinstance(choice.rank, tuple) else (choice.rank,)
        shown = [f"{r:.3g}".lstrip("0") if isinstance(r, float) else f"r{r}" for r in ranks]
        text += " " + "/".join(shown)
    return text + ("\nint8" if choice.int8 else "")


def kept_fraction(choice: LayerChoice) -> float | None:
    """1.0 for keep; the rank fraction (mean over rank dimensions); None for absolute or missing ranks."""
    if choice.technique == "keep":
        return 1.0
    ranks = choice.rank if isinstance(choice.rank, tuple) else (choice.rank,)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, float) for r in ranks):
        return None
    return sum(ranks) / len(ranks)


# ---------------------------------------------------------------- search progress


@dataclass(frozen=True)
class ProgressInfo(PlotInfo):
    """How the search improved, after each complete trial (x: trial number).

    Hypervolume: the area the feasible front dominates in the (accuracy up, latency down)
    plane up to a fixed reference point, (lowest accuracy of any complete trial, 1.1 x the
    highest latency); fixed for the whole run, so the curve never decreases. Units are
    accuracy (a fraction) x ms. Best speedup: the highest speedup among trials whose accuracy
    drop is within the accuracy budget (``--max-accuracy-drop``, else 1 pp).
    """

    name: ClassVar[str] = "progress"
    study_name: str
    trials: tuple[int, ...]
    hypervolume: tuple[float, ...]
    reference: tuple[float, float]
    """(accuracy, latency_ms)."""
    speedup: tuple[float | None, ...]
    within_budget: tuple[bool, ...]
    best_speedup: tuple[float | None, ...]
    budget_pp: float

    def title(self) -> str:
        return f"Search progress of {self.study_name} ({len(self.trials)} complete trials)"

    def speedup_label(self) -> str:
        return f"best speedup within {self.budget_pp:g} pp"

    def to_matplotlib(self) -> Figure:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        if not self.trials:
            fig, ax = _mpl_axes((10, 7))
            _mpl_empty(ax, "no complete trial yet")
            ax.set_title(self.title(), fontsize=FONT_SIZE + 1)
            return fig
        fig = Figure(figsize=(10, 7), layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True)
        fig.suptitle(self.title(), fontsize=FONT_SIZE + 1)
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=FONT_SIZE - 1)
        top.step(self.trials, self.hypervolume, where="post", color=COLORS["front"], linewidth=2)
        top.plot(self.trials, self.hypervolume, "o", color=COLORS["front"], markersize=3)
        top.set_ylabel("hypervolume\n(accuracy × ms)", fontsize=FONT_SIZE)
        top.set_ylim(bottom=0)
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.set_title(
            f"feasible front vs reference (accuracy {100 * self.reference[0]:.2f}%, {self.reference[1]:.3f} ms)",
            fontsize=FONT_SIZE - 1,
        )
        inside = [(t, s) for t, s, w in zip(self.trials, self.speedup, self.within_budget) if s is not None and w]
        outside = [(t, s) for t, s, w in zip(self.trials, self.speedup, self.within_budget) if s is not None and not w]
        if outside:
            bottom.scatter(*zip(*outside), marker="o", facecolors="none", edgecolors="#969696", label="over budget")
        if inside:
            bottom.scatter(*zip(*inside), marker="o", color=COLORS["trial"], label="within budget")
        best = [(t, s) for t, s in zip(self.trials, self.best_speedup) if s is not None]
        if best:
            bottom.step(*zip(*best), where="post", color=COLORS["front"], linewidth=2, label=self.speedup_label())
        bottom.axhline(1.0, color=COLORS["budget"], linestyle=":", linewidth=1)
        bottom.set_ylabel("speedup vs baseline (x)", fontsize=FONT_SIZE)
        bottom.set_xlabel("trial number", fontsize=FONT_SIZE)
        bottom.legend(loc="upper left", fontsize=FONT_SIZE - 1, framealpha=0.9)
        return fig

    def to_plotly(self) -> PlotlyFigure:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
        if self.trials:
            fig.add_trace(
                go.Scatter(
                    x=list(self.trials),
                    y=list(self.hypervolume),
                    mode="lines+markers",
                    line={"shape": "hv", "color": COLORS["front"]},
                    name="hypervolume",
                    hovertemplate="trial %{x}<br>hypervolume %{y:.4g}<extra></extra>",
                ),
                row=1,
                col=1,
            )
            for within, name, marker in (
                (False, "over budget", {"color": "#969696", "symbol": "circle-open"}),
                (True, "within budget", {"color": COLORS["trial"]}),
            ):
                picked = [(t, s) for t, s, w in zip(self.trials, self.speedup, self.within_budget) if w == within]
                picked = [(t, s) for t, s in picked if s is not None]
                if picked:
                    x, y = zip(*picked)
                    fig.add_trace(
                        go.Scatter(
                            x=x,
                            y=y,
                            mode="markers",
                            marker=marker,
                            name=name,
                            hovertemplate="trial %{x}<br>speedup %{y:.2f}x<extra></extra>",
                        ),
                        row=2,
                        col=1,
                    )
            fig.add_trace(
                go.Scatter(
                    x=list(self.trials),
                    y=list(self.best_speedup),
                    mode="lines",
                    line={"shape": "hv", "color": COLORS["front"], "width": 2},
                    name=self.speedup_label(),
                    hovertemplate="after trial %{x}: %{y:.2f}x<extra></extra>",
                ),
                row=2,
                col=1,
            )
        else:
            _plotly_empty(fig, "no complete trial yet")
        _plotly_layout(fig, self.title(), "", "")
        fig.update_yaxes(title_text="hypervolume (accuracy × ms)", row=1, col=1)
        fig.update_yaxes(title_text="speedup vs baseline (x)", row=2, col=1)
        fig.update_xaxes(title_text="trial number", row=2, col=1)
        fig.update_layout(height=620)
        return fig


def progress_info(rows: StudyRows) -> ProgressInfo:
    complete = rows.complete()
    reference = (
        min((r["accuracy"] for r in complete), default=0.0),
        1.1 * max((r["latency_ms"] for r in complete), default=0.0),
    )
    budget = rows.accuracy_budget_pp()
    hypervolume, best_speedup, within_budget = [], [], []
    feasible: list[tuple[float, float]] = []
    best = None
    for r in complete:
        if r["feasible"]:
            feasible.append((r["accuracy"], r["latency_ms"]))
        hypervolume.append(hypervolume_2d(feasible, reference))
        drop, speedup = r["accuracy_drop_pp"], r["speedup"]
        within = drop is not None and speedup is not None and drop <= budget
        if within:
            best = speedup if best is None else max(best, speedup)
        within_budget.append(within)
        best_speedup.append(best)
    return ProgressInfo(
        study_name=rows.study_name,
        trials=tuple(r["trial"] for r in complete),
        hypervolume=tuple(hypervolume),
        reference=reference,
        speedup=tuple(r["speedup"] for r in complete),
        within_budget=tuple(within_budget),
        best_speedup=tuple(best_speedup),
        budget_pp=budget,
    )


def hypervolume_2d(points: Iterable[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Exact area dominated by ``(accuracy, latency)`` points (accuracy up, latency down) within ``reference``.

    Sweeps the points fastest first: each one that beats the best accuracy so far adds the
    rectangle between that accuracy, its own, its latency and the reference latency.
    """
    ref_accuracy, ref_latency = reference
    area, best = 0.0, ref_accuracy
    for accuracy, latency in sorted(points, key=lambda p: (p[1], -p[0])):
        if latency < ref_latency and accuracy > best:
            area += (ref_latency - latency) * (accuracy - best)
            best = accuracy
    return area


# ---------------------------------------------------------------- writing


def plot_infos(study: optuna.Study | StudyRows) -> list[PlotInfo]:
    """The Pareto plot, the per-layer heatmap and the search progress, computed from one read of the study."""
    rows = study if isinstance(study, StudyRows) else StudyRows.of(study)
    return [pareto_info(rows), layers_info(rows), progress_info(rows)]


def write_plots(study: optuna.Study, directory: Path) -> list[Path]:
    """``pareto``, ``layers`` and ``progress`` as ``.png`` and self-contained ``.html`` in ``directory``, atomically."""
    require_plot_extra()
    paths = []
    for info in plot_infos(study):
        png, html = directory / f"{info.name}.png", directory / f"{info.name}.html"
        figure = info.to_matplotlib()
        with atomic_open(png, "wb") as handle:
            figure.savefig(handle, format="png", dpi=130)
        atomic_write_text(html, plotly_html(info.to_plotly(), full_html=True, include_plotlyjs=True))
        paths += [png, html]
    return paths


def plotly_html(figure: PlotlyFigure, *, full_html: bool, include_plotlyjs: bool) -> str:
    """The figure as HTML with no external reference (plotly's JavaScript inlined or already on the page)."""
    return figure.to_html(
        full_html=full_html, include_plotlyjs=include_plotlyjs, include_mathjax=False, config=HTML_CONFIG
    )


def study_directory(ref: str | Path, study: optuna.Study, results_dir: Path) -> Path:
    """Where a study's files go: the ``results/<study>/`` directory ``ref`` names, else ``results_dir/<study>``."""
    path = Path(ref)
    return path if (path / STORAGE_FILE).is_file() else results_dir / study.study_name


def plot_study(ref: str | Path, *, results_dir: Path = Path("results"), storage: str | None = None) -> list[Path]:
    """(Re)write the plots of a stored study (see :func:`~ranksearch.results.load_study`) into its directory."""
    study = load_study(ref, results_dir=results_dir, storage=storage)
    return write_plots(study, study_directory(ref, study, results_dir))


def require_plot_extra() -> None:
    try:
        import matplotlib  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as exc:
        raise RanksearchError(
            f"plots need {exc.name}; install the plot extra: pip install 'ranksearch[plot]'"
        ) from None


def _mpl_axes(size: tuple[float, float]) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=FONT_SIZE - 1)
    ax.xaxis.label.set_size(FONT_SIZE)
    ax.yaxis.label.set_size(FONT_SIZE)
    return fig, ax


def _mpl_empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=FONT_SIZE + 2, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _plotly_empty(fig: PlotlyFigure, message: str) -> None:
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 16})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)


def _plotly_layout(fig: PlotlyFigure, title: str, xlabel: str, ylabel: str) -> None:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        template="plotly_white",
        font={"size": FONT_SIZE + 1},
        hoverlabel={"align": "left"},
        legend={"bgcolor": "rgba(255,255,255,0.85)"},
    )
    if xlabel:
        fig.update_xaxes(title_text=xlabel)
    if ylabel:
        fig.update_yaxes(title_text=ylabel)


def write_plots_or_warn(study: optuna.Study, directory: Path, console: Console) -> list[Path]:
    """:func:`write_plots` at the end of a run: an error is printed on ``console``, never raised, so it cannot
    mask the run's own outcome (the results files are written before)."""
    try:
        return write_plots(study, directory)
    except Exception as exc:
        console.print(f"plots not written ({type(exc).__name__}: {exc}); retry with `ranksearch plot {directory}`")
        return []
