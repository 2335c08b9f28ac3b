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
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import optuna
import torch
import torchvision
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

import ranksearch
from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError
from ranksearch.results import MODEL_KEY, SETTINGS_KEY, TEST_ACCURACY_KEY, baseline, finite
from ranksearch.results.select import select_trial

__all__ = ["CONFIG_SUFFIXES", "export_config", "export_trial"]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


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
    return replace(config, model=dict(spec), meta=finite(meta))


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


def _storage_url(study: optuna.Study) -> str | None:
    """The study's storage URL, password hidden (None for storages without one, e.g. in-memory)."""
    from sqlalchemy.engine import make_url

    storage = study._storage
    url = getattr(getattr(storage, "_backend", storage), "url", None)
    return None if url is None else make_url(url).render_as_string(hide_password=True)
