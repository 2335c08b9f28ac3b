"""The HTML report: self-contained, complete, escaped, and rendered by a real headless Chromium."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import CHROMIUM, require_tool
from PIL import Image
from rich.console import Console
from test_plots import decoded_png, external_references, synthetic_study
from typer.testing import CliRunner

from ranksearch.cli import app
from ranksearch.results import front_rows, time_per_arithmetic, untrained_baseline
from ranksearch.results.html_report import render_report, write_report
from ranksearch.results.record import BASELINE, MODEL, SETTINGS
from ranksearch.results.show import show_study
from ranksearch.study import RunSettings
from ranksearch.study.progress import SearchProgress

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def tiny_run(tiny_search):
    """The session's tiny search (7 trials: the baseline and uniform anchors, 2 sampled)."""
    return tiny_search[1]


@pytest.fixture(scope="module")
def report(tiny_run) -> Path:
    return write_report(tiny_run.study, tiny_run.directory)


def test_report_holds_the_front_baseline_plots_layers_and_time(tiny_run, report) -> None:
    html = report.read_text()
    assert report == tiny_run.directory / "report.html"
    front = front_rows(tiny_run.study)
    assert front
    for row in front:
        assert f'<td class="text">{row["trial"]}' in html  # the front table
        assert f"<summary>trial {row['trial']}" in html  # its per-layer details
        assert f"{100 * row['test_accuracy']:.2f}%" in html
    assert f"{tiny_run.baseline['params']:,}" in html and f"{tiny_run.baseline['macs']:,}" in html
    assert html.count('class="plot"') == 3 and html.count("Plotly.newPlot") == 3
    assert "all trials (wall clock)" in html and "run: load" in html  # trial phases and the run's phases
    assert "layer1.0.conv1" in html
    arithmetic = time_per_arithmetic(front, tiny_run.baseline["macs"])
    if arithmetic is not None:  # compressed members on the front
        assert f"MAC reduction, median over {arithmetic['members']:.0f} compressed members" in html
        assert f"<b>{arithmetic['median']:.2f}</b>" in html and "eager torch on cpu, batch 1, 1 thread" in html


def test_time_per_arithmetic_is_speedup_over_mac_reduction() -> None:
    rows = [{"speedup": 2.0, "macs": 25.0}, {"speedup": 1.5, "macs": 50.0}, {"speedup": 1.0, "macs": 100.0}]
    assert time_per_arithmetic(rows, 100.0) == {"median": 0.625, "min": 0.5, "max": 0.75, "members": 2.0}
    assert time_per_arithmetic(rows[2:], 100.0) is None  # the dense model alone
    assert time_per_arithmetic(rows, None) is None  # a study without the dense model's MACs


@pytest.mark.parametrize(
    ("accuracy", "classes", "warned"),
    [
        (0.05, 20, True),  # chance
        (0.14, 20, True),  # under 0.05 + 0.1 x 0.95 = 0.145
        (0.15, 20, False),
        (0.18, 10, True),
        (0.92, 10, False),
        (0.54, 2, True),
        (0.56, 2, False),
        (0.05, None, False),  # classes not recorded (a study of an earlier release)
        (None, 10, False),  # baseline not measured yet
    ],
)
def test_untrained_baseline_is_within_a_tenth_of_the_way_from_chance(
    accuracy: float | None, classes: int | None, warned: bool
) -> None:
    study = synthetic_study()
    BASELINE.write(study, {} if accuracy is None else {**BASELINE.read(study), "accuracy": accuracy})
    if classes is not None:
        MODEL.write(study, {"name": "resnet18", "num_classes": classes})
    warning = untrained_baseline(study)
    assert (warning is not None) == warned
    if warned:
        assert f"{accuracy:.1%} on validation" in warning and f"for {classes} classes" in warning
        assert "--baseline-epochs" in warning and "--checkpoint" in warning


@pytest.mark.parametrize("accuracy", [0.905, 0.11])
def test_report_and_show_warn_of_a_baseline_near_chance(accuracy: float) -> None:
    study = synthetic_study()
    BASELINE.write(study, {**BASELINE.read(study), "accuracy": accuracy})
    MODEL.write(study, {"name": "resnet18", "num_classes": 10})
    html = render_report(study)
    console = Console(record=True, width=400)
    show_study(study, console=console)
    shown = console.export_text()
    near = accuracy < 0.19
    assert ('<p class="warning">The dense model scores 11.0% on validation, near chance' in html) == near
    assert ("near chance (10.0% for 10 classes)" in shown) == near


def test_report_references_nothing_outside_itself(report) -> None:
    html = report.read_text()
    assert external_references(html) == []
    assert "<link" not in html and "@import" not in html


def test_report_escapes_text_from_the_study() -> None:
    study = synthetic_study()
    SETTINGS.write(study, {**SETTINGS.read(study), "model": "</td><script>alert(1)</script>"})
    html = render_report(study)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert external_references(html) == []


def test_report_command_writes_where_asked(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "r.html"
    args = ["report", tiny_run.study.study_name, "--results-dir", str(tiny_run.directory.parent), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and out.stat().st_size > 1_000_000


def test_report_renders_in_headless_chromium(tiny_run, report, tmp_path: Path) -> None:
    require_tool("chromium")  # a skip here, a failure under CI
    from playwright.sync_api import sync_playwright

    pages = [report] + [tiny_run.directory / f"{name}.html" for name in ("pareto", "layers", "progress")]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for path in pages:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                errors: list[str] = []
                requests: list[str] = []
                page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.on("request", lambda r, requests=requests: requests.append(r.url))
                page.goto(path.as_uri(), wait_until="load")
                expected = 3 if path == report else 1
                page.wait_for_function(
                    f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}", timeout=30_000
                )
                drawn = page.evaluate(
                    "Array.from(document.querySelectorAll('.js-plotly-plot')).map("
                    "p => p.querySelectorAll('.scatterlayer .trace, .heatmaplayer image').length)"
                )
                assert len(drawn) == expected and all(n > 0 for n in drawn), (path.name, drawn)
                assert errors == [], (path.name, errors)
                assert all(url.startswith(("file:", "data:", "blob:")) for url in requests), requests
                if path == report:
                    shot = tmp_path / "report.png"
                    page.screenshot(path=str(shot), full_page=True)
                page.close()
        finally:
            browser.close()
    image = decoded_png(shot)
    assert image.width == 1280 and image.height > 2000
    assert len(Image.Image.getcolors(image, maxcolors=1 << 20) or []) > 100  # not blank


@pytest.mark.parametrize(("accuracy", "status"), [(0.905, "best 2.00x within 1 pp"), (0.11, "near chance")])
def test_progress_claims_no_accuracy_budget_for_a_baseline_near_chance(accuracy: float, status: str) -> None:
    study = synthetic_study()
    BASELINE.write(study, {**BASELINE.read(study), "accuracy": accuracy})
    MODEL.write(study, {"name": "resnet18", "num_classes": 10})
    out = io.StringIO()
    with SearchProgress(study, RunSettings.of(model="resnet18", budget=6), Console(file=out, width=300)):
        pass
    line = out.getvalue().splitlines()[0]
    assert line.startswith("trials 5/6") and status in line
    assert ("within 1 pp" in line) == (accuracy > 0.19)
