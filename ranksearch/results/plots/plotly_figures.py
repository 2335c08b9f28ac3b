"""The plotly renderer: one function per plot, an interactive figure written as self-contained HTML."""

from __future__ import annotations

import textwrap
from functools import singledispatch

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ranksearch.results.plots.layers import LayersInfo
from ranksearch.results.plots.pareto import ParetoInfo
from ranksearch.results.plots.progress import ProgressInfo
from ranksearch.results.plots.rows import PlotInfo
from ranksearch.results.plots.style import COLORS, FONT_SIZE


@singledispatch
def figure(info: PlotInfo) -> go.Figure:
    """``info`` drawn by the function registered for its plot."""
    raise TypeError(f"no {type(info).__name__} figure in this backend")


@figure.register
def pareto_figure(info: ParetoInfo) -> go.Figure:
    """The Pareto plot as a plotly figure."""
    fig = go.Figure()
    groups, legend = info.groups(), info.legend()
    markers = {
        "feasible": {"symbol": "circle", "size": 8, "color": COLORS["trial"], "opacity": 0.8},
        "infeasible": {"symbol": "x", "size": 8, "color": COLORS["infeasible"]},
        "front": {"symbol": "circle", "size": 14, "color": COLORS["front"], "line": {"width": 1, "color": "black"}},
        "baseline": {"symbol": "star", "size": 18, "color": COLORS["baseline"]},
        "anchors": {"symbol": "diamond", "size": 9, "color": COLORS["anchor"]},
    }
    if info.front:
        front = groups["front"]
        fig.add_trace(
            go.Scatter(
                x=[p.latency for p in front],
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
                x=[p.latency for p in points],
                y=[100 * p.accuracy for p in points],
                mode="markers+text" if labelled else "markers",
                text=[p.label() for p in points] if labelled else None,
                textposition=[info.label_position(p, i) for i, p in enumerate(points)],
                cliponaxis=False,
                textfont={"color": markers[key]["color"]},
                marker=markers[key],
                name=legend[key],
                hovertext=["<br>".join(p.hover) for p in points],
                hoverinfo="text",
            )
        )
    if info.failed:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker={"opacity": 0}, name=legend["failed"]))
    if info.accuracy_floor is not None:
        fig.add_hline(
            y=100 * info.accuracy_floor,
            line={"dash": "dash", "color": COLORS["budget"], "width": 1},
            annotation_text="accuracy budget",
            annotation_position="bottom right",
        )
    if not info.points:
        _empty(fig, "no complete trial yet")
    _layout(fig, info.title(), info.latency_label, "validation accuracy (%)")
    return fig


@figure.register
def layers_figure(info: LayersInfo) -> go.Figure:
    """The per-layer heatmap as a plotly figure."""
    fig = go.Figure()
    if info.trials and info.layers:
        fig.add_trace(
            go.Heatmap(
                z=[list(row) for row in info.value],
                x=list(info.columns),
                y=list(info.layers),
                text=[[t.replace("\n", "<br>") for t in row] for row in info.text],
                texttemplate="%{text}",
                textfont={"size": FONT_SIZE - 1},
                customdata=[list(row) for row in info.labels],
                hovertemplate=f"%{{y}}<br>%{{x}}<br>%{{customdata}}<br>{info.measure}: %{{z:.3f}}<extra></extra>",
                colorscale="YlGnBu",
                zmin=0.0,
                zmax=1.0,
                xgap=2,
                ygap=2,
                colorbar={"title": {"text": "<br>".join(textwrap.wrap(info.measure, 14)), "side": "top"}},
            )
        )
        fig.update_yaxes(autorange="reversed")
    else:
        _empty(fig, "no feasible trial on the front yet")
    _layout(fig, info.title(), f"front member (trial, speedup), fastest first<br>{info.key()}", "")
    fig.update_layout(
        plot_bgcolor="#d9d9d9" if info.trials else "white",
        height=260 + 30 * max(len(info.layers), 4),
    )
    return fig


@figure.register
def progress_figure(info: ProgressInfo) -> go.Figure:
    """The search progress as a plotly figure."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    if info.trials:
        fig.add_trace(
            go.Scatter(
                x=list(info.trials),
                y=list(info.hypervolume),
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
            picked = [(t, s) for t, s, w in zip(info.trials, info.speedup, info.within_budget) if w == within]
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
                x=list(info.trials),
                y=list(info.best_speedup),
                mode="lines",
                line={"shape": "hv", "color": COLORS["front"], "width": 2},
                name=info.speedup_label(),
                hovertemplate="after trial %{x}: %{y:.2f}x<extra></extra>",
            ),
            row=2,
            col=1,
        )
    else:
        _empty(fig, "no complete trial yet")
    _layout(fig, info.title(), "", "")
    fig.update_yaxes(title_text=info.hypervolume_label(), row=1, col=1)
    fig.update_yaxes(title_text="speedup vs baseline (x)", row=2, col=1)
    fig.update_xaxes(title_text="trial number", row=2, col=1)
    fig.update_layout(height=620)
    return fig


def _empty(fig: go.Figure, message: str) -> None:
    """``message`` in the middle of a figure with no axes."""
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 16})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)


def _layout(fig: go.Figure, title: str, xlabel: str, ylabel: str) -> None:
    """The house title, template, fonts and axis titles (an empty label leaves its axis untitled)."""
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
