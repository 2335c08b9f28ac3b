"""Evaluators score a compression configuration: accuracy and latency on the target device."""

from ranksearch.evaluate.base import BaseEvaluator

__all__ = ["BaseEvaluator"]
