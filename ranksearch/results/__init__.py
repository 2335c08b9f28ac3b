"""A study's results as rows (computed once) and the files written from them.

Every table, file and plot is rendered from :func:`trial_rows` / :func:`front_rows`, so they
never disagree.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError
from ranksearch.measure.backends import latency_backend_title
from ranksearch.results.front import compresses_nothing, config_speeds, front_with_speeds
from ranksearch.results.front import front_trials as front_trials  # re-exported: the front is read from here
from ranksearch.results.record import (
    BASELINE,
    MODEL,
    SETTINGS,
    StudyRecord,
    TrialRecord,
    records,
    recovered_checkpoint,
)
from ranksearch.util import atomic_write_text, first_line, sqlite_url, storage_for

STORAGE_FILE = "study.db"


def choice_label(choice: Mapping[str, Any]) -> str:
    """``svd@0.5``, ``tucker2@0.25+int8``, ``keep`` ..."""
    label = choice["technique"]
    if "rank" in choice:
        rank = choice["rank"]
        label += "@" + (",".join(map(str, rank)) if isinstance(rank, list) else str(rank))
    if choice.get("data_aware"):
        label += "+data"
    if choice.get("int8"):
        label += "+int8"
    return label


def baseline(study: optuna.Study) -> dict[str, float]:
    return dict(BASELINE.read(study))


DISTURBED_TIMING = 1.5
"""The dense model's first timing counts as disturbed when it is this many times off the median of its timings
beside the trials (either way)."""


def dense_latency_beside_trials(study: optuna.Study) -> dict[str, float] | None:
    """The dense model's latency as timed beside each complete trial (its paired reference timing): ``median_ms``,
    ``min_ms``, ``max_ms`` and ``trials``; None when no trial recorded one (a study of an earlier release, or an
    evaluator that does not pair its timings). Many timings spread over the run, so steadier than the one taken
    before the search."""
    timings = [
        r.metrics["reference_latency_ms"]
        for r in records(study, states=(TrialState.COMPLETE,))
        if r.metrics.get("reference_latency_ms")
    ]
    if not timings:
        return None
    return {
        "median_ms": statistics.median(timings),
        "min_ms": min(timings),
        "max_ms": max(timings),
        "trials": float(len(timings)),
    }


def disturbed_baseline_timing(study: optuna.Study) -> str | None:
    """One line when the dense model's first timing (before the search) is :data:`DISTURBED_TIMING` times off the
    median of its timings beside the trials: the machine was busy (or idle) then, so that figure is not the dense
    model's latency. Speedups are unaffected: each was timed against the dense model beside it."""
    first, beside = baseline(study).get("latency_ms"), dense_latency_beside_trials(study)
    if not first or beside is None or not beside["median_ms"]:
        return None
    ratio = first / beside["median_ms"]
    if 1 / DISTURBED_TIMING <= ratio <= DISTURBED_TIMING:
        return None
    return (
        f"warning: the dense model's first timing, {first:.3f} ms, is {ratio:.2g}x the median of its "
        f"{beside['trials']:.0f} timings beside the trials ({beside['median_ms']:.3f} ms): the machine was "
        "disturbed then; every speedup was timed against the dense model beside it and is unaffected"
    )


NEAR_CHANCE = 0.1
"""A dense model less than this fraction of the way from chance (one over the classes) to perfect accuracy counts as
untrained: differences between configs' accuracies are then noise."""


def untrained_baseline(study: optuna.Study) -> str | None:
    """One line saying the dense model's validation accuracy is near chance, so that the front is ordered by noise
    on its accuracy axis; None when it is not (or the accuracy or the number of classes was not recorded)."""
    accuracy, classes = baseline(study).get("accuracy"), MODEL.read(study).get("num_classes")
    if accuracy is None or not classes or classes < 2:
        return None
    chance = 1.0 / classes
    if accuracy >= chance + NEAR_CHANCE * (1.0 - chance):
        return None
    return (
        f"warning: the dense model scores {accuracy:.1%} on validation, near chance ({chance:.1%} for {classes} "
        "classes): its accuracy differences between configs are noise and only the latency figures mean anything; "
        "train it longer (--baseline-epochs) or pass a trained --checkpoint"
    )


def layer_order(study: optuna.Study) -> list[str]:
    """Every layer a trial configured, in model order (configs list layers in module order)."""
    names: dict[str, None] = {}
    for trial in records(study):
        names.update(dict.fromkeys(trial.layers))
    return list(names)


def trial_rows(study: optuna.Study, layer_names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per trial: its state, metrics, costs, time per phase and per-layer choices."""
    rows = []
    for trial in records(study):
        size = trial.cost.get("size_bytes")
        row: dict[str, Any] = {
            "trial": trial.number,
            "state": trial.state.name,
            "anchor": trial.anchor,
            "rung": trial.rung,
            "promotes": trial.promotes,
            "finetune_steps": trial.finetune_steps,
            "accuracy": trial.metrics.get("accuracy"),
            "latency_ms": trial.metrics.get("latency_ms"),
            "predicted_latency_ms": trial.predicted_latency_ms,
            "speedup": trial.speedup,
            "speedup_low": trial.metrics.get("speedup_low"),
            "speedup_high": trial.metrics.get("speedup_high"),
            "relative_latency": None if not trial.speedup else 1.0 / trial.speedup,
            "accuracy_drop_pp": trial.accuracy_drop_pp,
            "params": trial.cost.get("params"),
            "macs": trial.cost.get("macs"),
            "size_mb": None if size is None else size / 1e6,
            "feasible": trial.feasible if trial.state == TrialState.COMPLETE else None,
            "duration_s": trial.duration_s,
        }
        row.update({k: v for k, v in trial.metrics.items() if k.startswith(("time_", "latency_"))})
        row["fail_reason"] = trial.reason
        for name in layer_names or list(trial.layers):
            row[f"layer:{name}"] = choice_label(trial.layers.get(name, {"technique": "keep"}))
        rows.append(row)
    return rows


def front_rows(study: optuna.Study, *, directory: Path | None = None) -> list[dict[str, Any]]:
    """The Pareto front (feasible trials), fastest first, with test accuracy where measured; a recovered member's
    model is looked for in ``directory`` (the study's results directory) too (:func:`recovered_checkpoint`)."""
    stored, (front, speeds) = StudyRecord.of(study), front_with_speeds(study)
    rows = []
    for trial in map(TrialRecord.of, front):
        techniques = Counter(c["technique"] for c in trial.layers.values())
        speed = speeds[trial.number]
        key = str(trial.number)
        test_drop, recovered = stored.test_drop.get(key, {}), stored.recovered.get(key, {})
        recovered_val = stored.recovered_validation_drop(trial.number) or {}
        rows.append(
            {
                "trial": trial.number,
                "anchor": trial.anchor,
                "rung": trial.rung,
                "finetune_steps": trial.finetune_steps,
                "accuracy": trial.metrics["accuracy"],
                "test_accuracy": stored.test_accuracy.get(key),
                "accuracy_drop_pp": trial.accuracy_drop_pp,
                "test_drop_pp": test_drop.get("drop_pp"),
                "test_drop_low_pp": test_drop.get("low_pp"),
                "test_drop_high_pp": test_drop.get("high_pp"),
                "recovered_test_accuracy": recovered.get("test_accuracy"),
                "recovered_drop_pp": recovered.get("drop_pp"),
                "recovered_drop_low_pp": recovered.get("low_pp"),
                "recovered_drop_high_pp": recovered.get("high_pp"),
                "recovered_val_drop_pp": recovered_val.get("drop_pp"),
                "recovered_val_drop_low_pp": recovered_val.get("low_pp"),
                "recovered_val_drop_high_pp": recovered_val.get("high_pp"),
                "recovered_epochs": recovered.get("epochs"),
                "recovered_checkpoint": str(recovered_checkpoint(recovered, directory)) if recovered else None,
                "latency_ms": trial.metrics["latency_ms"],
                "speedup": speed.speedup,
                "speedup_low": speed.low,
                "speedup_high": speed.high,
                "retimed": speed.retimed,
                "speedup_timings": speed.timings,
                "params": trial.cost.get("params"),
                "macs": trial.cost.get("macs"),
                "size_mb": trial.cost.get("size_bytes", 0) / 1e6,
                "techniques": " ".join(f"{t}x{n}" for t, n in techniques.most_common() if t != "keep") or "none",
                "int8_layers": sum(bool(c.get("int8")) for c in trial.layers.values()),
            }
        )
    return rows


def time_per_arithmetic(rows: Sequence[Mapping[str, Any]], dense_macs: float | None) -> dict[str, float] | None:
    """How much of the arithmetic saved became time saved, over the front's compressed members (``rows`` of
    :func:`front_rows`): each member's measured speedup divided by its MAC reduction (``dense_macs`` over its MACs;
    1.0: every MAC saved became time saved, below it: per-operator overhead ate part of it), their median, min and
    max, and how many members. None without a compressed member or the dense model's MACs."""
    ratios = [
        row["speedup"] / (dense_macs / row["macs"])
        for row in rows
        if dense_macs and row.get("macs") and row.get("speedup") and row["macs"] < dense_macs
    ]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "members": float(len(ratios))}


def latency_target(settings: Mapping[str, Any]) -> str:
    """Where a study's latency was measured, in words: runtime, deployed form, device or remote target, batch,
    threads (e.g. ``eager torch, BatchNorm folded on cpu, batch 1, 2 threads``)."""
    threads = settings.get("threads")
    backend = str(settings.get("latency_backend", "torch"))
    runtime = latency_backend_title(backend)
    form = ", BatchNorm folded" if settings.get("fold_batchnorm") else ""
    device = settings.get("target") or settings.get("latency_device") or settings.get("device", "cpu")
    return (
        f"{runtime}{form} on {device}, batch {settings.get('latency_batch', 1)}, "
        f"{threads if threads else 'default'} thread{'s' if threads != 1 else ''}"
    )


def trial_configs(study: optuna.Study, numbers: Iterable[int]) -> dict[int, CompressionConfig]:
    """The configs of the trials numbered ``numbers`` (e.g. the front rows': read again, while workers complete
    trials, the front could have changed; the trials it held are still there)."""
    wanted = set(numbers)
    return {r.number: r.compression_config() for r in records(study) if r.number in wanted}


def best_speedup_within(study: optuna.Study, max_drop_pp: float | None) -> float | None:
    """The best speedup a trial measured (in the search, as :func:`~ranksearch.results.plots.progress_info` plots it)
    among the complete trials whose validation accuracy drop is within ``max_drop_pp`` and that are the dense model
    or were faster than it in every timed round."""
    best, complete = None, records(study, states=(TrialState.COMPLETE,))
    own = config_speeds(complete, {}, pool=False)  # each trial as it measured, not pooled with later timings
    for trial in complete:
        drop, speedup = trial.accuracy_drop_pp, trial.speedup
        if speedup is None or drop is None or (max_drop_pp is not None and drop > max_drop_pp):
            continue
        if not (compresses_nothing(trial) or own[trial.number].measurably_faster):
            continue
        best = speedup if best is None else max(best, speedup)
    return best


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    pd.DataFrame(rows).to_csv(buffer, index=False)
    atomic_write_text(path, buffer.getvalue())


def write_results(study: optuna.Study, directory: Path, *, layer_names: list[str] | None = None) -> None:
    """``trials.csv``, ``pareto.csv``, ``pareto.json`` and ``settings.json`` in ``directory``, written atomically."""
    write_csv(trial_rows(study, layer_names), directory / "trials.csv")
    front = front_rows(study, directory=directory)
    write_csv(front, directory / "pareto.csv")
    configs = trial_configs(study, (row["trial"] for row in front))
    members = [{**row, "config": configs[row["trial"]].to_dict()} for row in front]
    dense = baseline(study)
    document = {
        "study": study.study_name,
        "baseline": dense,
        "dense_latency_beside_trials": dense_latency_beside_trials(study),
        "front": members,
        "time_per_arithmetic": time_per_arithmetic(front, dense.get("macs")),
    }
    atomic_write_text(directory / "pareto.json", json.dumps(finite(document), indent=2) + "\n")
    settings = SETTINGS.read(study)
    atomic_write_text(directory / "settings.json", json.dumps(finite(settings), indent=2) + "\n")


def finite(value: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def locate_study(
    ref: str | Path, *, results_dir: Path = Path("results"), storage: str | None = None
) -> tuple[str, str]:
    """The storage URL and study name of ``ref``: a study name (under ``results_dir``, or in ``storage``
    when given) or the path of a ``results/<study>/`` directory."""
    path = Path(ref)
    if storage is None:
        directory = study_directory(ref, name=str(ref), results_dir=results_dir)
        if not (directory / STORAGE_FILE).is_file():
            raise RanksearchError(
                f"study {str(ref)!r}: no {STORAGE_FILE} in {directory}; pass a study name under --results-dir, "
                "a results/<study>/ directory, or --storage URL"
            )
        return sqlite_url(directory / STORAGE_FILE), directory.name
    return storage, path.name if (path / STORAGE_FILE).is_file() else str(ref)


def study_directory(ref: str | Path, *, name: str, results_dir: Path = Path("results")) -> Path:
    """The results directory of the study ``ref`` named ``name`` (``ref`` as in :func:`locate_study`): ``ref`` itself
    when it is a ``results/<study>/`` directory, else ``results_dir / name``."""
    path = Path(ref)
    return path if (path / STORAGE_FILE).is_file() else results_dir / name


def load_study(ref: str | Path, *, results_dir: Path = Path("results"), storage: str | None = None) -> optuna.Study:
    """Open a finished or running study read-write (``ref``, ``results_dir``, ``storage``: see :func:`locate_study`)."""
    storage, name = locate_study(ref, results_dir=results_dir, storage=storage)
    try:
        return optuna.load_study(study_name=name, storage=storage_for(storage))
    except KeyError:
        raise RanksearchError(f"study {name!r} is not in {storage}; check the name with `optuna studies`") from None
    except RanksearchError:
        raise
    except Exception as exc:  # sqlalchemy errors for unreachable or malformed URLs
        raise RanksearchError(f"storage {storage}: cannot open study {name!r} ({first_line(exc)})") from None
