"""Plots: written at the end of a real tiny search, computed from the same rows as the tables, exact hypervolume."""

from __future__ import annotations

import math
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from conftest import TINY_SEARCH_DROP
from optuna.trial import TrialState
from PIL import Image
from typer.testing import CliRunner

import ranksearch as rs
from ranksearch.cli import app
from ranksearch.models import build_model
from ranksearch.results import best_speedup_within
from ranksearch.results.hypervolume import hypervolume_2d
from ranksearch.results.plots import StudyRows, plot_infos, write_plots
from ranksearch.results.plots.layers import PARAMS_MEASURE, RANK_MEASURE, layers_info
from ranksearch.results.plots.pareto import pareto_info
from ranksearch.results.plots.progress import progress_info
from ranksearch.results.record import BASELINE, MODEL, SETTINGS
from ranksearch.search import record_input_shapes

NAMES = ("pareto", "layers", "progress")


@pytest.fixture(scope="module")
def tiny_run(tiny_search):
    """The session's tiny search (7 trials: 5 anchors, 2 sampled; an accuracy constraint of TINY_SEARCH_DROP points)."""
    return tiny_search[1]


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [value or "" for name, value in attrs if name in ("src", "href", "action", "srcset")]


def external_references(html: str) -> list[str]:
    """``src``/``href`` attributes of the page's tags that point outside it (not ``#...`` or ``data:``)."""
    parser = _References()
    parser.feed(html)
    return [ref for ref in parser.found if not ref.startswith(("#", "data:"))]


def decoded_png(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image.convert("RGB")


def test_the_run_writes_every_plot_as_png_and_offline_html(tiny_run) -> None:
    for name in NAMES:
        png, html = tiny_run.directory / f"{name}.png", tiny_run.directory / f"{name}.html"
        image = decoded_png(png)
        assert image.width >= 600 and image.height >= 400
        assert len(image.getcolors(maxcolors=1 << 20) or []) > 50, f"{png} looks blank"
        text = html.read_text()
        assert len(text) > 1_000_000 and "Plotly.newPlot" in text  # plotly.js is inlined, not loaded from a CDN
        assert external_references(text) == []
    assert not list(tiny_run.directory.glob(".*.tmp"))


def test_pareto_plot_shows_what_the_tables_hold(tiny_run) -> None:
    trials = pd.read_csv(tiny_run.directory / "trials.csv")
    pareto = pd.read_csv(tiny_run.directory / "pareto.csv")
    info = pareto_info(StudyRows.of(tiny_run.study))
    assert list(info.front) == list(pareto["trial"])  # same members, fastest first
    complete = trials[trials["state"] == "COMPLETE"].set_index("trial")
    members = pareto.set_index("trial")
    assert [p.trial for p in info.points] == list(complete.index)
    for point in info.points:
        row = complete.loc[point.trial]
        assert point.accuracy == pytest.approx(row["accuracy"])
        # a new study: relative to the dense model; a front member at its config's pooled speedup, as pareto.csv
        speedup = members.loc[point.trial, "speedup"] if point.trial in members.index else row["speedup"]
        assert point.latency == pytest.approx(1 / speedup)
        assert point.feasible == bool(row["feasible"])
        assert point.anchor == ("" if pd.isna(row["anchor"]) else row["anchor"])
        assert f"trial {point.trial}" in point.hover[0] and any("speedup" in line for line in point.hover)
    assert {p.anchor for p in info.points} >= {"baseline", "uniform svd@0.5"}
    baseline = tiny_run.baseline["accuracy"]
    assert info.accuracy_floor == pytest.approx(baseline - TINY_SEARCH_DROP / 100)
    assert info.latency_label.startswith("latency relative to the dense model")
    assert "eager torch on cpu, batch 1, 1 thread)" in info.latency_label  # the target: tiny runs time unfolded


@pytest.mark.parametrize(
    ("settings", "target"),
    [
        (
            {"device": "cuda", "latency_device": "cpu", "fold_batchnorm": True, "threads": 4},
            "eager torch, BatchNorm folded on cpu, batch 1, 4 threads",
        ),
        (
            {"latency_backend": "onnxruntime", "device": "cpu", "latency_batch": 8},
            "ONNX Runtime on cpu, batch 8, default threads",
        ),
        ({}, "eager torch on cpu, batch 1, default threads"),  # a study from before these settings were recorded
    ],
)
def test_the_latency_axis_names_the_target(settings: dict, target: str) -> None:
    rows = StudyRows("s", [], [], [], {}, settings, {}, None, relative=True)
    assert rows.latency_label().endswith(f"(1 / speedup; {target})")


def test_long_labels_are_wrapped_inside_the_figures() -> None:
    """The axis naming a folded, multi-threaded target and the heatmap's title over a long study name are wrapped,
    not cut off at the figure's edges."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ranksearch.results.plots.matplotlib_figures import figure

    settings = {"device": "cuda", "latency_device": "cpu", "fold_batchnorm": True, "threads": 16, "latency_batch": 32}
    pareto = pareto_info(StudyRows("s", [], [], [], {}, settings, {}, None, relative=True))
    layers = replace(layers_info(StudyRows.of(synthetic_study())), study_name="resnet18-fashion_mnist-resnet-long")
    for info, text, what in ((pareto, pareto.latency_label, "xlabel"), (layers, layers.title(), "title")):
        fig = figure(info)
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)  # the constrained layout runs on drawing
        label = fig.axes[0].xaxis.label if what == "xlabel" else fig.axes[0].title
        box, page = label.get_window_extent(renderer), fig.bbox
        assert label.get_text().replace("\n", " ") == text
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, what


def test_heatmap_rows_are_the_searched_layers_and_cells_match_the_tables(tiny_run) -> None:
    trials = pd.read_csv(tiny_run.directory / "trials.csv").set_index("trial")
    pareto = pd.read_csv(tiny_run.directory / "pareto.csv")
    info = layers_info(StudyRows.of(tiny_run.study))
    searched = [c.removeprefix("layer:") for c in trials.columns if c.startswith("layer:")]
    assert list(info.layers) == searched and searched  # the runner wrote the search space's layers, in order
    assert list(info.trials) == list(pareto["trial"])
    for i, layer in enumerate(info.layers):
        assert list(info.labels[i]) == [trials.loc[t, f"layer:{layer}"] for t in info.trials]
        for j, label in enumerate(info.labels[i]):
            assert 0.0 < info.value[i][j] <= 1.0
            if label.startswith("keep"):
                assert info.value[i][j] == 1.0
            assert ("int8" in info.text[i][j]) == ("+int8" in label)
    assert info.measure == PARAMS_MEASURE  # the study records its model spec, so parameters are counted


def test_heatmap_parameter_shares_add_up_to_the_trials_parameter_counts(tiny_run) -> None:
    spec = MODEL.read(tiny_run.study)
    model = build_model(
        spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"], image_size=spec["image_size"]
    )
    size = spec["image_size"]
    shapes = record_input_shapes(model, torch.zeros(1, spec["in_channels"], size, size))
    modules = dict(model.named_modules())
    info = layers_info(StudyRows.of(tiny_run.study))
    pareto = pd.read_csv(tiny_run.directory / "pareto.csv").set_index("trial")
    dense_total = tiny_run.baseline["params"]
    for j, trial in enumerate(info.trials):
        saved = sum(
            (1.0 - info.value[i][j]) * rs.layer_cost(modules[layer], "keep", None, shapes[layer]).params
            for i, layer in enumerate(info.layers)
        )
        assert dense_total - saved == pytest.approx(pareto.loc[trial, "params"], abs=0.5)


def test_progress_is_monotone_and_agrees_with_the_progress_bar(tiny_run) -> None:
    study = tiny_run.study
    info = progress_info(StudyRows.of(study))
    complete = [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert list(info.trials) == complete
    assert all(b >= a for a, b in zip(info.hypervolume, info.hypervolume[1:]))
    assert info.hypervolume[-1] > 0
    assert info.budget_pp == TINY_SEARCH_DROP
    assert info.best_speedup[-1] == pytest.approx(best_speedup_within(study, TINY_SEARCH_DROP))
    assert info.relative and info.hypervolume_label() == "hypervolume (accuracy × relative latency)"
    assert info.reference_label().endswith(f"{info.reference[1]:.3f} x the dense latency)")


def synthetic_study() -> optuna.Study:
    """Six hand-made trials: front, infeasible, failed; the accuracy constraint (and budget) is 2 pp.

    Trial: (accuracy, latency ms, drop pp, speedup): 0 (0.70, 5, 20, 1.1) infeasible; 1 (0.80, 2, 0.5, 2.0);
    2 (0.95, 1, 3.0, 5.0) infeasible; 3 failed; 4 (0.90, 4, 0.9, 1.5); 5 (0.85, 3, 1.2, 3.0).
    """
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="synthetic")
    SETTINGS.write(study, {"max_accuracy_drop": 2.0, "device": "cpu", "threads": 1, "latency_batch": 1})
    BASELINE.write(study, {"accuracy": 0.905, "latency_ms": 6.0, "params": 1000, "macs": 5000})
    configs = {
        1: {"conv1": {"technique": "svd", "rank": 0.5}, "conv2": {"technique": "keep"}},
        4: {"conv1": {"technique": "tucker2", "rank": [0.25, 0.5], "int8": True}, "conv2": {"technique": "keep"}},
        5: {"conv1": {"technique": "svd", "rank": 64}, "conv2": {"technique": "cp", "rank": 0.25}},
    }
    rows = [(0.70, 5.0, 20.0, 1.1), (0.80, 2.0, 0.5, 2.0), (0.95, 1.0, 3.0, 5.0), None, (0.90, 4.0, 0.9, 1.5)]
    rows.append((0.85, 3.0, 1.2, 3.0))
    for number, row in enumerate(rows):
        layers = configs.get(number, {"conv1": {"technique": "keep"}, "conv2": {"technique": "keep"}})
        attrs = {"config": {"version": 1, "rank_multiple": 8, "layers": layers}, "params": 900 - number}
        if row is None:
            study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={**attrs, "fail_reason": "x"}))
            continue
        accuracy, latency, drop, speedup = row
        attrs.update(accuracy=accuracy, latency_ms=latency, accuracy_drop_pp=drop, speedup=speedup)
        attrs.update(anchor="baseline" if number == 0 else "")
        study.add_trial(
            optuna.trial.create_trial(
                values=[accuracy, latency], user_attrs=attrs, constraints={"accuracy_drop": drop - 2.0}
            )
        )
    return study


def test_hypervolume_matches_a_hand_computed_sweep() -> None:
    study = synthetic_study()
    info = progress_info(StudyRows.of(study))
    assert info.trials == (0, 1, 2, 4, 5)
    assert info.reference == pytest.approx((0.70, 5.5))
    # Reference (0.70, 5.5). Trial 0 is infeasible: 0. Trial 1 adds (5.5 - 2) x (0.80 - 0.70) = 0.35.
    # Trial 2 is infeasible: +0. Trial 4 adds (5.5 - 4) x (0.90 - 0.80) = 0.15. Trial 5 moves the left edge of the
    # 0.80-0.85 strip from 4 ms (trial 4) to 3 ms: +(4 - 3) x 0.05 = 0.05.
    assert info.hypervolume == pytest.approx((0.0, 0.35, 0.35, 0.50, 0.55))
    assert info.budget_pp == 2.0
    assert info.hypervolume_label() == "hypervolume (accuracy × ms)"  # a study of an earlier release: milliseconds
    assert info.reference_label() == "feasible front vs reference (accuracy 70.00%, 5.500 ms)"
    assert info.within_budget == (False, True, False, True, True)
    assert info.best_speedup == (None, 2.0, 2.0, 2.0, 3.0)
    assert info.best_speedup[-1] == best_speedup_within(study, 2.0)
    assert hypervolume_2d([], (0.5, 1.0)) == 0.0
    assert hypervolume_2d([(0.9, 2.0)], (0.5, 1.0)) == 0.0  # slower than the reference


def test_synthetic_study_marks_failed_and_infeasible_trials_and_falls_back_to_rank_fractions() -> None:
    study = synthetic_study()
    rows = StudyRows.of(study)
    pareto = pareto_info(rows)
    assert pareto.front == (1, 5, 4)
    assert pareto.failed == 1 and "1 failed" in pareto.title() and "2 infeasible" in pareto.title()
    assert [p.trial for p in pareto.points if not p.feasible] == [0, 2]
    assert pareto.accuracy_floor == pytest.approx(0.885)
    layers = layers_info(rows)
    assert layers.measure == RANK_MEASURE  # no model spec recorded: rank fractions from the configs
    assert layers.layers == ("conv1", "conv2")
    assert layers.value == ((0.5, None, 0.375), (1.0, 0.25, 1.0))
    assert layers.text == (("SVD .5", "SVD r64", "TK2 .25/.5\nint8"), ("keep", "CP .25", "keep"))


def test_write_plots_renders_edge_cases(tmp_path: Path) -> None:
    empty = optuna.create_study(directions=["maximize", "minimize"], study_name="empty")
    for study, directory in ((synthetic_study(), tmp_path / "synthetic"), (empty, tmp_path / "empty")):
        paths = write_plots(study, directory)
        assert sorted(p.name for p in paths) == sorted(f"{n}.{ext}" for n in NAMES for ext in ("png", "html"))
        assert all(decoded_png(p).width > 0 for p in paths if p.suffix == ".png")
    assert [info.name for info in plot_infos(empty)] == list(NAMES)
    assert not math.isnan(progress_info(StudyRows.of(empty)).reference[1])


def test_plot_command_rewrites_the_plots(tiny_run) -> None:
    png = tiny_run.directory / "pareto.png"
    png.unlink()
    result = CliRunner().invoke(app, ["plot", str(tiny_run.directory)])
    assert result.exit_code == 0, result.output
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert len(printed) == 6 and png in printed and png.is_file()
    missing = CliRunner().invoke(app, ["plot", "no-such-study", "--results-dir", str(tiny_run.directory.parent)])
    assert missing.exit_code == 2 and "no-such-study" in missing.stderr
