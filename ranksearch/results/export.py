"""Export one trial of a study as a rebuildable config.

An exported file is a :class:`~ranksearch.config.CompressionConfig` with two optional sections
filled in: ``model`` (how to rebuild the uncompressed model: ``build_model`` arguments and the
baseline weights' file) and ``meta`` (provenance: study, storage, trial, measured metrics,
baseline, settings, library versions, date). ``ranksearch.apply_config(model, path)`` reads it
like any config; :func:`~ranksearch.results.build.build_from_config` rebuilds the compressed model
from it alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import torch
import torchvision
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError
from ranksearch.results import finite
from ranksearch.results.confidence import DropEstimate
from ranksearch.results.front import study_speeds
from ranksearch.results.record import RECOVERED_VALIDATION, StudyRecord, TrialRecord, recovered_checkpoint
from ranksearch.results.select import select_trial
from ranksearch.util import package_version

__all__ = ["CONFIG_SUFFIXES", "accuracy_statements", "export_config", "export_trial"]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def export_config(
    study: optuna.Study, trial: FrozenTrial, *, storage_url: str | None = None, directory: Path | None = None
) -> CompressionConfig:
    """``trial``'s configuration with the study's ``model`` section and provenance in ``meta``.

    ``storage_url`` is the URL the study was opened with (:func:`~ranksearch.results.locate_study`), recorded with
    its password hidden; None records none (e.g. an in-memory study). ``directory``: the study's results directory,
    where a recovered model is looked for too (:func:`~ranksearch.results.record.recovered_checkpoint`).
    """
    name = study.study_name
    record, stored = TrialRecord.of(trial), StudyRecord.of(study)
    if trial.state != TrialState.COMPLETE or not record.config:
        raise RanksearchError(f"trial {trial.number} of study {name!r} is {trial.state.name} without a config")
    if not stored.model:
        raise RanksearchError(
            f"study {name!r} does not record its model (it predates `ranksearch export`); "
            "rerun its `ranksearch run` command once to record it"
        )
    speed = study_speeds(study)[trial.number]
    measured = {
        "accuracy": record.metrics.get("accuracy"),
        "latency_ms": record.metrics.get("latency_ms"),
        "speedup": speed.speedup,
        "speedup_low": speed.low,
        "speedup_high": speed.high,
        "accuracy_drop_pp": record.accuracy_drop_pp,
    }
    metrics = {**{k: v for k, v in measured.items() if v is not None}, **record.cost}
    test = stored.test_accuracy_of(trial.number)
    if test is not None:
        metrics["test_accuracy"] = test
    key = str(trial.number)
    if key in stored.test_drop:
        metrics["test_drop"] = dict(stored.test_drop[key])
    if key in stored.retimed:
        metrics["retimed"] = dict(stored.retimed[key])
    if speed.timings > 1:
        metrics["speedup_timings"] = speed.timings
    meta = {
        "study": name,
        "storage": _hide_password(storage_url),
        "trial": trial.number,
        **({"anchor": record.anchor} if record.anchor else {}),
        **({"rung": record.rung, "finetune_steps": record.finetune_steps} if record.rung else {}),
        "metrics": metrics,
        **({"recovered": _recovered(stored.recovered[key], directory)} if key in stored.recovered else {}),
        "baseline": dict(stored.baseline),
        "settings": dict(stored.settings),
        "versions": {
            "ranksearch": package_version(),
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "optuna": optuna.__version__,
        },
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return replace(record.compression_config(), model=dict(stored.model), meta=finite(meta))


def export_trial(
    study: optuna.Study,
    *,
    trial: int | None = None,
    max_accuracy_drop: float | None = None,
    max_latency_ms: float | None = None,
    confident: bool = False,
    out: str | Path | None = None,
    storage_url: str | None = None,
    directory: Path | None = None,
    console: Console | None = None,
) -> Path:
    """:func:`select_trial` -> :func:`export_config` -> ``out`` (JSON, or YAML for ``.yaml``/``.yml``), atomically.

    ``out`` defaults to ``<study>-trial<N>.yaml`` in the working directory; ``storage_url`` (the study's, recorded in
    the provenance) and ``directory`` are as in :func:`export_config`; the rules and ``confident`` as in
    :func:`select_trial`. Returns the path written.
    """
    if out is not None and Path(out).suffix not in CONFIG_SUFFIXES:
        raise RanksearchError(f"--out {out}: use a file name ending in {', '.join(CONFIG_SUFFIXES)}")
    chosen = select_trial(
        study,
        trial=trial,
        max_accuracy_drop=max_accuracy_drop,
        max_latency_ms=max_latency_ms,
        confident=confident,
    )
    config = export_config(study, chosen, storage_url=storage_url, directory=directory)
    path = Path(out) if out is not None else Path(f"{study.study_name}-trial{chosen.number}.yaml")
    try:
        config.save(path)
    except OSError as exc:
        raise RanksearchError(f"--out {path}: cannot be written ({exc.strerror}); pass a writable path") from None
    metrics = config.meta["metrics"]
    console = console or Console(stderr=True)
    console.print(
        f"wrote {path}: trial {chosen.number}, {metrics['latency_ms']:.3f} ms "
        f"({metrics.get('speedup') or math.nan:.2f}x), val accuracy {metrics['accuracy']:.2%} and drop "
        f"{metrics.get('accuracy_drop_pp') or 0.0:.2f} pp after the search's fine-tune"
    )
    for line in accuracy_statements(config.meta, max_accuracy_drop, confident=confident):
        console.print(line)
    return path


def accuracy_statements(meta: dict[str, Any], max_accuracy_drop: float | None, *, confident: bool = False) -> list[str]:
    """What an exported trial's accuracy drops are and, for a "within X points" rule (``confident``: with 95 %
    confidence), which drop the rule read (:func:`~ranksearch.results.select.rule_drop`) and whether each drop holds
    at the point estimate only or with 95 % confidence (the paired interval's upper end)."""
    metrics = meta["metrics"]
    recovered = meta.get("recovered")
    validation = None if recovered is None else recovered.get(RECOVERED_VALIDATION)
    lines = []
    if max_accuracy_drop is not None:
        bound = f"validation drop <= {max_accuracy_drop:g} pp" + (" with 95 % confidence" if confident else "")
        lines.append(
            f"the rule ({bound}) read the validation split after the recovery fine-tune, below"
            if validation is not None
            else f"the rule (validation drop <= {max_accuracy_drop:g} pp) holds at the point estimate: "
            f"{metrics.get('accuracy_drop_pp') or 0.0:.2f} pp, from a short fine-tune, without an interval"
        )
    measured = [("test split", metrics.get("test_drop"))]
    if recovered is not None:
        at = f" at peak lr {recovered['lr']:g}" if "lr" in recovered else ""
        if recovered.get("feature_weight"):
            at += f", features matched at {recovered['feature_weight']:g}"
        after = f"after {recovered['epochs']} recovery epochs{at}"
        measured += [(f"validation split {after}", validation), (f"test split {after}", recovered)]
    for what, stored in measured:
        if stored is None:
            continue
        drop = DropEstimate.from_dict(stored)
        verdict = ""
        if max_accuracy_drop is not None:
            if drop.within(max_accuracy_drop, confident=True):
                verdict = f"; within {max_accuracy_drop:g} pp with 95 % confidence"
            elif drop.within(max_accuracy_drop, confident=False):
                verdict = f"; within {max_accuracy_drop:g} pp at the point estimate only, not with 95 % confidence"
            else:
                verdict = f"; not within {max_accuracy_drop:g} pp"
        lines.append(f"{what}: drop {drop.label()} (paired 95 % interval, {drop.images} images){verdict}")
    if recovered is not None:
        lines.append(f"recovered model: {recovered['checkpoint']}")
    return lines


def _recovered(stored: Mapping[str, Any], directory: Path | None) -> dict[str, Any]:
    """A :data:`~ranksearch.results.record.RECOVERED` entry with its model where it is now."""
    return {**stored, "checkpoint": str(recovered_checkpoint(stored, directory))}


def _hide_password(url: str | None) -> str | None:
    from sqlalchemy.engine import make_url

    return None if url is None else make_url(url).render_as_string(hide_password=True)
