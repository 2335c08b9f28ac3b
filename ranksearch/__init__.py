"""ranksearch: automated per-layer rank search for compressing CNNs with low-rank approximation."""

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
from ranksearch.techniques import Technique, get_technique, list_techniques, register_technique
from ranksearch.techniques.cache import FactorStore, set_default_store
from ranksearch.techniques.spec import Cost
from ranksearch.util import package_version

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

_STUDY = {"RunSettings", "SearchResult", "run_search"}


def __getattr__(name: str) -> object:
    """The search API is imported on first use, so compressing layers does not load optuna and data code."""
    if name in _STUDY:
        from ranksearch import study

        return getattr(study, name)
    raise AttributeError(f"module 'ranksearch' has no attribute {name!r}")
