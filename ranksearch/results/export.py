"""Look at a study from the terminal, pick one trial (by number or by rule) and export it as a rebuildable config.

An exported file is a :class:`~ranksearch.config.CompressionConfig` with two optional sections
filled in: ``model`` (how to rebuild the uncompressed model: ``build_model`` arguments and the
baseline weights' file) and ``meta`` (provenance: study, storage, trial, measured metrics,
baseline, settings, library versions, date). ``ranksearch.apply_config(model, path)`` reads it
like any config; :func:`build_from_config` rebuilds the compressed model from it alone.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import optuna
import pandas as pd
import torch
import torchvision
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table
from torch import nn

import ranksearch
from ranksearch.compress import Init, apply_config, quantize_layers
from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError
from ranksearch.models import build_model, load_checkpoint
from ranksearch.results import (
    MODEL_KEY,
    SETTINGS_KEY,
    TEST_ACCURACY_KEY,
    _finite,
    baseline,
    choice_label,
    front_rows,
    front_trials,
    is_feasible,
    trial_rows,
)

__all__ = [
    "SHOW_FORMATS",
    "build_from_config",
    "export_config",
    "export_trial",
    "select_trial",
    "show_rows",
    "show_study",
]

SHOW_FORMATS = ("table", "csv", "json")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
TOLERANCE = 1e-9
"""Slack in the rules' comparisons, so a bound equal to a printed metric includes it despite rounding."""
MODEL_FIELDS = ("name", "num_classes", "in_channels", "image_size")
"""The ``build_model`` arguments an exported ``model`` section must hold (plus ``checkpoint``, the weights' file)."""


def show_rows(study: optuna.Study, *, all_trials: bool = False) -> list[dict[str, Any]]:
    """The Pareto front, fastest first (or every trial, by number), with per-layer choices as ``layer:NAME``.

    Front rows are :func:`~ranksearch.results.front_rows`; all-trials rows are
    :func:`~ranksearch.results.trial_rows` plus ``test_accuracy`` (front members only, where measured),
    ``front`` and a ``techniques`` summary.
    """
    names = _layer_names(study)
    if all_trials:
        tests = study.user_attrs.get(TEST_ACCURACY_KEY, {})
        front = {t.number for t in front_trials(study)}
        configs = {t.number: t.user_attrs.get("config", {}).get("layers", {}) for t in study.get_trials(deepcopy=False)}
        rows = []
        for row in trial_rows(study, names):
            number = row["trial"]
            head = {k: v for k, v in row.items() if not k.startswith("layer:")}
            layers = {k: v for k, v in row.items() if k.startswith("layer:")}
            extra = {"front": number in front, "test_accuracy": tests.get(str(number))}
            rows.append({**head, **extra, "techniques": _techniques(configs[number]), **layers})
        return rows
    layers = {t.number: t.user_attrs.get("config", {}).get("layers", {}) for t in front_trials(study)}
    return [
        {**row, **{f"layer:{n}": choice_label(layers[row["trial"]].get(n, {"technique": "keep"})) for n in names}}
        for row in front_rows(study)
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
        out.write(json.dumps(_finite(document), indent=2) + "\n")
    else:
        (console or Console()).print(_table(study, rows, all_trials=all_trials))


def select_trial(
    study: optuna.Study,
    *,
    trial: int | None = None,
    max_accuracy_drop: float | None = None,
    max_latency_ms: float | None = None,
) -> FrozenTrial:
    """One complete trial: ``trial`` by number, or by rule among the complete feasible trials.

    ``max_accuracy_drop`` (validation accuracy drop against the baseline, in percentage points)
    picks the fastest trial within it; ``max_latency_ms`` alone picks the most accurate trial
    within it; both pick the fastest trial within both (the drop is the accuracy floor, the
    latency a ceiling). Ties go to the better other objective, then the earlier trial. When no
    trial fits, the error names the closest one (the smallest overshoot, each bound's overshoot
    relative to that bound, the drop's to at least 1 pp) and the bounds it would need.
    """
    name = study.study_name
    rules = max_accuracy_drop is not None or max_latency_ms is not None
    if trial is not None and rules:
        raise RanksearchError(f"--trial {trial} and a rule (--max-accuracy-drop/--max-latency-ms) given; pass one")
    if trial is None and not rules:
        raise RanksearchError("no trial chosen; pass --trial N, --max-accuracy-drop D or --max-latency-ms L")
    if trial is not None:
        return _trial_by_number(study, trial)
    if max_accuracy_drop is not None and not max_accuracy_drop >= 0:
        raise RanksearchError(f"--max-accuracy-drop {max_accuracy_drop}: must be >= 0 percentage points")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise RanksearchError(f"--max-latency-ms {max_latency_ms}: must be positive")
    pool = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if is_feasible(t) and _finite_number(t, "accuracy_drop_pp") and _finite_number(t, "latency_ms")
    ]
    if not pool:
        raise RanksearchError(
            f"study {name!r} has no complete feasible trial yet; run the search longer or relax its constraints"
        )
    overshoot = _overshoot(max_accuracy_drop, max_latency_ms)
    fits = [t for t in pool if overshoot(t) == 0]
    if fits:
        if max_accuracy_drop is not None:
            return min(fits, key=lambda t: (_latency(t), -_accuracy(t), t.number))
        return min(fits, key=lambda t: (-_accuracy(t), _latency(t), t.number))
    closest = min(pool, key=lambda t: (overshoot(t), t.number))
    drop, latency = _drop(closest), _latency(closest)
    needs = []
    if max_accuracy_drop is not None and drop > max_accuracy_drop + TOLERANCE:
        needs.append(f"--max-accuracy-drop {math.ceil(drop * 100 - 1e-6) / 100:.2f}")
    if max_latency_ms is not None and latency > max_latency_ms + TOLERANCE:
        needs.append(f"--max-latency-ms {math.ceil(latency * 1000 - 1e-6) / 1000:.3f}")
    within = " and ".join(
        f"{option} {value:g}"
        for option, value in (("--max-accuracy-drop", max_accuracy_drop), ("--max-latency-ms", max_latency_ms))
        if value is not None
    )
    raise RanksearchError(
        f"no complete feasible trial of study {name!r} is within {within}; the closest, trial {closest.number} "
        f"(drop {drop:.2f} pp, {latency:.3f} ms), would need {' and '.join(needs)}"
    )


def export_config(study: optuna.Study, trial: FrozenTrial) -> CompressionConfig:
    """``trial``'s configuration with the study's ``model`` section and provenance in ``meta``."""
    name = study.study_name
    if trial.state != TrialState.COMPLETE or "config" not in trial.user_attrs:
        raise RanksearchError(f"trial {trial.number} of study {name!r} is {trial.state.name} without a config")
    spec = study.user_attrs.get(MODEL_KEY)
    if not spec:
        raise RanksearchError(
            f"study {name!r} does not record its model (it predates `ranksearch export`); "
            "rerun its `ranksearch run` command once to record it"
        )
    attrs = trial.user_attrs
    metrics = {
        key: attrs[key]
        for key in ("accuracy", "latency_ms", "speedup", "accuracy_drop_pp", "params", "macs", "size_bytes")
        if key in attrs
    }
    test = study.user_attrs.get(TEST_ACCURACY_KEY, {}).get(str(trial.number))
    if test is not None:
        metrics["test_accuracy"] = test
    meta = {
        "study": name,
        "storage": _storage_url(study),
        "trial": trial.number,
        **({"anchor": attrs["anchor"]} if attrs.get("anchor") else {}),
        "metrics": metrics,
        "baseline": baseline(study),
        "settings": study.user_attrs.get(SETTINGS_KEY, {}),
        "versions": {
            "ranksearch": ranksearch.__version__,
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "optuna": optuna.__version__,
        },
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    config = CompressionConfig.from_dict(attrs["config"])
    return replace(config, model=dict(spec), meta=_finite(meta))


def export_trial(
    study: optuna.Study,
    *,
    trial: int | None = None,
    max_accuracy_drop: float | None = None,
    max_latency_ms: float | None = None,
    out: str | Path | None = None,
    console: Console | None = None,
) -> Path:
    """:func:`select_trial` -> :func:`export_config` -> ``out`` (JSON, or YAML for ``.yaml``/``.yml``), atomically.

    ``out`` defaults to ``<study>-trial<N>.yaml`` in the working directory. Returns the path written.
    """
    if out is not None and Path(out).suffix not in CONFIG_SUFFIXES:
        raise RanksearchError(f"--out {out}: use a file name ending in {', '.join(CONFIG_SUFFIXES)}")
    chosen = select_trial(study, trial=trial, max_accuracy_drop=max_accuracy_drop, max_latency_ms=max_latency_ms)
    config = export_config(study, chosen)
    path = Path(out) if out is not None else Path(f"{study.study_name}-trial{chosen.number}.yaml")
    try:
        config.save(path)
    except OSError as exc:
        raise RanksearchError(f"--out {path}: cannot be written ({exc.strerror}); pass a writable path") from None
    metrics = config.meta["metrics"]
    (console or Console(stderr=True)).print(
        f"wrote {path}: trial {chosen.number}, val accuracy {metrics['accuracy']:.2%}, "
        f"{metrics['latency_ms']:.3f} ms ({metrics.get('speedup') or math.nan:.2f}x), "
        f"drop {metrics.get('accuracy_drop_pp') or 0.0:.2f} pp"
    )
    return path


def build_from_config(
    config: CompressionConfig | Mapping[str, Any] | str | Path,
    *,
    checkpoint: str | Path | None = None,
    init: Init = "decompose",
    calib_inputs: torch.Tensor | None = None,
) -> nn.Module:
    """A fresh model built from ``config``'s ``model`` section, compressed by its layers, in eval mode.

    ``checkpoint`` holds the uncompressed model's trained weights (an export records the study's
    in ``config.model["checkpoint"]``); without it the model starts from random weights.
    ``init`` and ``calib_inputs`` (model inputs, needed by int8 and data-aware layers) are as in
    :func:`ranksearch.apply_config`; as in the search, int8 layers are quantized last, their scales
    calibrated on the factorized model. This is the compressed model before fine-tuning: the
    study's accuracy was measured after BatchNorm recalibration and a short distillation before
    quantizing, as :class:`ranksearch.evaluate.classification.ClassificationEvaluator` does.
    """
    config = CompressionConfig.coerce(config)
    missing = [key for key in MODEL_FIELDS if config.model.get(key) is None]
    if missing:
        raise RanksearchError(
            f"config: its 'model' section lacks {', '.join(missing)}; export it with `ranksearch export` "
            "or add them (name, num_classes, in_channels, image_size)"
        )
    spec = config.model
    model = build_model(
        str(spec["name"]),
        num_classes=int(spec["num_classes"]),
        in_channels=int(spec["in_channels"]),
        image_size=int(spec["image_size"]),
    )
    if checkpoint is not None:
        model = load_checkpoint(model, checkpoint)
    float_config, int8_layers = config.split_int8()
    model = apply_config(model.eval(), float_config, inplace=True, calib_inputs=calib_inputs, init=init)
    return quantize_layers(model, int8_layers, calib_inputs) if int8_layers else model


def _trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    name = study.study_name
    if number not in trials:
        known = f"0..{max(trials)}" if trials else "none yet"
        raise RanksearchError(f"--trial {number}: study {name!r} has no such trial (trials: {known})")
    chosen = trials[number]
    if chosen.state != TrialState.COMPLETE:
        reason = chosen.user_attrs.get("fail_reason")
        raise RanksearchError(
            f"--trial {number}: trial {number} of study {name!r} is {chosen.state.name}"
            + (f" ({reason})" if reason else "")
            + f", not COMPLETE; pick a complete one (`ranksearch show {name} --all`)"
        )
    return chosen


def _finite_number(trial: FrozenTrial, key: str) -> bool:
    value = trial.user_attrs.get(key)
    return isinstance(value, int | float) and math.isfinite(value)


def _accuracy(trial: FrozenTrial) -> float:
    return float(trial.user_attrs["accuracy"])


def _drop(trial: FrozenTrial) -> float:
    return float(trial.user_attrs["accuracy_drop_pp"])


def _latency(trial: FrozenTrial) -> float:
    return float(trial.user_attrs["latency_ms"])


def _overshoot(max_drop: float | None, max_latency: float | None) -> Callable[[FrozenTrial], float]:
    """How far a trial is outside the bounds, each overshoot relative to its bound (0 when within both)."""

    def overshoot(trial: FrozenTrial) -> float:
        total = 0.0
        if max_drop is not None:
            total += max(_drop(trial) - max_drop - TOLERANCE, 0.0) / max(max_drop, 1.0)
        if max_latency is not None:
            total += max(_latency(trial) - max_latency - TOLERANCE, 0.0) / max_latency
        return total

    return overshoot


def _layer_names(study: optuna.Study) -> list[str]:
    """Every layer any trial configures, in first-seen order."""
    names: dict[str, None] = {}
    for trial in study.get_trials(deepcopy=False):
        names.update(dict.fromkeys(trial.user_attrs.get("config", {}).get("layers", {})))
    return list(names)


def _techniques(layers: Mapping[str, Mapping[str, Any]]) -> str:
    counts = Counter(choice["technique"] for choice in layers.values())
    return " ".join(f"{t}x{n}" for t, n in counts.most_common() if t != "keep") or "none"


def _storage_url(study: optuna.Study) -> str | None:
    """The study's storage URL, password hidden (None for storages without one, e.g. in-memory)."""
    from sqlalchemy.engine import make_url

    storage = study._storage
    url = getattr(getattr(storage, "_backend", storage), "url", None)
    return None if url is None else make_url(url).render_as_string(hide_password=True)


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
    ("latency_ms", "latency ms", _number("{:.3f}")),
    ("speedup", "speedup", _number("{:.2f}x")),
    ("params", "params M", _number("{:.3f}", 1e-6)),
    ("macs", "MMACs", _number("{:.1f}", 1e-6)),
    ("techniques", "techniques", str),
    ("int8_layers", "int8", str),
    ("fail_reason", "fail reason", str),
)


def _table(study: optuna.Study, rows: list[dict[str, Any]], *, all_trials: bool) -> Table:
    """The rows as a rich table (per-layer columns left out), titled by the study and captioned by the baseline."""
    what = f"all {len(rows)} trials" if all_trials else f"Pareto front, {len(rows)} trials, fastest first"
    base = baseline(study)
    caption = (
        f"baseline: val acc {base['accuracy']:.2%}, {base['latency_ms']:.3f} ms, {base['params'] / 1e6:.3f} M params"
        if {"accuracy", "latency_ms", "params"} <= set(base)
        else "baseline not measured yet"
    )
    if not rows:
        caption += "; no complete feasible trial yet" if not all_trials else "; no trial yet"
    columns = [c for c in _COLUMNS if any(c[0] in row for row in rows)] or list(_COLUMNS[:1])
    table = Table(*(header for _, header, _ in columns), title=f"{study.study_name}: {what}", caption=caption)
    for row in rows:
        table.add_row(*(render(row.get(key)) if row.get(key) is not None else "—" for key, _, render in columns))
    return table
