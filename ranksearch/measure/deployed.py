"""The deployed form of a model: what is timed is what would ship, BatchNorm folded into the layer before it.

Eager PyTorch runs every BatchNorm as its own operator; a deployed model (ONNX Runtime, a compiled graph) folds it
into the preceding convolution. Timing the unfolded model adds the same BatchNorm cost to the dense and the
compressed model, which understates what factorization saves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Folded:
    """A model in its deployed form, with how many BatchNorm layers were folded and how many are left."""

    model: nn.Module
    folded: int
    left: int


def fold_batchnorm(model: nn.Module) -> Folded:
    """A copy of ``model`` (eval mode) with every BatchNorm that directly follows a convolution or linear layer (and
    is its only user) folded into it: the layer gets the BatchNorm's scale and shift, the BatchNorm becomes an
    ``nn.Identity``. Module names are kept, so layers can still be found (and quantized) by name. The pairs are found
    by tracing the model with ``torch.fx``; a model that cannot be traced (data-dependent control flow) comes back as
    an unfolded copy, ``folded=0``: timed as eager torch runs it."""
    folded = copy.deepcopy(model).eval()
    pairs = _layer_batchnorm_pairs(folded)
    for layer_name, batchnorm_name in pairs:
        layer, batchnorm = folded.get_submodule(layer_name), folded.get_submodule(batchnorm_name)
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        with torch.no_grad():
            _set_submodule(folded, layer_name, fuse(layer, batchnorm))
        _set_submodule(folded, batchnorm_name, nn.Identity())
    left = sum(isinstance(module, _BATCHNORMS) for module in folded.modules())
    return Folded(model=folded, folded=len(pairs), left=left)


def _layer_batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, BatchNorm) module names where the BatchNorm (tracking running statistics) takes the layer's output and
    nothing else does; none when the model cannot be traced."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # torch.fx raises errors of many kinds on code it cannot trace
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCHNORMS):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        layer, batchnorm = modules.get(source.target), modules[node.target]
        if isinstance(layer, _FOLDABLE) and batchnorm.track_running_stats and batchnorm.running_mean is not None:
            pairs.append((str(source.target), str(node.target)))
    used = [name for pair in pairs for name in pair]
    return pairs if len(used) == len(set(used)) else []  # a module called twice is shared: fold nothing


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
