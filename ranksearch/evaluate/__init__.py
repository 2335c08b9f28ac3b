"""Evaluators score a compression configuration; latency is measured on the target device."""

from ranksearch.evaluate.base import BaseEvaluator
from ranksearch.evaluate.latency import Latency, measure_latency

__all__ = ["BaseEvaluator", "Latency", "measure_latency"]
