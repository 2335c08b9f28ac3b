"""Compress one layer, count its cost, and apply a whole-model configuration."""

from __future__ import annotations

import copy
import difflib
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import CompressionError
from ranksearch.techniques import get_technique
from ranksearch.techniques.base import RankSpec, Technique, as_layer_weight
from ranksearch.techniques.cache import FactorCache, FactorStore, default_store, tensor_digest
from ranksearch.techniques.spec import Cost, Plan, spec_of

Init = Literal["decompose", "random"]


class CompressedLayer(nn.Sequential):
    """The replacement of one layer: its factor layers in order, and what made them."""

    def __init__(self, *layers: nn.Module, technique: str, ranks: tuple[int, ...]) -> None:
        super().__init__(*layers)
        self.technique = technique
        self.ranks = tuple(ranks)

    def extra_repr(self) -> str:
        return f"technique={self.technique!r}, ranks={self.ranks}"


@dataclass(frozen=True)
class CostReport:
    """A replacement's cost beside the dense layer's, at resolved ranks."""

    cost: Cost
    dense: Cost
    ranks: tuple[int, ...]

    @property
    def larger(self) -> bool:
        """True when the replacement has more params or more MACs than the dense layer."""
        return self.cost.params > self.dense.params or self.cost.macs > self.dense.macs

    @property
    def param_ratio(self) -> float:
        return self.cost.params / self.dense.params

    @property
    def mac_ratio(self) -> float:
        return self.cost.macs / max(1, self.dense.macs)


def describe(layer: nn.Module) -> str:
    """A short description of a layer for error messages."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        groups = f", groups={layer.groups}" if layer.groups > 1 else ""
        return f"Conv2d({layer.in_channels}->{layer.out_channels}, {kh}x{kw}{groups})"
    if isinstance(layer, nn.Linear):
        return f"Linear({layer.in_features}->{layer.out_features})"
    return type(layer).__name__


def _prepare(
    layer: nn.Module,
    technique: str,
    rank: RankSpec | None,
    options: Mapping[str, object],
    rank_multiple: int,
    where: str,
) -> tuple[Technique, dict[str, object], Plan]:
    t = get_technique(technique)
    try:
        reason = t.unsupported_reason(layer)
        if reason:
            raise CompressionError(reason)
        opts = t.options(options)
        if rank is None and t.rank_names:
            raise CompressionError(f"a rank is required ({', '.join(t.rank_names)})")
        ranks = t.resolve_ranks(layer, () if rank is None else rank, opts, multiple=rank_multiple)
        return t, opts, t.plan(layer, ranks, opts)
    except CompressionError as exc:
        raise CompressionError(f"layer {where}: technique {technique!r}: {exc}") from None


def layer_cost(
    layer: nn.Module,
    technique: str,
    rank: RankSpec | None,
    input_shape: tuple[int, ...],
    *,
    rank_multiple: int = 8,
    **options: object,
) -> Cost:
    """``(params, macs)`` of the replacement, from shapes alone (nothing is built or decomposed).

    ``input_shape`` is the layer's input, ``(C, H, W)`` / ``(B, C, H, W)`` for a conv,
    ``(F,)`` / ``(B, F)`` for a Linear; MACs count one pass over it, bias additions excluded.
    """
    return cost_report(layer, technique, rank, input_shape, rank_multiple=rank_multiple, **options).cost


def cost_report(
    layer: nn.Module,
    technique: str,
    rank: RankSpec | None,
    input_shape: tuple[int, ...],
    *,
    rank_multiple: int = 8,
    **options: object,
) -> CostReport:
    """The replacement's cost beside the dense layer's; ``.larger`` flags ranks not worth building."""
    _, _, plan = _prepare(layer, technique, rank, options, rank_multiple, describe(layer))
    shape = _check_input_shape(layer, tuple(input_shape), technique)
    return CostReport(plan.cost(shape), Plan([spec_of(layer)], ()).cost(shape), plan.ranks)


def _check_input_shape(layer: nn.Module, shape: tuple[int, ...], technique: str) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        ok, want = len(shape) >= 1 and shape[-1] == layer.in_features, f"(..., {layer.in_features})"
        return shape if ok else _bad_shape(layer, shape, technique, want)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1] != layer.in_channels:
        _bad_shape(layer, shape, technique, f"(C={layer.in_channels}, H, W) or (B, C, H, W)")
    return shape


def _bad_shape(layer: nn.Module, shape: tuple[int, ...], technique: str, want: str) -> tuple[int, ...]:
    raise CompressionError(
        f"layer {describe(layer)}: technique {technique!r}: input_shape {shape} does not fit; pass {want}"
    )


def compress_layer(
    layer: nn.Module,
    technique: str,
    rank: RankSpec | None = None,
    *,
    int8: bool = False,
    data_aware: bool = False,
    calib_inputs: torch.Tensor | None = None,
    rank_multiple: int = 8,
    init: Init = "decompose",
    store: FactorStore | None = None,
    name: str | None = None,
    **options: object,
) -> nn.Module:
    """The replacement of a trained ``layer`` built from its weights, with the same geometry.

    ``rank`` is an int, a fraction of the full rank, or one per rank dimension. ``data_aware``
    preserves the layer's outputs on ``calib_inputs`` (the layer's inputs) rather than its
    weights; ``int8`` runs the replacement with int8 kernels, its activation scales set on
    ``calib_inputs``. ``init="random"`` builds the same structure freshly initialised, for
    training from scratch. Decompositions are cached in ``store`` (the process-wide store by
    default), so compressing the same weights again is nearly free.
    """
    where = name or describe(layer)
    t, opts, plan = _prepare(layer, technique, rank, options, rank_multiple, where)

    def fail(reason: str) -> CompressionError:
        return CompressionError(f"layer {where}: technique {technique!r}: {reason}")

    if (data_aware or int8) and calib_inputs is None:
        raise fail(f"{'data_aware' if data_aware else 'int8'} needs calib_inputs (a batch of the layer's inputs)")
    if data_aware and not t.data_aware_capable:
        raise fail("data_aware is not offered for this technique")
    if init == "random":
        if data_aware:
            raise fail("data_aware needs init='decompose'")
        like = layer.weight
        modules = [spec.build().to(device=like.device, dtype=like.dtype) for spec in plan.specs]
    else:
        modules = _decomposed_modules(
            layer, t, plan, opts, store or default_store(), calib_inputs if data_aware else None
        )
    if t.name == "keep":
        module: nn.Module = modules[0]
    else:
        module = CompressedLayer(*modules, technique=t.name, ranks=plan.ranks)
    module.train(layer.training)
    if int8:
        from ranksearch.techniques.int8 import quantize_int8

        try:
            return quantize_int8(module, calib_inputs)
        except CompressionError as exc:
            raise fail(str(exc)) from None
    if not layer.weight.requires_grad:
        module.requires_grad_(False)
    return module


def _decomposed_modules(
    layer: nn.Module, t: Technique, plan: Plan, opts: dict[str, object], store: FactorStore, calib: torch.Tensor | None
) -> list[nn.Module]:
    weight = layer.weight
    prefix = f"{t.name}-{tensor_digest(weight)}"
    if calib is not None:
        calib = calib.detach().to(weight.device, weight.dtype)
        geometry = hashlib.blake2b(repr(spec_of(layer)).encode(), digest_size=6).hexdigest()
        prefix += f"-calib-{tensor_digest(calib)}-{geometry}"
    cache = FactorCache(store, prefix, weight.device)
    with torch.no_grad():
        weights = t.decompose(layer, plan, opts, cache, calib)
        dtype = weight.dtype
        return [
            spec.build(as_layer_weight(spec, w.to(dtype)), None if b is None else b.to(dtype))
            for spec, (w, b) in zip(plan.specs, weights)
        ]


def apply_config(
    model: nn.Module,
    config: CompressionConfig | Mapping[str, object] | str | Path,
    *,
    inplace: bool = False,
    calib_inputs: torch.Tensor | None = None,
    init: Init = "decompose",
    store: FactorStore | None = None,
) -> nn.Module:
    """Replace the layers a configuration names (by qualified module name) with their compressed versions.

    ``config`` is a :class:`CompressionConfig`, its dict form, or a JSON/YAML file. ``model`` is
    copied first unless ``inplace``. ``calib_inputs`` (a batch of *model* inputs) is needed when
    a layer asks for ``int8`` or ``data_aware``: each layer's inputs are captured from it in one
    pass of the original model.
    """
    config = CompressionConfig.coerce(config)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    missing = [name for name in config.layers if name not in modules]
    if missing:
        raise CompressionError(_missing_layer_message(missing[0], modules, type(model).__name__))
    needs_inputs = [n for n, c in config.layers.items() if c.int8 or c.data_aware]
    captured = _capture_inputs(target, needs_inputs, calib_inputs) if needs_inputs else {}
    for name, choice in config.layers.items():
        _replace(target, name, _compress_choice(modules[name], name, choice, config, captured.get(name), init, store))
    return target


def _compress_choice(
    layer: nn.Module,
    name: str,
    choice: LayerChoice,
    config: CompressionConfig,
    calib: torch.Tensor | None,
    init: Init,
    store: FactorStore | None,
) -> nn.Module:
    return compress_layer(
        layer,
        choice.technique,
        choice.rank,
        int8=choice.int8,
        data_aware=choice.data_aware,
        calib_inputs=calib,
        rank_multiple=config.rank_multiple,
        init=init,
        store=store,
        name=name,
        **choice.options,
    )


def _missing_layer_message(name: str, modules: Mapping[str, nn.Module], model_name: str) -> str:
    layers = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    close = difflib.get_close_matches(name, layers, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "list the model's layers with model.named_modules()"
    return f"layer {name!r}: the config names a layer that {model_name} does not have; {hint}"


def _capture_inputs(model: nn.Module, names: list[str], calib_inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if calib_inputs is None:
        raise CompressionError(f"layer {names[0]!r}: int8/data_aware needs calib_inputs (a batch of model inputs)")
    return layer_inputs(model, names, calib_inputs)


def layer_inputs(model: nn.Module, names: list[str], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each named module receives on one eval-mode, no-grad pass of ``inputs`` (its first call).

    Every module's training flag is restored afterwards, so BatchNorm statistics are untouched.
    """
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def keep_first_input(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured.setdefault(name, args[0].detach())

        return hook

    hooks = [modules[n].register_forward_pre_hook(keep_first_input(n)) for n in names]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return captured


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@dataclass(frozen=True)
class ModelCost:
    """Whole-model cost: parameters, MACs for one pass, and weight storage in bytes."""

    params: int
    macs: int
    size_bytes: int


def dense_model_cost(model: nn.Module, example: torch.Tensor) -> ModelCost:
    """The uncompressed model's cost, counted on the module (MACs via torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return ModelCost(params, counter.get_total_flops() // 2, size)


def model_cost(
    model: nn.Module, config: CompressionConfig, input_shapes: Mapping[str, tuple[int, ...]], *, dense: ModelCost
) -> ModelCost:
    """The cost of ``model`` compressed by ``config``, from the cost model (nothing is built).

    ``dense`` is :func:`dense_model_cost` of ``model``; ``input_shapes`` holds each configured
    layer's input shape. An int8 layer stores one byte per parameter.
    """
    modules = dict(model.named_modules())
    params, macs, size = dense.params, dense.macs, dense.size_bytes
    for name, choice in config.layers.items():
        layer = modules[name]
        report = cost_report(
            layer,
            choice.technique,
            choice.rank,
            input_shapes[name],
            rank_multiple=config.rank_multiple,
            **choice.options,
        )
        element = layer.weight.element_size()
        params += report.cost.params - report.dense.params
        macs += report.cost.macs - report.dense.macs
        size += report.cost.params * (1 if choice.int8 else element) - report.dense.params * element
    return ModelCost(params, macs, size)


def quantize_layers(model: nn.Module, names: list[str], calib_inputs: torch.Tensor) -> nn.Module:
    """Replace the named (possibly already factorized) layers of ``model`` in place by int8 versions.

    Activation scales come from each layer's inputs on ``calib_inputs`` (model inputs), captured
    in one pass; this is post-training quantization, to be done after fine-tuning.
    """
    from ranksearch.techniques.int8 import quantize_int8

    captured = _capture_inputs(model, names, calib_inputs)
    for name in names:
        try:
            _replace(model, name, quantize_int8(model.get_submodule(name), captured[name]))
        except CompressionError as exc:
            raise CompressionError(f"layer {name}: int8: {exc}") from None
    return model
