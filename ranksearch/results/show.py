"""Look at a study from the terminal: its Pareto front (or every trial) as a rich table, CSV or JSON."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO

import optuna
import pandas as pd
from rich.console import Console
from rich.table import Table

from ranksearch.errors import RanksearchError
from ranksearch.results import (
    baseline,
    choice_label,
    dense_latency_beside_trials,
    disturbed_baseline_timing,
    finite,
    front_rows,
    front_trials,
    layer_order,
    trial_rows,
    untrained_baseline,
)
from ranksearch.results.record import TEST_ACCURACY, records

__all__ = ["SHOW_FORMATS", "show_rows", "show_study"]

SHOW_FORMATS = ("table", "csv", "json")


def show_rows(study: optuna.Study, *, all_trials: bool = False) -> list[dict[str, Any]]:
    """The Pareto front, fastest first (or every trial, by number), with per-layer choices as ``layer:NAME``.

    Front rows are :func:`~ranksearch.results.front_rows`; all-trials rows are
    :func:`~ranksearch.results.trial_rows` plus ``test_accuracy`` (front members only, where measured),
    ``front`` and a ``techniques`` summary.
    """
    names = layer_order(study)
    if all_trials:
        tests = TEST_ACCURACY.read(study)
        # Each read after the one before: with workers completing trials meanwhile, each holds what came before.
        rows, front = trial_rows(study, names), {t.number for t in front_trials(study)}
        configs = {t.number: t.layers for t in records(study)}
        shown = []
        for row in rows:
            number = row["trial"]
            head = {k: v for k, v in row.items() if not k.startswith("layer:")}
            layers = {k: v for k, v in row.items() if k.startswith("layer:")}
            extra = {"front": number in front, "test_accuracy": tests.get(str(number))}
            shown.append({**head, **extra, "techniques": _techniques(configs[number]), **layers})
        return shown
    front = front_rows(study)
    layers = {t.number: t.layers for t in records(study)}
    return [
        {**row, **{f"layer:{n}": choice_label(layers[row["trial"]].get(n, {"technique": "keep"})) for n in names}}
        for row in front
    ]


def show_study(
    study: optuna.Study,
    *,
    all_trials: bool = False,
    fmt: Literal["table", "csv", "json"] = "table",
    console: Console | None = None,
    out: TextIO | None = None,
) -> None:
    """Print :func:`show_rows`: a rich table on ``console``, or CSV / JSON (``{study, baseline, rows}``) on ``out``."""
    if fmt not in SHOW_FORMATS:
        raise RanksearchError(f"--format {fmt!r} is unknown; choose one of {', '.join(SHOW_FORMATS)}")
    rows = show_rows(study, all_trials=all_trials)
    out = sys.stdout if out is None else out
    if fmt == "csv":
        out.write(pd.DataFrame(rows).to_csv(index=False) if rows else "")
    elif fmt == "json":
        document = {"study": study.study_name, "baseline": baseline(study), "rows": rows}
        out.write(json.dumps(finite(document), indent=2) + "\n")
    else:
        (console or Console()).print(_table(study, rows, all_trials=all_trials))


def _labels(row: Mapping[str, Any]) -> dict[str, str]:
    """Intervals as one cell each: the paired test drop, the recovered accuracy and drops, the rounds' speedups."""
    labels = {}
    if row.get("test_drop_pp") is not None:
        labels["test_drop"] = (
            f"{row['test_drop_pp']:+.2f} [{row['test_drop_low_pp']:+.2f}, {row['test_drop_high_pp']:+.2f}]"
        )
    if row.get("recovered_test_accuracy") is not None:
        labels["recovered"] = (
            f"{100 * row['recovered_test_accuracy']:.2f} ({row['recovered_drop_pp']:+.2f} "
            f"[{row['recovered_drop_low_pp']:+.2f}, {row['recovered_drop_high_pp']:+.2f}])"
        )
    if row.get("recovered_val_drop_pp") is not None:
        labels["recovered_val"] = (
            f"{row['recovered_val_drop_pp']:+.2f} "
            f"[{row['recovered_val_drop_low_pp']:+.2f}, {row['recovered_val_drop_high_pp']:+.2f}]"
        )
    if row.get("speedup_low") is not None and row.get("speedup_high") is not None:
        notes = ["re-timed"] if row.get("retimed") else []
        if row.get("speedup_timings", 1) > 1:
            notes.append(f"{row['speedup_timings']} timings")
        labels["speedup_rounds"] = f"{row['speedup_low']:.2f}-{row['speedup_high']:.2f}x" + (
            f" ({', '.join(notes)})" if notes else ""
        )
    return labels


def _techniques(layers: Mapping[str, Mapping[str, Any]]) -> str:
    counts = Counter(choice["technique"] for choice in layers.values())
    return " ".join(f"{t}x{n}" for t, n in counts.most_common() if t != "keep") or "none"


def _number(fmt: str, scale: float = 1.0) -> Callable[[Any], str]:
    def render(value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "—"
        return fmt.format(value * scale)

    return render


_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("trial", "trial", str),
    ("state", "state", str),
    ("front", "front", lambda v: "*" if v else ""),
    ("anchor", "anchor", str),
    ("accuracy", "val acc %", _number("{:.2f}", 100)),
    ("test_accuracy", "test acc %", _number("{:.2f}", 100)),
    ("accuracy_drop_pp", "drop pp", _number("{:+.2f}")),
    ("test_drop", "test drop pp [95 %]", str),
    ("recovered", "recovered: test acc % (drop [95 %])", str),
    ("recovered_val", "recovered: val drop [95 %]", str),
    ("latency_ms", "latency ms", _number("{:.3f}")),
    ("speedup", "speedup", _number("{:.2f}x")),
    ("speedup_rounds", "rounds", str),
    ("params", "params M", _number("{:.3f}", 1e-6)),
    ("macs", "MMACs", _number("{:.1f}", 1e-6)),
    ("techniques", "techniques", str),
    ("int8_layers", "int8", str),
    ("fail_reason", "fail reason", str),
)


def _table(study: optuna.Study, rows: list[dict[str, Any]], *, all_trials: bool) -> Table:
    """The rows as a rich table (per-layer columns left out), titled by the study and captioned by the baseline."""
    what = f"all {len(rows)} trials" if all_trials else f"Pareto front, {len(rows)} trials, fastest first"
    base, beside = baseline(study), dense_latency_beside_trials(study)
    latency = (
        f"{beside['median_ms']:.3f} ms (median of {beside['trials']:.0f} timings beside the trials)"
        if beside is not None
        else f"{base.get('latency_ms', math.nan):.3f} ms"
    )
    caption = (
        f"baseline: val acc {base['accuracy']:.2%}, {latency}, {base['params'] / 1e6:.3f} M params"
        if {"accuracy", "latency_ms", "params"} <= set(base)
        else "baseline not measured yet"
    )
    if not rows:
        caption += "; no complete feasible trial yet" if not all_trials else "; no trial yet"
    for warning in (untrained_baseline(study), disturbed_baseline_timing(study)):
        if warning is not None:
            caption += f"\n[yellow]{warning}[/]"
    rows = [{**row, **_labels(row)} for row in rows]
    columns = [c for c in _COLUMNS if any(c[0] in row for row in rows)] or list(_COLUMNS[:1])
    table = Table(*(header for _, header, _ in columns), title=f"{study.study_name}: {what}", caption=caption)
    for row in rows:
        table.add_row(*(render(row.get(key)) if row.get(key) is not None else "—" for key, _, render in columns))
    return table
