"""Evaluators score a compression configuration: accuracy and latency on the target device."""

from ranksearch.evaluate.base import (
    BaseEvaluator,
    Evaluator,
    LocalTorchTiming,
    Metrics,
    Split,
    ZeroShotScorer,
)
from ranksearch.evaluate.classification import ClassificationEvaluator, EvaluatorOptions

__all__ = [
    "BaseEvaluator",
    "ClassificationEvaluator",
    "Evaluator",
    "EvaluatorOptions",
    "LocalTorchTiming",
    "Metrics",
    "Split",
    "ZeroShotScorer",
]
