"""Search: the search space (which layers, techniques, ranks) and sampling configurations from optuna trials."""

from ranksearch.search.shipped import default_space_path
from ranksearch.search.space import (
    KINDS,
    LayerSlot,
    Rank,
    SearchSpace,
    config_to_params,
    layer_kind,
    record_input_shapes,
    sample_config,
    uniform_config,
)

__all__ = [
    "KINDS",
    "LayerSlot",
    "Rank",
    "SearchSpace",
    "config_to_params",
    "default_space_path",
    "layer_kind",
    "record_input_shapes",
    "sample_config",
    "uniform_config",
]
