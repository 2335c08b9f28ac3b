"""Measuring models: wall-clock latency in torch, and ONNX export with ONNX Runtime latency."""

from ranksearch.measure.latency import Latency, measure_latency

__all__ = ["Latency", "measure_latency"]
