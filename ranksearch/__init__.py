"""ranksearch: automated per-layer rank search for compressing CNNs with low-rank approximation.

Its names are imported on first use: ``import ranksearch`` loads neither torch nor optuna, so that a module that
needs neither (the latency target server, :mod:`ranksearch.measure.target_server`) runs where they are not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ranksearch.util import package_version

if TYPE_CHECKING:
    from ranksearch.compress import CompressedLayer, CostReport, apply_config, compress_layer, cost_report, layer_cost
    from ranksearch.config import CompressionConfig, LayerChoice
    from ranksearch.errors import CompressionError, RanksearchError, Rejected, TrialFailure, UserError
    from ranksearch.evaluate.base import (
        BaseEvaluator,
        DivergenceScorer,
        Evaluator,
        LocalTorchTiming,
        Metrics,
        MultiFidelity,
        PairedTiming,
        ZeroShotScorer,
    )
    from ranksearch.measure import Latency, measure_latency
    from ranksearch.regularize import NuclearNormPenalty
    from ranksearch.study import RunSettings, SearchResult, run_search
    from ranksearch.techniques import Technique, get_technique, list_techniques, register_technique
    from ranksearch.techniques.cache import FactorStore, set_default_store
    from ranksearch.techniques.spec import Cost

__all__ = [
    "BaseEvaluator",
    "CompressedLayer",
    "CompressionConfig",
    "CompressionError",
    "Cost",
    "CostReport",
    "DivergenceScorer",
    "Evaluator",
    "FactorStore",
    "Latency",
    "LayerChoice",
    "LocalTorchTiming",
    "Metrics",
    "MultiFidelity",
    "NuclearNormPenalty",
    "PairedTiming",
    "RanksearchError",
    "Rejected",
    "RunSettings",
    "SearchResult",
    "Technique",
    "TrialFailure",
    "UserError",
    "ZeroShotScorer",
    "apply_config",
    "compress_layer",
    "cost_report",
    "get_technique",
    "layer_cost",
    "list_techniques",
    "measure_latency",
    "register_technique",
    "run_search",
    "set_default_store",
]

__version__ = package_version()

_HOMES = {
    "ranksearch.compress": (
        "CompressedLayer",
        "CostReport",
        "apply_config",
        "compress_layer",
        "cost_report",
        "layer_cost",
    ),
    "ranksearch.config": ("CompressionConfig", "LayerChoice"),
    "ranksearch.errors": ("CompressionError", "RanksearchError", "Rejected", "TrialFailure", "UserError"),
    "ranksearch.evaluate.base": (
        "BaseEvaluator",
        "DivergenceScorer",
        "Evaluator",
        "LocalTorchTiming",
        "Metrics",
        "MultiFidelity",
        "PairedTiming",
        "ZeroShotScorer",
    ),
    "ranksearch.measure": ("Latency", "measure_latency"),
    "ranksearch.regularize": ("NuclearNormPenalty",),
    "ranksearch.techniques": ("Technique", "get_technique", "list_techniques", "register_technique"),
    "ranksearch.techniques.cache": ("FactorStore", "set_default_store"),
    "ranksearch.techniques.spec": ("Cost",),
    "ranksearch.study": ("RunSettings", "SearchResult", "run_search"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> object:
    """Each public name imported from its module on first use (then cached as a module attribute)."""
    if name not in _HOME:
        raise AttributeError(f"module 'ranksearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
