"""One self-contained HTML report of a study: settings, baseline, front, plots, per-layer choices, time.

The page references nothing outside itself: the plots are inline plotly figures with plotly's
JavaScript embedded once, and every text taken from the study is escaped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ranksearch.results import (
    dense_latency_beside_trials,
    disturbed_baseline_timing,
    latency_target,
    load_study,
    time_per_arithmetic,
    untrained_baseline,
)
from ranksearch.results.phases import WALL, phase_seconds
from ranksearch.results.plots import (
    LayersInfo,
    PlotInfo,
    StudyRows,
    plot_infos,
    plotly_html,
    render,
    require_plot_extra,
    study_directory,
)
from ranksearch.results.record import PHASES
from ranksearch.util import atomic_write_text

REPORT_FILE = "report.html"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1.5rem 2rem 4rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.3rem; margin-top: 2.4rem; border-bottom: 2px solid #e6550d; padding-bottom: 0.2rem; }
.meta { color: #555; margin-top: 0; }
nav a { margin-right: 1rem; color: #3182bd; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.92rem; }
th, td { padding: 0.28rem 0.7rem; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f3f3f3; }
td.text, th.text { text-align: left; }
.plot { margin: 1rem 0 2rem; border: 1px solid #e5e5e5; border-radius: 6px; padding: 0.4rem; }
details { margin: 0.5rem 0; }
summary { cursor: pointer; font-weight: 600; }
.muted { color: #777; }
.warning { color: #a63603; font-weight: 600; }
"""


def render_report(study: optuna.Study) -> str:
    """The report page of ``study`` as one HTML string."""
    rows = StudyRows.of(study)
    infos = plot_infos(rows)
    layers = next(info for info in infos if isinstance(info, LayersInfo))
    complete = len(rows.complete())
    failed = sum(r["state"] == "FAIL" for r in rows.trials)
    settings = rows.settings
    written = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = (
        f"{settings.get('model', '?')} on {settings.get('dataset', '?')} · {settings.get('sampler', '?')} sampler · "
        f"{complete} complete trials" + (f", {failed} failed" if failed else "") + f" · written {written}"
    )
    sections = {
        "baseline": (
            "Baseline",
            _baseline_table(rows.baseline, dense_latency_beside_trials(study))
            + _warning(untrained_baseline(study))
            + _warning(disturbed_baseline_timing(study)),
        ),
        "front": ("Pareto front", _front_table(rows)),
        "plots": ("Plots", _plots(infos)),
        "layers": ("Per-layer choices of the front members", _layer_details(rows, layers)),
        "time": ("Time per phase", _time_table(study)),
        "settings": (
            "Run settings",
            _table(["setting", "value"], [[k, _value(v)] for k, v in settings.items()], text_columns={0, 1}),
        ),
    }
    nav = " ".join(f'<a href="#{key}">{escape(title)}</a>' for key, (title, _) in sections.items())
    body = "\n".join(f'<h2 id="{key}">{escape(title)}</h2>\n{html}' for key, (title, html) in sections.items())
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>ranksearch report: {escape(rows.study_name)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f'<h1>ranksearch report: {escape(rows.study_name)}</h1>\n<p class="meta">{escape(meta)}</p>\n'
        f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


def write_report(study: optuna.Study, directory: Path, *, filename: str = REPORT_FILE) -> Path:
    """Write :func:`render_report` to ``directory/filename`` atomically; returns the path."""
    require_plot_extra()
    path = directory / filename
    atomic_write_text(path, render_report(study))
    return path


def report_study(
    ref: str | Path, *, results_dir: Path = Path("results"), storage: str | None = None, out: Path | None = None
) -> Path:
    """Write the report of a stored study (see :func:`~ranksearch.results.load_study`) to ``out``,
    by default ``report.html`` in the study's results directory."""
    study = load_study(ref, results_dir=results_dir, storage=storage)
    if out is None:
        return write_report(study, study_directory(ref, study, results_dir))
    return write_report(study, out.parent, filename=out.name)


def _baseline_table(base: Mapping[str, float], beside: Mapping[str, float] | None) -> str:
    """The dense model's measures (``beside``: its timings beside the trials, when recorded)."""
    if not base:
        return '<p class="muted">The baseline has not been measured yet.</p>'
    latency = [("latency", _fmt(base.get("latency_ms"), "{:.3f} ms"))]
    if beside is not None:
        latency = [
            (
                f"latency beside the trials (median of {beside['trials']:.0f})",
                f"{beside['median_ms']:.3f} ms ({beside['min_ms']:.3f}-{beside['max_ms']:.3f})",
            ),
            ("latency timed before the search", _fmt(base.get("latency_ms"), "{:.3f} ms")),
        ]
    items = [
        ("validation accuracy", _pct(base.get("accuracy"))),
        ("test accuracy", _pct(base.get("test_accuracy"))),
        *latency,
        ("parameters", _fmt(base.get("params"), "{:,.0f}")),
        ("MACs", _fmt(base.get("macs"), "{:,.0f}")),
        ("weights", _fmt(None if base.get("size_bytes") is None else base["size_bytes"] / 1e6, "{:.2f} MB")),
    ]
    return _table(["measure", "value"], [list(item) for item in items])


def _warning(text: str | None) -> str:
    return "" if text is None else f'<p class="warning">{escape(_sentence(text.removeprefix("warning: ")))}.</p>'


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _front_table(rows: StudyRows) -> str:
    if not rows.front:
        return '<p class="muted">No feasible trial is on the front yet.</p>'
    header = [
        "trial",
        "rung (steps)",
        "test accuracy",
        "test drop (pp) [95 %]",
        "after recovery: test accuracy, drop (pp) [95 %]; validation drop",
        "val accuracy",
        "latency (ms)",
        "speedup (rounds)",
        "drop (pp)",
        "params",
        "MACs",
        "techniques",
    ]
    body = [
        [
            f"{r['trial']}" + (f" ({r['anchor']})" if r["anchor"] else ""),
            f"{r['rung']}" + (f" ({r['finetune_steps']})" if r.get("finetune_steps") else ""),
            _pct(r["test_accuracy"]),
            _interval(r["test_drop_pp"], r["test_drop_low_pp"], r["test_drop_high_pp"]),
            _recovered_cell(r),
            _pct(r["accuracy"]),
            _fmt(r["latency_ms"], "{:.3f}"),
            _fmt(r["speedup"], "{:.2f}x")
            + (f" ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})" if r["speedup_low"] is not None else "")
            + (" re-timed" if r["retimed"] else "")
            + (f", {r['speedup_timings']} timings" if r.get("speedup_timings", 1) > 1 else ""),
            _fmt(r["accuracy_drop_pp"], "{:+.2f}"),
            _fmt(r["params"], "{:,.0f}"),
            _fmt(r["macs"], "{:,.0f}"),
            r["techniques"] + (f" +int8x{r['int8_layers']}" if r["int8_layers"] else ""),
        ]
        for r in rows.front
    ]
    note = (
        '<p class="muted">Fastest first. The speedup is measured beside the dense model in alternating rounds (the '
        "slowest and fastest round in brackets); every member but the dense model was faster in every round. Rung 0 "
        "is the search's short fine-tune; promoted configs are shown at the highest rung they reached. Test accuracy "
        "is measured once per front member at the end of the run, with the paired 95 % interval of its drop below "
        "the dense model on the same images; recovery fine-tunes a few members for real before measuring them "
        "again, on the test split and on the whole validation split (which the recovery's choices and export's "
        "accuracy rule read; the test split chooses nothing). Drop is in percentage points.</p>"
    )
    arithmetic = time_per_arithmetic(rows.front, rows.baseline.get("macs"))
    if arithmetic is not None:
        note += (
            f"<p>How much of the arithmetic saved became time saved (measured speedup / MAC reduction, median over "
            f"{arithmetic['members']:.0f} compressed members): <b>{arithmetic['median']:.2f}</b> (min "
            f"{arithmetic['min']:.2f}, max {arithmetic['max']:.2f}), in {escape(latency_target(rows.settings))}.</p>"
        )
    return _table(header, body, text_columns={0, 1, 3, 4, 7, 11}) + note


def _recovered_cell(row: Mapping[str, Any]) -> str:
    """A front member after recovery: test accuracy, test drop and, where measured, validation drop."""
    if row["recovered_test_accuracy"] is None:
        return "—"
    cell = (
        f"{_pct(row['recovered_test_accuracy'])}, "
        f"{_interval(row['recovered_drop_pp'], row['recovered_drop_low_pp'], row['recovered_drop_high_pp'])}"
        f" ({row['recovered_epochs']} epochs)"
    )
    if row["recovered_val_drop_pp"] is not None:
        drops = (row["recovered_val_drop_pp"], row["recovered_val_drop_low_pp"], row["recovered_val_drop_high_pp"])
        cell += f"; val {_interval(*drops)}"
    return cell


def _interval(drop: float | None, low: float | None, high: float | None) -> str:
    if drop is None or low is None or high is None:
        return "—"
    return f"{drop:+.2f} [{low:+.2f}, {high:+.2f}]"


def _plots(infos: Sequence[PlotInfo]) -> str:
    parts = []
    for i, info in enumerate(infos):
        figure = plotly_html(render(info, "plotly"), full_html=False, include_plotlyjs=i == 0)
        parts.append(f'<div class="plot" id="plot-{info.name}">\n{figure}\n</div>')
    return "\n".join(parts)


def _layer_details(rows: StudyRows, layers: LayersInfo) -> str:
    """A table per front member; the kept share is the heatmap's colour (see :class:`LayersInfo`)."""
    if not rows.front:
        return '<p class="muted">No feasible trial is on the front yet.</p>'
    parts = []
    for r in rows.front:
        config, column = rows.configs[r["trial"]], layers.trials.index(r["trial"])
        body = [
            [
                name,
                choice.technique,
                _value(choice.rank),
                "yes" if choice.int8 else "",
                "yes" if choice.data_aware else "",
                _fmt(layers.value[layers.layers.index(name)][column], "{:.3f}"),
            ]
            for name, choice in config.layers.items()
        ]
        summary = (
            f"trial {r['trial']}" + (f" ({r['anchor']})" if r["anchor"] else "") + f" · {_fmt(r['speedup'], '{:.2f}x')}"
            f" · val {_pct(r['accuracy'])} · {r['techniques']}"
        )
        header = ["layer", "technique", "rank", "int8", "data_aware", layers.measure]
        table = _table(header, body, text_columns={0, 1, 3, 4})
        opened = " open" if not parts else ""
        parts.append(f"<details{opened}>\n<summary>{escape(summary)}</summary>\n{table}\n</details>")
    note = (
        '<p class="muted">Fastest first (click a member to unfold it). A rank is a fraction of the layer\'s full '
        "rank (a float) or an absolute rank (an int), as in the config; pareto.json holds these configs.</p>"
    )
    return note + "\n".join(parts)


def _time_table(study: optuna.Study) -> str:
    trials = phase_seconds(study)
    run = dict(PHASES.read(study))
    if not trials and not run:
        return '<p class="muted">No time was recorded.</p>'
    total = trials.pop(WALL, 0.0)
    body = [
        [phase, f"{seconds:.1f}", f"{100 * seconds / total:.1f}%" if total else ""]
        for phase, seconds in sorted(trials.items(), key=lambda item: -item[1])
    ]
    body += [["all trials (wall clock)", f"{total:.1f}", "100.0%" if total else ""]]
    body += [[f"run: {phase}", f"{seconds:.1f}", ""] for phase, seconds in run.items()]
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))
    note = (
        f'<p class="muted">Evaluator phases summed over {n} trials, with their share of the trials\' wall time; '
        "run phases are outside the trials (last run).</p>"
    )
    return _table(["phase", "seconds", "share of trials"], body, text_columns={0}) + note


def _table(header: Sequence[str], body: Iterable[Sequence[str]], *, text_columns: set[int] | None = None) -> str:
    text = {0} if text_columns is None else text_columns

    def cell(tag: str, i: int, value: str) -> str:
        return f'<{tag} class="text">{escape(value)}</{tag}>' if i in text else f"<{tag}>{escape(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    lines = ["<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in body]
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(lines) + "\n</tbody>\n</table>"


def _fmt(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _pct(value: float | None) -> str:
    return _fmt(None if value is None else 100 * value, "{:.2f}%")


def _value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)
