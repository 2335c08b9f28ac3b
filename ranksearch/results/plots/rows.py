"""What every plot of a study is computed from, read once, and the base of the plots' infos."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import optuna

from ranksearch.config import CompressionConfig
from ranksearch.results import baseline, front_rows, latency_target, layer_order, trial_configs, trial_rows
from ranksearch.results.record import MODEL, OBJECTIVES, SETTINGS

DEFAULT_ACCURACY_BUDGET_PP = 1.0
"""The accuracy budget of "best speedup within budget" when the study set no ``--max-accuracy-drop``."""


@dataclass(frozen=True)
class StudyRows:
    """What every plot of a study is computed from, read once."""

    study_name: str
    trials: list[dict[str, Any]]
    """:func:`trial_rows` with every configured layer as a ``layer:<name>`` column, as in ``trials.csv``."""
    front: list[dict[str, Any]]
    """:func:`front_rows`, fastest first, as in ``pareto.csv``."""
    layer_names: list[str]
    configs: dict[int, CompressionConfig]
    """The config of each front member."""
    settings: dict[str, Any]
    baseline: dict[str, float]
    model_spec: dict[str, Any] | None
    """How the study's model is rebuilt (``build_model`` arguments), when recorded."""
    relative: bool = False
    """Whether the study's latency objective is relative to the dense model (else milliseconds: earlier releases)."""

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRows:
        layer_names = layer_order(study)
        front = front_rows(study)
        return cls(
            study_name=study.study_name,
            trials=trial_rows(study, layer_names),
            front=front,
            layer_names=layer_names,
            configs=trial_configs(study, (row["trial"] for row in front)),
            settings=dict(SETTINGS.read(study)),
            baseline=baseline(study),
            model_spec=MODEL.read(study) if MODEL.stored(study) else None,
            relative=OBJECTIVES.read(study).get("latency") == "relative",
        )

    def complete(self) -> list[dict[str, Any]]:
        return [r for r in self.trials if r["state"] == "COMPLETE" and r["accuracy"] is not None]

    def latency(self, row: dict[str, Any]) -> float:
        """The row's latency objective: relative to the dense model (1 / speedup), or milliseconds."""
        return float(row["relative_latency"] if self.relative else row["latency_ms"])

    def latency_label(self) -> str:
        """The latency axis' title: what was measured, in which target (runtime, form, device, batch, threads)."""
        where = latency_target(self.settings)
        if self.relative:
            return f"latency relative to the dense model timed beside it (1 / speedup; {where})"
        return f"measured latency (ms; {where})"

    def accuracy_budget_pp(self) -> float:
        budget = self.settings.get("max_accuracy_drop")
        return DEFAULT_ACCURACY_BUDGET_PP if budget is None else float(budget)


class PlotInfo(abc.ABC):
    """What one plot shows, computed once from :class:`StudyRows`; each backend renders it (see ``plots.render``)."""

    name: ClassVar[str]
    """The plot's file name, without suffix."""

    @abc.abstractmethod
    def title(self) -> str: ...


def format_number(value: float | None, fmt: str) -> str:
    """``fmt`` applied to ``value``, or an em dash when there is none."""
    return "—" if value is None else fmt.format(value)
