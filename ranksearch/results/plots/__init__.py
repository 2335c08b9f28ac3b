"""A study's plots, each computed once and rendered by each backend (the Optuna way).

``plot_infos(study)`` derives what every plot shows from the rows ``trials.csv`` and ``pareto.csv``
are written from (:func:`~ranksearch.results.trial_rows`, :func:`~ranksearch.results.front_rows`),
so tables and plots never disagree. Each plot has a module computing its info, backend-free
(:mod:`.pareto`, :mod:`.layers`, :mod:`.progress`), and one function per backend drawing it:
:mod:`.matplotlib_figures` (PNG on matplotlib's Agg canvas, no pyplot state) and
:mod:`.plotly_figures` (written as self-contained interactive HTML: the plotly JavaScript is
inlined, so the page works offline). :func:`render` picks the backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import optuna

from ranksearch.errors import RanksearchError
from ranksearch.results import STORAGE_FILE, layer_order, load_study
from ranksearch.results.hypervolume import hypervolume_2d
from ranksearch.results.plots.layers import (
    PARAMS_MEASURE,
    RANK_MEASURE,
    SHORT_NAMES,
    LayersInfo,
    cell_text,
    kept_fraction,
    layer_param_shares,
    layers_info,
)
from ranksearch.results.plots.pareto import ParetoInfo, Point, pareto_info
from ranksearch.results.plots.progress import ProgressInfo, progress_info
from ranksearch.results.plots.rows import DEFAULT_ACCURACY_BUDGET_PP, PlotInfo, StudyRows
from ranksearch.results.plots.style import HTML_CONFIG
from ranksearch.util import atomic_open, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from plotly.graph_objects import Figure as PlotlyFigure
    from rich.console import Console

__all__ = [
    "DEFAULT_ACCURACY_BUDGET_PP",
    "PARAMS_MEASURE",
    "RANK_MEASURE",
    "SHORT_NAMES",
    "Backend",
    "LayersInfo",
    "ParetoInfo",
    "PlotInfo",
    "Point",
    "ProgressInfo",
    "StudyRows",
    "cell_text",
    "hypervolume_2d",
    "kept_fraction",
    "layer_order",
    "layer_param_shares",
    "layers_info",
    "pareto_info",
    "plot_infos",
    "plot_study",
    "plotly_html",
    "progress_info",
    "render",
    "require_plot_extra",
    "study_directory",
    "write_plots",
    "write_plots_or_warn",
]

Backend = Literal["matplotlib", "plotly"]


def plot_infos(study: optuna.Study | StudyRows) -> list[PlotInfo]:
    """The Pareto plot, the per-layer heatmap and the search progress, computed from one read of the study."""
    rows = study if isinstance(study, StudyRows) else StudyRows.of(study)
    return [pareto_info(rows), layers_info(rows), progress_info(rows)]


@overload
def render(info: PlotInfo, backend: Literal["matplotlib"]) -> Figure: ...
@overload
def render(info: PlotInfo, backend: Literal["plotly"]) -> PlotlyFigure: ...
def render(info: PlotInfo, backend: Backend) -> Any:
    """``info`` drawn by ``backend`` (which needs the plot extra: see :func:`require_plot_extra`)."""
    if backend == "matplotlib":
        from ranksearch.results.plots.matplotlib_figures import figure
    elif backend == "plotly":
        from ranksearch.results.plots.plotly_figures import figure
    else:
        raise ValueError(f"unknown plot backend {backend!r}; choose matplotlib or plotly")
    return figure(info)


def write_plots(study: optuna.Study, directory: Path) -> list[Path]:
    """``pareto``, ``layers`` and ``progress`` as ``.png`` and self-contained ``.html`` in ``directory``, atomically."""
    require_plot_extra()
    paths = []
    for info in plot_infos(study):
        png, html = directory / f"{info.name}.png", directory / f"{info.name}.html"
        figure = render(info, "matplotlib")
        with atomic_open(png, "wb") as handle:
            figure.savefig(handle, format="png", dpi=130)
        atomic_write_text(html, plotly_html(render(info, "plotly"), full_html=True, include_plotlyjs=True))
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


def write_plots_or_warn(study: optuna.Study, directory: Path, console: Console) -> list[Path]:
    """:func:`write_plots` at the end of a run: an error is printed on ``console``, never raised, so it cannot
    mask the run's own outcome (the results files are written before)."""
    try:
        return write_plots(study, directory)
    except Exception as exc:
        console.print(f"plots not written ({type(exc).__name__}: {exc}); retry with `ranksearch plot {directory}`")
        return []
