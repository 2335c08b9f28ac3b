"""Measuring models: wall-clock latency in eager or compiled torch, ONNX export with ONNX Runtime latency, and remote
targets.

``Latency`` and ``measure_latency`` are imported on first use, so that :mod:`ranksearch.measure.timing` and
:mod:`ranksearch.measure.target_server` import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ranksearch.measure.latency import measure_latency
    from ranksearch.measure.timing import Latency

__all__ = ["Latency", "measure_latency"]

_HOME = {"Latency": "ranksearch.measure.timing", "measure_latency": "ranksearch.measure.latency"}


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module 'ranksearch.measure' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
