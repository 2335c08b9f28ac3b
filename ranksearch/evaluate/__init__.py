"""Evaluators score a compression configuration: accuracy and latency on the target device."""

from ranksearch.evaluate.base import (
    BaseEvaluator,
    Divergence,
    DivergenceScorer,
    Evaluator,
    LayerTiming,
    LocalTorchTiming,
    Metrics,
    MultiFidelity,
    PairedTiming,
    Split,
    ZeroShotScorer,
)
from ranksearch.evaluate.classification import ClassificationEvaluator, EvaluatorOptions

__all__ = [
    "BaseEvaluator",
    "ClassificationEvaluator",
    "Divergence",
    "DivergenceScorer",
    "Evaluator",
    "EvaluatorOptions",
    "LayerTiming",
    "LocalTorchTiming",
    "Metrics",
    "MultiFidelity",
    "PairedTiming",
    "Split",
    "ZeroShotScorer",
]
